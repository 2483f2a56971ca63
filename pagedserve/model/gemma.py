"""Gemma 2 (``Gemma2ForCausalLM``) and Gemma 3's text model (``Gemma3ForCausalLM``: Gemma 3 1B;
the text half of ``Gemma3ForConditionalGeneration``: 4B, 12B, 27B), and Gemma 1
(``GemmaForCausalLM``).

They share the Llama layout's attention, weight loading, packing and tied lm head
(:mod:`pagedserve.model.llama`). What differs:

- the embedding is multiplied by sqrt(hidden), rounded to the model's dtype as transformers
  rounds it;
- every norm is Gemma's ``1 + weight`` one, and each layer also norms its attention's and its
  MLP's output before adding it to the residual stream (four norms a layer);
- scores are scaled by ``query_pre_attn_scalar ** -0.5``; Gemma 3 norms each q and k head
  before the rotation, Gemma 2 soft-caps the scores (``attn_logit_softcapping``);
- the layers ``layer_types`` calls sliding (Gemma 2: every other one, Gemma 3: five in six) see
  a window of ``sliding_window`` positions; in Gemma 3 they rotate with a local RoPE base, the
  others with the global base and its scaling;
- the MLP is GeGLU (tanh-approximated GELU), and logits may be soft-capped
  (``final_logit_softcapping``).

Gemma 1 has the scaled embedding, the ``1 + weight`` norms and GeGLU, but the Llama layer
otherwise: two norms a layer (the input's and the MLP's input's, the latter named
``post_attention_layernorm``), scores scaled by ``head_dim ** -0.5``, no caps, no windows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.activation import gelu_tanh_and_mul
from pagedserve.model.layers.attention import AttentionMetadata
from pagedserve.model.layers.embedding import Embedding
from pagedserve.model.layers.linear import Linear, MergedLinear
from pagedserve.model.layers.norm import GemmaRMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding, rope_parameters
from pagedserve.model.llama import LlamaAttention, LlamaForCausalLM, Rope, head_dim_of, window_of

SLIDING = "sliding_attention"


def layer_types(config: Any) -> list[str]:
    """Each layer's attention, ``sliding_attention`` or ``full_attention``; configs that predate
    ``layer_types`` give every ``sliding_window_pattern``-th layer full attention."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    pattern = getattr(config, "sliding_window_pattern", 2)  # Gemma 2: every other layer
    return [
        "full_attention" if (i + 1) % pattern == 0 else SLIDING
        for i in range(config.num_hidden_layers)
    ]


def layer_rope(config: Any, layer_type: str) -> tuple[float, dict[str, Any]]:
    """``(theta, scaling)`` of the layers of ``layer_type``. Gemma 3 has two: transformers 5
    keeps one ``rope_parameters`` entry per layer type, transformers 4 a
    ``rope_local_base_freq`` for the sliding layers beside ``rope_theta`` + ``rope_scaling``.
    Gemma 2 has one for all layers."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params:
        return rope_parameters(SimpleNamespace(rope_parameters=params[layer_type]))
    local_base = getattr(config, "rope_local_base_freq", None)
    if layer_type == SLIDING and local_base is not None:
        return float(local_base), {"rope_type": "default"}
    return rope_parameters(config)


class GemmaAttention(LlamaAttention):
    def __init__(self, config: Any, window: int | None, qk_norm: bool) -> None:
        bias = bool(getattr(config, "attention_bias", False))
        super().__init__(config, bias, bias, qk_norm=qk_norm, window=window)
        if qk_norm:
            self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn.scale = config.query_pre_attn_scalar**-0.5
        self.attn.softcap = getattr(config, "attn_logit_softcapping", None)


class GeGLU(nn.Module):
    """``down(gelu_tanh(gate(x)) * up(x))``, gate and up in one GEMM, the activation in one C pass
    (float32 on the CPU; the decode stack of :mod:`pagedserve.worker.cpu_decode` calls it too)."""

    def __init__(self, config: Any, field: str) -> None:
        """``field``: the config's name for the activation (Gemma 2 / 3: ``hidden_activation``,
        Gemma 1: ``hidden_act``), which must be the tanh-approximated GELU."""
        super().__init__()
        activation = getattr(config, field)
        if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ValueError(f"unsupported {field} {activation!r}; supported: gelu_pytorch_tanh")
        size = config.intermediate_size
        self.gate_up_proj = MergedLinear(config.hidden_size, [size, size])
        self.down_proj = Linear(size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu_tanh_and_mul(self.gate_up_proj(x)))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, index: int, qk_norm: bool) -> None:
        super().__init__()
        self.sliding = layer_types(config)[index] == SLIDING
        self.self_attn = GemmaAttention(config, window_of(config, self.sliding), qk_norm)
        self.mlp = GeGLU(config, "hidden_activation")
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(size, eps)

    def forward(
        self, rope: Rope, hidden: torch.Tensor, meta: AttentionMetadata, output_only: bool = False
    ) -> torch.Tensor:
        """The residual stream after this layer; with ``output_only`` (the last layer) and
        ``meta.output_rows`` set, only those rows (as :class:`LlamaDecoderLayer` does)."""
        attended = self.self_attn(rope, self.input_layernorm(hidden), meta, output_only)
        if output_only and meta.output_rows is not None:
            hidden = hidden.index_select(0, meta.output_rows)
        hidden = hidden + self.post_attention_layernorm(attended)
        mlp_out = self.mlp(self.pre_feedforward_layernorm(hidden))
        return hidden + self.post_feedforward_layernorm(mlp_out)


class Gemma1DecoderLayer(nn.Module):
    """Gemma 1's layer: the Llama layer's attention, Gemma's norms and GeGLU."""

    sliding = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", None):
            raise ValueError("bidirectional Gemma (use_bidirectional_attention) is not supported")
        bias = bool(getattr(config, "attention_bias", False))
        self.self_attn = LlamaAttention(config, bias, bias, qk_norm=False, window=None)
        self.mlp = GeGLU(config, "hidden_act")
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = GemmaRMSNorm(size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(size, eps)  # the MLP's input norm

    def forward(
        self, rope: Rope, hidden: torch.Tensor, meta: AttentionMetadata, output_only: bool = False
    ) -> torch.Tensor:
        """As :meth:`GemmaDecoderLayer.forward`, without the outputs' norms."""
        attended = self.self_attn(rope, self.input_layernorm(hidden), meta, output_only)
        if output_only and meta.output_rows is not None:
            hidden = hidden.index_select(0, meta.output_rows)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GemmaModel(nn.Module):
    """The decoder stack of every Gemma; ``make_layer(index)`` builds each layer."""

    def __init__(self, config: Any, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size**0.5), persistent=False)
        head_dim, max_positions = head_dim_of(config), config.max_position_embeddings
        full, local = layer_rope(config, "full_attention"), layer_rope(config, SLIDING)
        self.rotary_emb = RotaryEmbedding(head_dim, max_positions, *full)
        # Where both kinds of layer rotate alike (Gemma 1 and 2), they share one table.
        self.rotary_emb_local = (
            self.rotary_emb if local == full else RotaryEmbedding(head_dim, max_positions, *local)
        )
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids) * self.embed_scale
        full = self.rotary_emb(positions)
        shared = self.rotary_emb_local is self.rotary_emb
        local = full if shared else self.rotary_emb_local(positions)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(local if layer.sliding else full, hidden, meta, output_only=i == last)
        return self.norm(hidden)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """Gemma 2 over the paged KV cache (and the base of Gemma 3); see the module docstring."""

    qk_norm = False

    def build_model(self, config: Any) -> nn.Module:
        return GemmaModel(config, lambda i: GemmaDecoderLayer(config, i, self.qk_norm))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def prepack(self, panel_dtype: torch.dtype = torch.float32, with_head: bool = True) -> None:
        super().prepack(panel_dtype, with_head)
        for module in self.modules():
            if isinstance(module, GemmaRMSNorm):
                module.prepare()


class GemmaForCausalLM(Gemma2ForCausalLM):
    """Gemma 1: Gemma 2's model with the plainer layer (see the module docstring); its config
    has no soft caps."""

    def build_model(self, config: Any) -> nn.Module:
        return GemmaModel(config, lambda i: Gemma1DecoderLayer(config))


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    """Gemma 3's text model: Gemma 2 with q/k norms and a RoPE base per layer type."""

    qk_norm = True


# Gemma3ForConditionalGeneration's checkpoint names (the Hub's files, then transformers 5's own
# layout) -> the text model's.
_TEXT_PREFIXES = (
    ("language_model.model.", "model."),
    ("model.language_model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)


def text_weights(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """A multimodal Gemma 3 checkpoint's text-model tensors, renamed as the text model's."""
    for name, tensor in weights:
        if name.startswith(_VISION_PREFIXES):
            continue
        for prefix, ours in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = ours + name.removeprefix(prefix)
                break
        yield name, tensor


class Gemma3TextOfMultimodal(Gemma3ForCausalLM):
    """The text model of ``Gemma3ForConditionalGeneration`` (Gemma 3 4B, 12B, 27B), served
    alone: the vision tower is not loaded, so requests carry text only (images are a 400, as
    for every model here). ``.config`` is the text config."""

    def __init__(self, config: Any) -> None:
        super().__init__(config.get_text_config())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(text_weights(weights))
