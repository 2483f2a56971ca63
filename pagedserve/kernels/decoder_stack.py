"""Python face of ``decoder_stack.c``: a decode step through every decoder layer in one C call
(Llama-family, Granite, Gemma and OLMo 2 layers).

The driver calls the other C kernels (packed GEMM, norms, rotary, K/V store, decode attention)
through their entry points, taken here from the very builds that the modules call, so its
results equal the module-by-module forward's bit for bit (a step with a LoRA adapter's terms:
up to rounding).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch

from pagedserve.kernels import elementwise, kv_store, packed_gemm, paged_decode_attention
from pagedserve.kernels.cpu_build import bind_kernel

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p

_SHAPES = ("hidden", "num_heads", "num_kv_heads", "head_dim", "intermediate", "block_size")


class _Stack(ctypes.Structure):
    """``Stack`` of decoder_stack.c: the kernels' entry points, the shapes, the final norm."""

    _fields_ = [
        ("gemm_f32", _ptr),
        ("gemm_bf16", _ptr),
        ("gemm_quant", _ptr),
        ("rms_norm", _ptr),
        ("add_rms_norm", _ptr),
        ("gelu_and_mul", _ptr),
        ("rotary", _ptr),
        ("write_kv", _ptr),
        ("attention", _ptr),
        *((name, _i64) for name in _SHAPES),
        ("quant_max_rows", _i64),
        ("gate_width", _i64),
        ("plain_adds", _i64),
        ("geglu", _i64),
        ("whole_qk_norm", _i64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("softcap", ctypes.c_float),
        ("residual_scale", ctypes.c_float),
        ("final_norm", _ptr),
    ]


class _Projection(ctypes.Structure):
    _fields_ = [
        ("panels", _ptr),
        ("quantized", _ptr),
        ("quant_type", _i64),
        ("bf16_panels", _i64),
        ("bias", _ptr),
        ("lora_a", _ptr),
        ("lora_bt", _ptr),
        ("lora_rank", _ptr),
    ]


class _Layer(ctypes.Structure):
    _fields_ = [
        ("input_norm", _ptr),
        ("post_norm", _ptr),
        ("q_norm", _ptr),
        ("k_norm", _ptr),
        ("qkv", _Projection),
        ("o", _Projection),
        ("gate_up", _Projection),
        ("down", _Projection),
        ("k_cache", _ptr),
        ("v_cache", _ptr),
        ("window", _i64),
        ("rope_table", _i64),
        ("attn_out_norm", _ptr),
        ("mlp_out_norm", _ptr),
    ]


@cache
def _lib() -> ctypes.CDLL | None:
    return bind_kernel(
        "decoder_stack",
        {
            "decoder_stack_scratch": ([ctypes.POINTER(_Stack), _i64], _i64),
            "decoder_stack_decode": (
                [ctypes.POINTER(_Stack), ctypes.POINTER(_Layer)]
                + [_i64] * 2
                + [_ptr] * 5
                + [_i64]
                + [_ptr] * 3,
                None,
            ),
        },
    )


@dataclass
class Projection:
    """One projection's packed weights (:func:`packed_gemm.pack`, float32 or bfloat16, and
    :func:`packed_gemm.pack_quantized` or None) and bias (or None)."""

    panels: torch.Tensor
    quantized: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class Layer:
    """One decoder layer: its two norms' weights (the input's and the MLP's input's; OLMo 2:
    None), its q and k norms' (per head: Qwen3, Gemma 3; the whole projections': OLMo 2; else
    None), its projections (q/k/v stacked;
    gate/up stacked, packed gated but for Gemma's GeGLU), its K/V pools, its sliding window
    (None: none), the RoPE table it rotates with (an index into :meth:`DecoderStack.decode`'s
    ``rope``) and, for a Gemma 2 or 3 or an OLMo 2 layer, the norms of its attention's and its
    MLP's outputs."""

    input_norm: torch.Tensor | None
    post_norm: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    window: int | None = None  # the layer's sliding window
    rope_table: int = 0
    attn_out_norm: torch.Tensor | None = None
    mlp_out_norm: torch.Tensor | None = None


def _address(lib: ctypes.CDLL | None, name: str) -> int | None:
    return None if lib is None else ctypes.cast(getattr(lib, name), _ptr).value


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _projection_struct(p: Projection) -> _Projection:
    quant_type = 0 if p.quantized is None else packed_gemm.quant_type_of(p.quantized)
    bf16 = p.panels.dtype == torch.bfloat16
    return _Projection(
        _pointer(p.panels),
        _pointer(p.quantized),
        quant_type,
        bf16,
        _pointer(p.bias),
        None,
        None,
        None,
    )


def _layer_struct(layer: Layer) -> _Layer:
    return _Layer(
        _pointer(layer.input_norm),
        _pointer(layer.post_norm),
        _pointer(layer.q_norm),
        _pointer(layer.k_norm),
        *(_projection_struct(p) for p in (layer.qkv, layer.o, layer.gate_up, layer.down)),
        _pointer(layer.k_cache),
        _pointer(layer.v_cache),
        layer.window or 0,
        layer.rope_table,
        _pointer(layer.attn_out_norm),
        _pointer(layer.mlp_out_norm),
    )


# One adapter's term on a projection: A [r, in] and B transposed [r, out] (gate/up: out in the
# gated panels' column order, see :func:`gated_order`).
Term = tuple[torch.Tensor, torch.Tensor]
PROJECTIONS = ("qkv", "o", "gate_up", "down")


class WithAdapters:
    """The layers' structures with the terms of a step's adapters, for
    :meth:`DecoderStack.decode`: ``terms[k][layer]`` holds adapter ``k``'s term (or None) for each
    of :data:`PROJECTIONS`; a row with adapter ``k`` has slot ``k``."""

    def __init__(self, base: ctypes.Array, terms: list[list[tuple[Term | None, ...]]]) -> None:
        self.layers = (_Layer * len(base))()
        ctypes.memmove(self.layers, base, ctypes.sizeof(self.layers))
        tables = []  # the tensors and tables whose memory the structures point into
        for index, struct in enumerate(self.layers):
            for p, name in enumerate(PROJECTIONS):
                per_adapter = [layer_terms[index][p] for layer_terms in terms]
                if all(term is None for term in per_adapter):
                    continue
                a = (_ptr * len(terms))(*(t and t[0].data_ptr() for t in per_adapter))
                bt = (_ptr * len(terms))(*(t and t[1].data_ptr() for t in per_adapter))
                rank = (_i64 * len(terms))(*(t[0].shape[0] if t else 0 for t in per_adapter))
                projection = getattr(struct, name)
                projection.lora_a, projection.lora_bt = ctypes.addressof(a), ctypes.addressof(bt)
                projection.lora_rank = ctypes.addressof(rank)
                tables += [a, bt, rank]
        self._keep = (terms, tables)


def gated_order(size: int) -> torch.Tensor:
    """The features of a gate/up output ``[2 size]`` (gate first) in the gated panels' column
    order: per panel, its gate features, then the up features of the same indices."""
    width = gate_width()
    panels = torch.arange(2 * size).view(2, size // width, width)
    return panels.transpose(0, 1).reshape(-1)


def gate_width() -> int:
    """Gate features in a gated panel (the vector width)."""
    lib = packed_gemm._lib()
    assert lib is not None
    return lib.packed_gemm_panel_width(True)


class DecoderStack:
    """The decoder layers of one model, ready for :meth:`decode`; build with :meth:`create`."""

    def __init__(self, stack: _Stack, layers: ctypes.Array, keep: object) -> None:
        lib = _lib()
        assert lib is not None
        self._stack = stack
        self._layers = layers
        self._keep = keep  # the tensors whose memory the structures point into
        self._scratch_per_row = lib.decoder_stack_scratch(stack, 1)

    def with_adapters(self, terms: list[list[tuple[Term | None, ...]]]) -> WithAdapters:
        """The layers with the terms of a step's adapters (see :class:`WithAdapters`)."""
        return WithAdapters(self._layers, terms)

    @classmethod
    def create(
        cls,
        layers: list[Layer],
        final_norm: torch.Tensor,
        shapes: dict[str, int],
        eps: float,
        scale: float,
        quant_max_rows: int,
        softcap: float | None = None,
        geglu: bool = False,
        residual_scale: float | None = None,
        post_norms: bool = False,
    ) -> DecoderStack | None:
        """The stack of ``layers`` (``shapes``: hidden, num_heads, num_kv_heads, head_dim,
        intermediate, block_size; ``softcap``: the scores' soft cap, Gemma 2's; ``geglu``:
        Gemma's layers, their MLP GeGLU and its gate/up packed plain; ``residual_scale``:
        Granite's residual multiplier, nonzero; ``post_norms``: OLMo 2's layers, no input or
        MLP-input norms, the blocks' outputs normed, q and k normed over whole projections),
        or None when a kernel it needs is not built here."""
        kv_dtype = layers[0].k_cache.dtype
        queries = torch.empty(0, 1, shapes["head_dim"])
        cache = layers[0].k_cache
        if _lib() is None or not paged_decode_attention.supports(queries, cache, softcap):
            return None
        gemm, norms = packed_gemm._lib(), elementwise._lib()
        kv, attention = kv_store._lib(kv_dtype), paged_decode_attention._lib(kv_dtype)
        entries = {
            "gemm_f32": _address(gemm, "packed_gemm_f32"),
            "gemm_bf16": _address(gemm, "packed_gemm_bf16"),
            "gemm_quant": _address(gemm, "packed_gemm_quant"),
            "rms_norm": _address(norms, "rms_norm_f32"),
            "add_rms_norm": _address(norms, "add_rms_norm_f32"),
            "gelu_and_mul": _address(norms, "gelu_tanh_and_mul_f32"),
            "rotary": _address(norms, "rotary_f32"),
            "write_kv": _address(kv, "write_kv"),
            "attention": _address(attention, "paged_decode_attention"),
        }
        if None in entries.values():
            return None
        stack = _Stack(
            **entries,
            **{name: shapes[name] for name in _SHAPES},
            quant_max_rows=quant_max_rows,
            gate_width=gemm.packed_gemm_panel_width(True),
            plain_adds=geglu or post_norms,
            geglu=geglu,
            whole_qk_norm=post_norms,
            eps=eps,
            scale=scale,
            softcap=softcap or 0.0,
            residual_scale=residual_scale or 0.0,
            final_norm=final_norm.data_ptr(),
        )
        structs = (_Layer * len(layers))(*(_layer_struct(layer) for layer in layers))
        return cls(stack, structs, (layers, final_norm))

    def decode(
        self,
        hidden: torch.Tensor,
        rope: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        seq_lens: torch.Tensor,
        adapters: tuple[WithAdapters, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One decode step of ``m`` sequences: ``hidden [m, H]``, their token embeddings (used,
        and overwritten, as the residual stream), ``rope [tables, m, D]`` the cos and sin
        halves at their positions per RoPE table (see :attr:`Layer.rope_table`), ``slots [m]`` int64, ``block_tables [m, max_blocks]`` and ``seq_lens
        [m]`` int32, all contiguous float32 / integer CPU tensors; with ``adapters``, the
        structures of the step's adapters and each row's slot among them (int32 ``[m]``, -1:
        none). Returns the final norm's output ``[m, H]``."""
        lib = _lib()
        assert lib is not None
        m = hidden.shape[0]
        out = torch.empty_like(hidden)
        scratch = hidden.new_empty(m * self._scratch_per_row)
        lib.decoder_stack_decode(
            self._stack,
            self._layers if adapters is None else adapters[0].layers,
            len(self._layers),
            m,
            hidden.data_ptr(),
            out.data_ptr(),
            rope.data_ptr(),
            slots.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            seq_lens.data_ptr(),
            None if adapters is None else adapters[1].data_ptr(),
            scratch.data_ptr(),
        )
        return out
