"""Mixture-of-Experts decoders: Mixtral, Qwen2-MoE and Qwen3-MoE.

They are the Llama layout (:mod:`pagedserve.model.llama`: its attention, norms, rotary, lm head,
packing) with a sparse MoE block (:mod:`pagedserve.model.layers.fused_moe`) in place of the
MLP:

- Mixtral: Llama attention, a ``sliding_window`` on every layer where the config sets one;
  every layer sparse, the top-k weights always renormalised;
- Qwen2-MoE: a bias on q/k/v (``qkv_bias``), a shared expert behind a sigmoid gate;
- Qwen3-MoE: q and k heads RMS-normed, no bias (``attention_bias``);
- in the Qwen models a layer is sparse unless ``mlp_only_layers`` lists it or
  ``decoder_sparse_step`` skips it (a dense MLP of ``intermediate_size`` then), and the top-k
  weights are renormalised where ``norm_topk_prob``.

Checkpoints load with the Hub's per-expert names (``block_sparse_moe.experts.E.w1`` for Mixtral,
``mlp.experts.E.gate_proj`` for Qwen) or transformers 5's stacked ones (``mlp.experts.gate_up_proj``).
Decode steps run module by module: the C decode stack of :mod:`pagedserve.worker.cpu_decode`
declines these models, and CUDA graphs are not captured (the experts a step runs depend on its
data).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.fused_moe import FusedExperts, SparseMoeBlock
from pagedserve.model.llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    check_silu,
)
from pagedserve.model.strict_loading import check_complete

# Mixtral's Hub checkpoints call the MoE block ``block_sparse_moe``; ours is ``mlp``.
_MIXTRAL_BLOCK = ".block_sparse_moe."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(config: Any, field: str, default: int | None = None) -> int:
    """The config's ``field`` (``default`` where it is absent or null), which must be an integer
    of at least 1."""
    value = getattr(config, field, None)
    value = default if value is None else value
    if not _is_int(value) or value < 1:
        raise ValueError(f"{field} must be a positive integer, got {value!r}")
    return value


class MoeDecoderLayer(LlamaDecoderLayer):
    """A Llama decoder layer whose feed-forward block may be sparse; its own type so that the
    paths built for dense Llama layers (the C decode stack) never take it."""


class MoeForCausalLM(LlamaForCausalLM):
    """The common part: layers with a sparse block where :meth:`is_sparse` says, loading of the
    stacked expert weights, their packing. ``.config`` is the transformers config."""

    # Read by the engine and the model runner: MoE models refuse LoRA, capture no CUDA graphs.
    is_moe = True

    def build_model(self, config: Any) -> nn.Module:
        check_silu(config)
        self.check_layout(config)
        biases, qk_norm = self.biases(config), self.qk_norm

        def make_layer(index: int) -> nn.Module:
            mlp = self.sparse_block(config) if self.is_sparse(config, index) else None
            return MoeDecoderLayer(config, index, biases, qk_norm, mlp)

        return LlamaModel(config, biases, qk_norm, make_layer)

    @staticmethod
    def check_layout(config: Any) -> None:
        """Refuse a config whose choice of sparse layers (``num_experts``: 0 for none,
        ``decoder_sparse_step``) means nothing, where transformers would divide by zero. An
        ``mlp_only_layers`` index that names no layer is ignored, as transformers and vLLM
        ignore it."""
        experts = config.num_experts
        if not _is_int(experts) or experts < 0:
            raise ValueError(f"num_experts must be an integer >= 0, got {experts!r}")
        positive_int(config, "decoder_sparse_step", default=1)

    @staticmethod
    def is_sparse(config: Any, index: int) -> bool:
        """Whether layer ``index`` has the sparse block (else a dense MLP)."""
        if index in (getattr(config, "mlp_only_layers", None) or []):
            return False
        step = getattr(config, "decoder_sparse_step", 1) or 1
        return config.num_experts > 0 and (index + 1) % step == 0

    def sparse_block(self, config: Any) -> SparseMoeBlock:
        return SparseMoeBlock(
            config.hidden_size,
            config.num_experts,
            config.num_experts_per_tok,
            positive_int(config, "moe_intermediate_size"),
            bool(getattr(config, "norm_topk_prob", False)),
            self.shared_expert(config),
        )

    def shared_expert(self, config: Any) -> nn.Module | None:
        """The expert every token goes through beside its routed ones, if the model has one."""
        return None

    def prepack(self, panel_dtype: torch.dtype = torch.float32, with_head: bool = True) -> None:
        super().prepack(panel_dtype, with_head)
        for module in self.modules():
            if isinstance(module, FusedExperts):
                module.prepack(panel_dtype)

    def load_quantized(self, blocks: Iterable[Any]) -> None:
        raise ValueError(
            f"{type(self).__name__}: quantized (GGUF) weights are not supported for "
            "Mixture-of-Experts models"
        )

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """As :meth:`LlamaForCausalLM.load_weights`, the experts' tensors going into their
        stacked weights; every expert's every projection must be filled."""
        experts = {n: m for n, m in self.named_modules() if isinstance(m, FusedExperts)}
        loaded: set[tuple[str, str, int, int | None]] = set()

        def dense(pairs: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in pairs:
                name = name.replace(_MIXTRAL_BLOCK, ".mlp.")
                if not name.startswith(("model.", *self.heads)):
                    name = f"model.{name}"
                owner, found, rest = name.partition(".experts.")
                module = experts.get(f"{owner}.experts") if found else None
                if module is None:
                    yield name, tensor
                    continue
                loaded.update((owner, *piece) for piece in module.load(rest, tensor, name))

        super().load_weights(dense(weights))
        expected = {
            (n.removesuffix(".experts"), *p) for n, m in experts.items() for p in m.pieces()
        }
        check_complete(
            f"{owner}.experts.{param}[{expert}]" + ("" if shard is None else f"[{shard}]")
            for owner, param, expert, shard in expected - loaded
        )

    def _expected_pieces(self) -> set[tuple[str, int | None]]:
        """The dense parameters' pieces (the experts' are checked by :meth:`load_weights`)."""
        stacked = {
            f"{name}.{param}"
            for name, module in self.named_modules()
            if isinstance(module, FusedExperts)
            for param, _ in module.named_parameters(recurse=False)
        }
        return {piece for piece in super()._expected_pieces() if piece[0] not in stacked}


class MixtralForCausalLM(MoeForCausalLM):
    """Mixtral: every layer sparse (``num_local_experts`` experts of ``intermediate_size``),
    the top-k weights renormalised."""

    @staticmethod
    def check_layout(config: Any) -> None:
        positive_int(config, "num_local_experts")

    @staticmethod
    def is_sparse(config: Any, index: int) -> bool:
        return True

    def sparse_block(self, config: Any) -> SparseMoeBlock:
        return SparseMoeBlock(
            config.hidden_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            config.intermediate_size,
            renormalize=True,
        )


class Qwen2MoeForCausalLM(MoeForCausalLM):
    """Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): q/k/v bias, a gated shared expert."""

    @staticmethod
    def biases(config: Any) -> tuple[bool, bool, bool]:
        return bool(getattr(config, "qkv_bias", True)), False, False

    def shared_expert(self, config: Any) -> nn.Module | None:
        size = positive_int(config, "shared_expert_intermediate_size")
        return LlamaMLP(config, bias=False, size=size)


class Qwen3MoeForCausalLM(MoeForCausalLM):
    """Qwen3-MoE (Qwen3-30B-A3B, 235B-A22B): q/k heads RMS-normed, no shared expert."""

    qk_norm = True
