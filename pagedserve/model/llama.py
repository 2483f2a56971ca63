"""The Llama family (Llama 2/3, SmolLM, Mistral, Phi-3), Qwen2 and Qwen3.

One flattened step: ``forward(input_ids[T], positions[T], meta) -> hidden[T, H]`` over every
scheduled token of every request, no batch dimension and no padding. q/k/v are one GEMM and
gate/up another; the architectures differ only in which projections carry a bias, whether
each q and k head is RMS-normed before the rotation (Qwen3), which layers have a sliding
window, and how much of each head rotates (Phi-4-mini: 3/4).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import nn

from pagedserve.kernels.packed_gemm import QuantBlocks, pack_quantized
from pagedserve.model.layers.attention import Attention, AttentionMetadata
from pagedserve.model.layers.embedding import Embedding
from pagedserve.model.layers.linear import (
    GateUpSilu,
    Linear,
    MergedLinear,
    linear,
    pack_weight,
    packed_for,
)
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import (
    RotaryEmbedding,
    apply_rotary,
    rope_parameters,
    rotary_dim,
)
from pagedserve.model.strict_loading import check_complete, check_floating
from pagedserve.model.token_classifier import with_score_weight

# The name under which a loader hands over llama.cpp's per-frequency RoPE divisors.
ROPE_FREQ_FACTORS = "model.rotary_emb.freq_factors"

# Checkpoint projection name -> (fused module name, shard index).
STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def head_dim_of(config: Any) -> int:
    """Each attention head's width: the config's ``head_dim``, else hidden / heads."""
    heads = config.num_attention_heads
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"num_attention_heads must be a positive integer, got {heads!r}")
    return getattr(config, "head_dim", None) or config.hidden_size // heads


def check_kv_heads(config: Any) -> None:
    """Refuse key/value heads that can not be shared out evenly among the query heads."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if not isinstance(kv_heads, int) or kv_heads < 1 or heads % kv_heads:
        raise ValueError(
            f"num_key_value_heads {kv_heads!r} must be a positive divisor of "
            f"num_attention_heads {heads}"
        )


def sliding_window_of(config: Any, layer: int) -> int | None:
    """The layer's sliding window: the config's ``sliding_window`` on every layer (Mistral), or
    on those ``layer_types`` calls sliding (Qwen2/3, where transformers sets it only when
    ``use_sliding_window``)."""
    layer_types = getattr(config, "layer_types", None)
    return window_of(config, layer_types is None or layer_types[layer] == "sliding_attention")


def window_of(config: Any, sliding: bool) -> int | None:
    """A sliding layer's window, the config's ``sliding_window``; None for other layers and
    where it would cover the whole context anyway."""
    window = getattr(config, "sliding_window", None)
    if not sliding or not window or window >= config.max_position_embeddings:
        return None
    return window


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of this step's positions


def check_silu(config: Any) -> None:
    """Refuse an MLP activation other than SiLU (the only one the fused gate/up applies)."""
    if config.hidden_act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {config.hidden_act!r}; supported: silu")


class LlamaAttention(nn.Module):
    def __init__(
        self, config: Any, qkv_bias: bool, o_bias: bool, qk_norm: bool, window: int | None
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = head_dim_of(config)
        check_kv_heads(config)
        self.num_kv_heads = config.num_key_value_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], bias=qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        # The first rotary_dim of each head rotate (Phi-4-mini: 3/4), the rest pass through.
        self.rotary_dim = rotary_dim(self.head_dim, rope_parameters(config)[1])
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(
            self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim**-0.5, window
        )

    def forward(
        self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata, output_only: bool = False
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        num_tokens = qkv.shape[0]
        # q and k heads share the rotation, so rotate them in one go.
        qk = qkv[:, : self.q_size + self.kv_size].view(
            num_tokens, self.num_heads + self.num_kv_heads, self.head_dim
        )
        if self.q_norm is not None and self.k_norm is not None:
            heads = self.num_heads
            qk = torch.cat((self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])), 1)
        if self.rotary_dim < self.head_dim:
            rotated = apply_rotary(qk[..., : self.rotary_dim], *rope)
            qk = torch.cat((rotated, qk[..., self.rotary_dim :]), -1)
        else:
            qk = apply_rotary(qk, *rope)
        q = qk[:, : self.num_heads].flatten(1)
        k = qk[:, self.num_heads :].flatten(1)
        v = qkv[:, self.q_size + self.kv_size :]
        return self.o_proj(self.attn(q, k, v, meta, output_only))


class LlamaMLP(nn.Module):
    """SwiGLU, ``config.intermediate_size`` wide unless ``size`` says (an MoE's shared expert)."""

    def __init__(self, config: Any, bias: bool, size: int | None = None) -> None:
        super().__init__()
        check_silu(config)
        size = size or config.intermediate_size
        self.gate_up_proj = GateUpSilu(config.hidden_size, size, bias=bias)
        self.down_proj = Linear(size, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Attention and a feed-forward block, ``mlp``: a :class:`LlamaMLP` unless given (a sparse
    MoE block, see :mod:`pagedserve.model.moe`)."""

    def __init__(
        self,
        config: Any,
        index: int,
        biases: tuple[bool, bool, bool],
        qk_norm: bool,
        mlp: nn.Module | None = None,
    ) -> None:
        super().__init__()
        qkv_bias, o_bias, mlp_bias = biases
        window = sliding_window_of(config, index)
        self.self_attn = LlamaAttention(config, qkv_bias, o_bias, qk_norm, window)
        self.mlp = mlp if mlp is not None else LlamaMLP(config, mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Granite's residual_multiplier: scales each block's output before its residual add.
        self.residual_multiplier: float | None = None

    def forward(
        self,
        rope: Rope,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
        output_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(mlp output, residual stream)``; the caller adds them (fused into the next
        norm). With ``output_only`` (the last layer) and ``meta.output_rows`` set, only those
        rows come out: the other rows' K/V are stored, the rest of their work would be unused."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(rope, hidden, meta, output_only)
        if self.residual_multiplier is not None:
            hidden = hidden * self.residual_multiplier
        if output_only and meta.output_rows is not None:
            residual = residual.index_select(0, meta.output_rows)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        hidden = self.mlp(hidden)
        if self.residual_multiplier is not None:
            hidden = hidden * self.residual_multiplier
        return hidden, residual


class LlamaModel(nn.Module):
    """The decoder stack; ``make_layer(index)`` builds each layer (default: Llama's)."""

    def __init__(
        self,
        config: Any,
        biases: tuple[bool, bool, bool],
        qk_norm: bool,
        make_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if make_layer is None:
            make_layer = partial(LlamaDecoderLayer, config, biases=biases, qk_norm=qk_norm)
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(
            rotary_dim(head_dim_of(config), scaling), config.max_position_embeddings, theta, scaling
        )
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)
        residual = None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden, residual = layer(rope, hidden, residual, meta, output_only=i == last)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama-family causal LM over the paged KV cache; ``.config`` is the transformers config."""

    # Whether each q and k head is RMS-normed (over head_dim) before the rotation.
    qk_norm = False
    # Checkpoint name prefixes of the modules outside the decoder stack.
    heads: tuple[str, ...] = ("lm_head.",)

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.packed_head: torch.Tensor | None = None
        self.packed_head_quantized: torch.Tensor | None = None
        self._embedding_blocks: QuantBlocks | None = None
        self.lm_head = (
            None
            if self.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    def rope_offset(self, prompt_len: int) -> int:
        """Where a request's rows of the RoPE table start (longrope's long rows for a long
        prompt; see :class:`RotaryEmbedding`); the runner adds it to the request's positions."""
        return self.model.rotary_emb.rope_offset(prompt_len)

    def build_model(self, config: Any) -> nn.Module:
        """The decoder stack (``embed_tokens``, ``layers``, ``norm``), named as in checkpoints."""
        return LlamaModel(config, self.biases(config), self.qk_norm)

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool, bool]:
        """Whether (q/k/v, o, mlp) projections have a bias."""
        attention_bias = bool(getattr(config, "attention_bias", False))
        return attention_bias, attention_bias, bool(getattr(config, "mlp_bias", False))

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Hidden states ``[T, H]``, or only ``meta.output_rows`` ``[N, H]`` when that is set."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, H]`` -> float32 logits ``[N, vocab]``; call it only on the rows that sample."""
        if self.lm_head is not None:
            return self.lm_head(hidden).float()
        packed = packed_for(hidden, self.packed_head, self.packed_head_quantized)
        return linear(hidden, self.model.embed_tokens.weight, None, packed).float()

    def prepack(self, panel_dtype: torch.dtype = torch.float32, with_head: bool = True) -> None:
        """Pack every projection's weight (the lm head's too, unless ``with_head`` is false;
        a tied one from the embedding) for the fast CPU GEMM path, in ``panel_dtype``;
        bfloat16 panels let prefill attention multiply in bfloat16 too."""
        for module in self.modules():
            if isinstance(module, Linear):
                module.prepack(panel_dtype)
            if isinstance(module, Attention):
                module.bf16_products = panel_dtype == torch.bfloat16
        if self.lm_head is None and with_head:
            self.packed_head = pack_weight(self.model.embed_tokens.weight, False, panel_dtype)
            blocks, self._embedding_blocks = self._embedding_blocks, None
            if self.packed_head is not None and blocks is not None:
                self.packed_head_quantized = pack_quantized(blocks)

    def load_quantized(self, blocks: Iterable[tuple[str, QuantBlocks]]) -> None:
        """Hand each projection (and a tied lm head) the blocks (a GGUF file's) that its weight
        was dequantized from, for :meth:`prepack`."""
        for name, tensor_blocks in blocks:
            if name == "model.embed_tokens.weight":
                if self.lm_head is None:  # the embedding is the head
                    self._embedding_blocks = tensor_blocks
                continue
            parent, _, leaf = name.removesuffix(".weight").rpartition(".")
            fused, shard = STACKED.get(leaf, (leaf, None))  # None: the whole weight
            module = self.get_submodule(f"{parent}.{fused}") if parent else getattr(self, leaf)
            if isinstance(module, Linear):
                module.set_quantized(shard, tensor_blocks)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy Hugging Face–named tensors into the (fused) parameters; every parameter must be
        filled exactly once, and an unknown name is an error. A bare decoder's names
        (``layers.0...``, as ``LlamaModel`` saves them for embedding models) take the ``model.``
        prefix."""
        params = dict(self.named_parameters())
        expected = self._expected_pieces()
        loaded: set[tuple[str, int | None]] = set()
        for name, tensor in weights:
            if not name.startswith(("model.", *self.heads)):
                name = f"model.{name}"
            check_floating(name, tensor)
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name == ROPE_FREQ_FACTORS:
                self.model.rotary_emb.set_freq_factors(tensor)
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            module_path, _, param_name = name.rpartition(".")
            parent, _, leaf = module_path.rpartition(".")
            if leaf in STACKED:
                fused, shard = STACKED[leaf]
                module = self.get_submodule(f"{parent}.{fused}")
                module.load_shard(shard, param_name, tensor, source=name)
                piece = (f"{parent}.{fused}.{param_name}", shard)
            elif name in params:
                param = params[name]
                if tensor.shape != param.shape:
                    raise ValueError(
                        f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                        f"model shape {tuple(param.shape)}"
                    )
                param.data.copy_(tensor)
                # A checkpoint that stores q/k/v or gate/up fused (Phi-3) fills every shard.
                module = self.get_submodule(module_path)
                if isinstance(module, MergedLinear):
                    loaded.update((name, shard) for shard in range(module.num_shards))
                    continue
                piece = (name, None)
            else:
                raise ValueError(f"checkpoint weight {name!r} matches no model parameter")
            loaded.add(piece)
        check_complete(f"{n}[{s}]" if s is not None else n for n, s in expected - loaded)

    def _expected_pieces(self) -> set[tuple[str, int | None]]:
        pieces: set[tuple[str, int | None]] = set()
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if isinstance(module, MergedLinear):
                    pieces.update((full, shard) for shard in range(len(module.output_sizes)))
                else:
                    pieces.add((full, None))
        return pieces


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: the Llama layout with a bias on q/k/v (and none on o or the MLP)."""

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool, bool]:
        return True, False, False


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: the Llama layout (q/k/v bias as ``attention_bias`` says) with each q and k head
    RMS-normed before the rotation, and a ``head_dim`` of its own (128 where hidden / heads is
    64 or 80)."""

    qk_norm = True


class _ScoreHead:
    """A decoder classifier's head (transformers' ``*ForSequenceClassification``: reward models,
    classifiers): ``score``, a bias-free linear layer on the last token's final state."""

    heads = ("lm_head.", "score.")

    def __init__(self, config: Any) -> None:
        super().__init__(config)  # type: ignore[call-arg]
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def classify(self, last_token: torch.Tensor) -> torch.Tensor:
        """The label logits ``[N, labels]`` of last-token states ``[N, H]``."""
        return self.score(last_token)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """A causal LM's checkpoint with ``classifier_from_token`` set: its score head is made
        from the lm head's rows (see :mod:`pagedserve.model.token_classifier`)."""
        if getattr(self.config, "classifier_from_token_ids", None) is not None:
            weights = with_score_weight(weights, self.config)
        super().load_weights(weights)  # type: ignore[misc]


class LlamaForSequenceClassification(_ScoreHead, LlamaForCausalLM):
    """Llama or Mistral with a classification head (run as a pooling model)."""


class Qwen2ForSequenceClassification(_ScoreHead, Qwen2ForCausalLM):
    """Qwen2 with a classification head (run as a pooling model)."""


class Qwen3ForSequenceClassification(_ScoreHead, Qwen3ForCausalLM):
    """Qwen3 with a classification head (run as a pooling model)."""
