"""Python face of the C packed-weight GEMM (``y = x W^T + b``; float32 in and out, CPU), with
weights packed in float32, in bfloat16 (CPUs with AVX512-BF16) or from llama.cpp's Q4_1 or Q8_0
blocks (for steps of few rows)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache

import torch

from pagedserve.kernels.cpu_build import bind_kernel

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


@cache
def _lib() -> ctypes.CDLL | None:
    return bind_kernel(
        "packed_gemm",
        {
            "packed_gemm_panel_width": ([_i64], _i64),
            "packed_gemm_pack_f32": ([_ptr, _ptr, _i64, _i64, _i64], None),
            "packed_gemm_f32": ([_ptr] * 4 + [_i64] * 4, None),
            "packed_gemm_bf16_available": ([], _i64),
            "packed_gemm_bf16_elements": ([_i64] * 3, _i64),
            "packed_gemm_pack_bf16": ([_ptr, _ptr, _i64, _i64, _i64], None),
            "packed_gemm_bf16": ([_ptr] * 4 + [_i64] * 4, None),
            "packed_gemm_quant_bytes": ([_i64] * 4, _i64),
            "packed_gemm_pack_quant": ([_ptr] * 4 + [_i64] * 4, None),
            "packed_gemm_quant": ([_ptr] * 4 + [_i64] * 5, None),
        },
    )


def available() -> bool:
    return _lib() is not None


def bf16_available() -> bool:
    """Whether this CPU multiplies bfloat16 panels (AVX512-BF16; see :func:`pack`)."""
    lib = _lib()
    return lib is not None and bool(lib.packed_gemm_bf16_available())


def pack(
    weight: torch.Tensor, gated: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``weight [n, k]`` (float32, CPU) in the kernel's panel layout, a flat tensor of ``dtype``:
    float32, or bfloat16 where :func:`bf16_available` (the weight rounded, and each product's
    input too; sums in float32). ``gated``: the weight is gate and up stacked (``n = 2 d``), for
    :func:`linear` with ``gated``."""
    lib = _lib()
    assert lib is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
    n, k = weight.shape
    outputs = n // 2 if gated else n
    if gated and n % 2:
        raise ValueError(f"a gated weight stacks two halves; {n} rows do not split")
    weight = weight.detach().contiguous()
    if dtype == torch.bfloat16:
        assert bf16_available()
        packed = torch.empty(lib.packed_gemm_bf16_elements(outputs, k, gated), dtype=dtype)
        lib.packed_gemm_pack_bf16(packed.data_ptr(), weight.data_ptr(), n, k, gated)
        return packed
    assert dtype == torch.float32
    panels = -(-outputs // lib.packed_gemm_panel_width(gated))
    packed = torch.empty(panels * k * lib.packed_gemm_panel_width(False))
    lib.packed_gemm_pack_f32(packed.data_ptr(), weight.data_ptr(), n, k, gated)
    return packed


# The kernel's quantized block layouts (named for the llama.cpp types they match byte for byte;
# Q8_0x16 is Q8_0 with a scale per 16 inputs) and the dtype of their packed tensors, which tells
# them apart.
QUANT_TYPES = {"Q4_1": (0, torch.uint8), "Q8_0": (1, torch.int8), "Q8_0x16": (2, torch.int16)}
_TYPE_OF_DTYPE = {dtype: type_id for type_id, dtype in QUANT_TYPES.values()}


def quant_type_of(packed: torch.Tensor) -> int:
    """The kernel's type id of a weight packed by :func:`pack_quantized`."""
    return _TYPE_OF_DTYPE[packed.dtype]


@dataclass
class QuantBlocks:
    """A weight ``[n, k]`` in one of the kernel's block layouts (:data:`QUANT_TYPES`; the loader
    carries other llama.cpp types in them): for each output and block of 32 inputs a scale
    (``[n, k / 32]``, float32; Q8_0x16: one per 16 inputs, ``[n, k / 16]``) and the values
    (``quants`` ``[n, k / 32, bytes]`` uint8). Q4_1 has a ``minimum`` too, and its weight is
    ``scale * value + minimum`` (16 bytes of 4-bit values, gguf's order); the others'
    ``scale * value`` (32 signed bytes)."""

    type: str
    scale: torch.Tensor
    minimum: torch.Tensor | None
    quants: torch.Tensor

    @staticmethod
    def cat(parts: list[QuantBlocks]) -> QuantBlocks | None:
        """The parts' weights stacked by rows (the shards of a merged weight); None if their
        types differ."""
        if len({p.type for p in parts}) != 1:
            return None
        minimums = [p.minimum for p in parts]
        return QuantBlocks(
            parts[0].type,
            torch.cat([p.scale for p in parts]),
            None if minimums[0] is None else torch.cat(minimums),
            torch.cat([p.quants for p in parts]),
        )


def pack_quantized(blocks: QuantBlocks, gated: bool = False) -> torch.Tensor:
    """The weight of ``blocks`` in the kernel's quantized panel layout, for :func:`linear`
    (uint8 for Q4_1, int8 for Q8_0); its products equal those of :func:`pack` on the
    dequantized weight, bit for bit."""
    lib = _lib()
    assert lib is not None
    type_id, dtype = QUANT_TYPES[blocks.type]
    n, groups = blocks.quants.shape[:2]
    outputs = n // 2 if gated else n
    size = lib.packed_gemm_quant_bytes(outputs, groups * 32, gated, type_id)
    packed = torch.empty(size, dtype=torch.uint8).view(dtype)
    scale, quants = blocks.scale.contiguous(), blocks.quants.contiguous()
    minimum = blocks.minimum.contiguous() if blocks.minimum is not None else None
    lib.packed_gemm_pack_quant(
        packed.data_ptr(),
        scale.data_ptr(),
        minimum.data_ptr() if minimum is not None else None,
        quants.data_ptr(),
        n,
        groups * 32,
        gated,
        type_id,
    )
    return packed


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    gated: bool = False,
) -> torch.Tensor:
    """``x [..., k] W^T + bias`` with ``W`` packed by :func:`pack` (float32 or bfloat16) or
    :func:`pack_quantized` -> ``[..., out_features]``. ``gated``: ``silu(x Wg^T + bg) *
    (x Wu^T + bu)``, ``out_features`` = d of ``[2 d, k]``."""
    lib = _lib()
    assert lib is not None
    k = x.shape[-1]
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    if bias is not None:
        bias = bias.detach().contiguous()
    y = x2.new_empty((x2.shape[0], out_features))
    args = (
        y.data_ptr(),
        x2.data_ptr(),
        packed.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        x2.shape[0],
        out_features,
        k,
        gated,
    )
    if packed.dtype == torch.float32:
        lib.packed_gemm_f32(*args)
    elif packed.dtype == torch.bfloat16:
        lib.packed_gemm_bf16(*args)
    else:
        lib.packed_gemm_quant(*args, quant_type_of(packed))
    return y if x2 is x else y.view(*x.shape[:-1], out_features)


def gated_products(x: torch.Tensor, packed: torch.Tensor, size: int) -> torch.Tensor | None:
    """``x [m, k]``'s gate and up products ``[m, 2 size]`` (gate first), before the activation,
    from a weight packed ``gated`` (in any panel type); None where its panels do not split
    evenly (``size`` not a multiple of the vector width). A gated panel's columns are VL gate
    features then the VL up features of the same indices: the plain GEMM over such panels gives
    the products in that order, which a view puts back in place."""
    lib = _lib()
    assert lib is not None
    width = lib.packed_gemm_panel_width(True)
    if size % width:
        return None
    y = linear(x, packed, 2 * size, None)
    rows = y.shape[0]
    return y.view(rows, size // width, 2, width).transpose(1, 2).reshape(rows, 2 * size)
