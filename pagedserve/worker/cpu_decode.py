"""Pure-decode steps on the CPU through all the decoder layers in one C call.

The CPU counterpart of :mod:`pagedserve.worker.decode_graphs`: a step in which every request
decodes one token runs the same kernels as the modules, in the same order, but from the C driver
of :mod:`pagedserve.kernels.decoder_stack` instead of nine Python-wrapped calls per layer. At one
sequence that halves the step (SmolLM2-135M: 3.7 against 7.1 ms). The embedding (Gemma's scaled
by sqrt(hidden), Granite's by its embedding multiplier), the RoPE tables' lookup (Gemma 2 and 3:
the global and the local one) and the lm head (with Granite's logits scaling) stay in PyTorch,
one call each. Granite's layers go through the driver with their residual multiplier, Gemma's
with GeGLU, Gemma 2 and 3's with their four norms, soft-capped scores (Gemma 2) and a RoPE table
per layer type, OLMo 2's with their norms after the blocks and their q/k norms over the whole
projections.
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
from pagedserve.model.gemma import GeGLU, Gemma1DecoderLayer, GemmaDecoderLayer, GemmaModel
from pagedserve.model.granite import GraniteDecoderLayer
from pagedserve.model.layers.attention import AttentionMetadata
from pagedserve.model.layers.linear import GateUpSilu, Linear, quantized_max_rows
from pagedserve.model.layers.norm import GemmaRMSNorm, RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding
from pagedserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM
from pagedserve.model.olmo2 import Olmo2DecoderLayer

DecoderLayer = LlamaDecoderLayer | GemmaDecoderLayer | Gemma1DecoderLayer | Olmo2DecoderLayer
# The layers the driver runs.
_LAYERS = (
    LlamaDecoderLayer,
    GraniteDecoderLayer,
    GemmaDecoderLayer,
    Gemma1DecoderLayer,
    Olmo2DecoderLayer,
)


def _projection(linear: Linear) -> Projection | None:
    if linear.packed is None:
        return None
    bias = None if linear.bias is None else linear.bias.detach()
    return Projection(linear.packed, linear.packed_quantized, bias)


def _weight(norm: RMSNorm | GemmaRMSNorm) -> torch.Tensor:
    """The vector a norm's C kernel multiplies by: Gemma's is ``1 + weight`` in float32 (the
    one :meth:`GemmaRMSNorm.prepare` keeps, else the one its forward computes)."""
    if isinstance(norm, GemmaRMSNorm):
        return norm.scale if norm.scale is not None else 1.0 + norm.weight.detach().float()
    return norm.weight.detach()


def _layer(layer: DecoderLayer, local_table: int) -> Layer | None:
    """The layer for the driver; None where a module would not take the C path.
    ``local_table``: the :func:`_rope_tables` index a sliding Gemma layer rotates with."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = [
        _projection(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    ]
    gemma = isinstance(layer, GemmaDecoderLayer)
    # The input's and the MLP's input's norms, then the outputs' (see Layer; None: none).
    if gemma:
        ordered = [layer.input_layernorm, layer.pre_feedforward_layernorm]
        ordered += [layer.post_attention_layernorm, layer.post_feedforward_layernorm]
    elif isinstance(layer, Olmo2DecoderLayer):
        ordered = [None, None, layer.post_attention_layernorm, layer.post_feedforward_layernorm]
    else:
        ordered = [layer.input_layernorm, layer.post_attention_layernorm, None, None]
    norms = [None if n is None else _weight(n) for n in (*ordered, attn.q_norm, attn.k_norm)]
    pools = (attn.attn.k_cache, attn.attn.v_cache)
    if None in projections or pools[0] is None or pools[1] is None:
        return None
    present = [n for n in norms if n is not None]
    if attn.attn.backend != "fast" or not elementwise.supports(*present):
        return None
    qkv, o, gate_up, down = projections
    before, after, head_norms = norms[:2], norms[2:4], norms[4:]
    fields = Layer(*before, *head_norms, qkv, o, gate_up, down, *pools, attn.attn.sliding_window)
    fields.attn_out_norm, fields.mlp_out_norm = after
    if gemma:
        fields.rope_table = local_table if layer.sliding else 0
    return fields


def _rope_tables(inner: nn.Module) -> list[RotaryEmbedding]:
    """The RoPE tables that :attr:`Layer.rope_table` indexes: the global one, then Gemma 3's
    local one (Gemma 1 and 2 rotate every layer with the global table)."""
    local = getattr(inner, "rotary_emb_local", inner.rotary_emb)
    return [inner.rotary_emb] if local is inner.rotary_emb else [inner.rotary_emb, local]


class CpuDecodeStack:
    """A Llama-family, Granite, Gemma or OLMo 2 model's pure-decode steps through
    :class:`DecoderStack`; build it with :meth:`build` once the KV pools are assigned to the
    attention layers."""

    def __init__(self, model: LlamaForCausalLM, stack: DecoderStack) -> None:
        self.model = model
        self.stack = stack
        inner = model.model
        self._embed_scale = inner.embed_scale if isinstance(inner, GemmaModel) else None
        self._ropes = _rope_tables(inner)
        self._terms: dict[int, list[tuple[Term | None, ...]]] = {}  # by adapter id (never reused)
        self._built: dict[tuple[int, ...], WithAdapters] = {}  # by the step's adapters
        mlps = [layer.mlp.gate_up_proj for layer in model.model.layers]
        # The driver adds an adapter's gate/up term in the gated panels' column order (Gemma's
        # GeGLU: steps with adapters run module by module).
        self.takes_adapters = all(
            isinstance(m, GateUpSilu) and m.bias is None and m.size % gate_width() == 0
            for m in mlps
        )

    @classmethod
    def build(cls, model: nn.Module, block_size: int) -> CpuDecodeStack | None:
        """The stack of ``model``, or None where its decode steps cannot take it: another
        architecture (a Mixture-of-Experts one too), weights not packed for the C GEMM (not
        float32 on the CPU), the reference attention backend, or a kernel not built here."""
        if not isinstance(model, LlamaForCausalLM) or getattr(model, "is_moe", False):
            return None  # another architecture, or a Mixture-of-Experts one (model/moe.py)
        kinds = {type(layer) for layer in model.model.layers}
        if len(kinds) != 1 or kinds.pop() not in _LAYERS:
            return None  # another layer layout, or a mix of them
        inner = model.model
        residual_scale = getattr(inner.layers[0], "residual_multiplier", None)
        if residual_scale == 0.0:
            return None  # the driver reads 0 as no multiplier
        layers = [_layer(layer, len(_rope_tables(inner)) - 1) for layer in inner.layers]
        norms = [m for m in inner.modules() if isinstance(m, (RMSNorm, GemmaRMSNorm))]
        final_norm = _weight(inner.norm)
        if None in layers or len({n.eps for n in norms}) != 1:
            return None
        tables = [rope.cos_sin for rope in _rope_tables(inner)]
        if not elementwise.supports(final_norm, *tables):
            return None
        attention = inner.layers[0].self_attn
        if attention.rotary_dim != attention.head_dim:
            return None  # the driver rotates whole heads
        scoring = {
            (layer.self_attn.attn.scale, layer.self_attn.attn.softcap) for layer in inner.layers
        }
        if len(scoring) != 1:
            return None
        shapes = {
            "hidden": model.config.hidden_size,
            "num_heads": attention.num_heads,
            "num_kv_heads": attention.num_kv_heads,
            "head_dim": attention.head_dim,
            "intermediate": inner.layers[0].mlp.down_proj.in_features,
            "block_size": block_size,
        }
        stack = DecoderStack.create(
            layers,
            final_norm,
            shapes,
            inner.norm.eps,
            attention.attn.scale,
            quantized_max_rows(layers[0].qkv.panels),
            attention.attn.softcap,
            isinstance(inner.layers[0].mlp, GeGLU),
            None if residual_scale == 1.0 else residual_scale,  # a multiply by 1 changes nothing
            isinstance(inner.layers[0], Olmo2DecoderLayer),
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
        hidden = self.model.model.embed_tokens(input_ids)
        if self._embed_scale is not None:
            hidden = hidden * self._embed_scale  # as GemmaModel.forward scales it
        if len(self._ropes) == 1:
            rope = self._ropes[0].cos_sin[positions]
        else:
            rope = torch.cat([r.cos_sin[positions] for r in self._ropes])
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
