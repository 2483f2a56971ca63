"""Pure-decode steps on the CPU through all the decoder layers in one C call.

The CPU counterpart of :mod:`pagedserve.worker.decode_graphs`: a step in which every request
decodes one token runs the same kernels as the modules, in the same order, but from the C driver
of :mod:`pagedserve.kernels.decoder_stack` instead of nine Python-wrapped calls per layer. At one
sequence that halves the step (SmolLM2-135M: 3.7 against 7.1 ms). The embedding, the RoPE table
lookup and the lm head stay in PyTorch, one call each.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.kernels import elementwise
from pagedserve.kernels.decoder_stack import (
    DecoderStack,
    Layer,
    Projection,
    Term,
    WithAdapters,
    gate_width,
    gated_order,
)
from pagedserve.model.layers.attention import AttentionMetadata
from pagedserve.model.layers.linear import Linear, quantized_max_rows
from pagedserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM


def _projection(linear: Linear) -> Projection | None:
    if linear.packed is None:
        return None
    bias = None if linear.bias is None else linear.bias.detach()
    return Projection(linear.packed, linear.packed_quantized, bias)


def _layer(layer: LlamaDecoderLayer) -> Layer | None:
    """The layer for the driver; None where a module would not take the C path."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = [
        _projection(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    ]
    norms = [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
    head_norms = [None if n is None else n.weight.detach() for n in (attn.q_norm, attn.k_norm)]
    pools = (attn.attn.k_cache, attn.attn.v_cache)
    if None in projections or pools[0] is None or pools[1] is None:
        return None
    present = [n for n in head_norms if n is not None]
    if attn.attn.backend != "fast" or not elementwise.supports(*norms, *present):
        return None
    qkv, o, gate_up, down = projections
    return Layer(*norms, *head_norms, qkv, o, gate_up, down, *pools, attn.attn.sliding_window)


class CpuDecodeStack:
    """A Llama-family model's pure-decode steps through :class:`DecoderStack`; build it with
    :meth:`build` once the KV pools are assigned to the attention layers."""

    def __init__(self, model: LlamaForCausalLM, stack: DecoderStack) -> None:
        self.model = model
        self.stack = stack
        self._terms: dict[int, list[tuple[Term | None, ...]]] = {}  # by adapter id (never reused)
        self._built: dict[tuple[int, ...], WithAdapters] = {}  # by the step's adapters
        mlps = [layer.mlp.gate_up_proj for layer in model.model.layers]
        # The driver adds an adapter's gate/up term in the gated panels' column order.
        self.takes_adapters = all(m.bias is None and m.size % gate_width() == 0 for m in mlps)

    @classmethod
    def build(cls, model: nn.Module, block_size: int) -> CpuDecodeStack | None:
        """The stack of ``model``, or None where its decode steps cannot take it: another
        architecture, weights not packed for the C GEMM (not float32 on the CPU), the reference
        attention backend, or a kernel not built here."""
        if not isinstance(model, LlamaForCausalLM):
            return None
        if not all(type(layer) is LlamaDecoderLayer for layer in model.model.layers):
            return None  # another layer layout (Gemma 3)
        inner = model.model
        layers = [_layer(layer) for layer in inner.layers]
        norms = [inner.norm]
        for layer in inner.layers:
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
            norms += [n for n in (layer.self_attn.q_norm, layer.self_attn.k_norm) if n is not None]
        final_norm = inner.norm.weight.detach()
        if None in layers or len({n.eps for n in norms}) != 1:
            return None
        if not elementwise.supports(final_norm, inner.rotary_emb.cos_sin):
            return None
        attention = inner.layers[0].self_attn
        if attention.rotary_dim != attention.head_dim:
            return None  # the driver rotates whole heads
        shapes = {
            "hidden": model.config.hidden_size,
            "num_heads": attention.num_heads,
            "num_kv_heads": attention.num_kv_heads,
            "head_dim": attention.head_dim,
            "intermediate": inner.layers[0].mlp.gate_up_proj.size,
            "block_size": block_size,
        }
        stack = DecoderStack.create(
            layers,
            final_norm,
            shapes,
            inner.norm.eps,
            attention.attn.scale,
            quantized_max_rows(layers[0].qkv.panels),
        )
        return None if stack is None else cls(model, stack)

    def adapters(
        self, groups: list[tuple[torch.Tensor | None, int]], rows: int
    ) -> tuple[WithAdapters, torch.Tensor] | None:
        """For a step whose ``rows`` rows run with LoRA adapters (``groups``: each adapter's rows,
        None for all of them), the structures with their terms and each row's slot among them;
        None where the driver cannot add them."""
        if not self.takes_adapters:
            return None
        ids = tuple(adapter for _, adapter in groups)
        built = self._built.get(ids)
        if built is None:
            if len(self._built) >= _MAX_ADAPTER_SETS:
                self._built.clear()
            built = self._built[ids] = self.stack.with_adapters([self._terms_of(i) for i in ids])
        slots = torch.full((rows,), -1, dtype=torch.int32)
        for slot, (group_rows, _) in enumerate(groups):
            if group_rows is None:
                slots.fill_(slot)
            else:
                slots[group_rows] = slot
        return built, slots

    def _terms_of(self, adapter_id: int) -> list[tuple[Term | None, ...]]:
        """Adapter ``adapter_id``'s terms, per layer; those of unloaded adapters are dropped."""
        layers = self.model.model.layers
        if adapter_id not in self._terms:
            loaded = {i for layer in layers for i in _linears(layer)[0].lora.adapters}
            self._terms = {i: t for i, t in self._terms.items() if i in loaded}
            self._built = {k: b for k, b in self._built.items() if set(k) <= loaded}
            self._terms[adapter_id] = [
                tuple(_term(m, adapter_id) for m in _linears(layer)) for layer in layers
            ]
        return self._terms[adapter_id]

    def applies(self, meta: AttentionMetadata, num_sampling: int) -> bool:
        """Whether the step is pure decode with every request sampling (``split_decodes`` ran)."""
        return not meta.prefill_reqs and num_sampling == meta.num_reqs

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        adapters: tuple[WithAdapters, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The step's final hidden states ``[B, H]``, as ``model(input_ids, positions, meta)``
        returns them (with the terms of the step's ``adapters``, see :meth:`adapters`)."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        rope = inner.rotary_emb.cos_sin[positions]
        return self.stack.decode(
            hidden, rope, meta.slot_mapping, meta.block_tables, meta.seq_lens, adapters
        )


# Sets of adapters whose structures are kept (built again on a step of a set not kept).
_MAX_ADAPTER_SETS = 16


def _linears(layer: LlamaDecoderLayer) -> tuple[Linear, ...]:
    """The layer's projections, in :data:`decoder_stack.PROJECTIONS`' order."""
    attn, mlp = layer.self_attn, layer.mlp
    return attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj


def _term(linear: Linear, adapter_id: int) -> Term | None:
    """An adapter's term on a projection for the driver: A, and B transposed (a gate/up one in
    the gated panels' column order); None where the adapter does not target it."""
    stacked = None if linear.lora is None else linear.lora.adapters.get(adapter_id)
    if stacked is None:
        return None
    bt = stacked.b.t()
    if linear.gated:
        bt = bt[:, gated_order(linear.out_features // 2)]
    return stacked.a.contiguous(), bt.contiguous()
