"""Python face of the C packed-weight GEMM (``y = x W^T + b``; float32, CPU), with weights
packed from float32 or from llama.cpp's Q4_1 blocks (for steps of few rows)."""

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
            "packed_gemm_q41_bytes": ([_i64] * 3, _i64),
            "packed_gemm_pack_q41": ([_ptr] * 4 + [_i64] * 3, None),
            "packed_gemm_q41": ([_ptr] * 4 + [_i64] * 4, _i64),
        },
    )


def available() -> bool:
    return _lib() is not None


def pack(weight: torch.Tensor, gated: bool = False) -> torch.Tensor:
    """``weight [n, k]`` (float32, CPU) in the kernel's panel layout, a flat tensor. ``gated``:
    the weight is gate and up stacked (``n = 2 d``), for :func:`linear` with ``gated``."""
    lib = _lib()
    assert lib is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
    n, k = weight.shape
    outputs = n // 2 if gated else n
    if gated and n % 2:
        raise ValueError(f"a gated weight stacks two halves; {n} rows do not split")
    panels = -(-outputs // lib.packed_gemm_panel_width(gated))
    packed = torch.empty(panels * k * lib.packed_gemm_panel_width(False))
    weight = weight.detach().contiguous()
    lib.packed_gemm_pack_f32(packed.data_ptr(), weight.data_ptr(), n, k, gated)
    return packed


@dataclass
class Q41Blocks:
    """A weight ``[n, k]`` in llama.cpp's Q4_1 type: for each output and block of 32 inputs, a
    scale and a minimum (``[n, k / 32]``, float32) and 32 4-bit values (``quants``
    ``[n, k / 32, 16]`` uint8, as in a GGUF file); the weight is ``scale * value + minimum``."""

    scale: torch.Tensor
    minimum: torch.Tensor
    quants: torch.Tensor

    @staticmethod
    def cat(parts: list[Q41Blocks]) -> Q41Blocks:
        """The blocks of the parts' weights stacked by rows (the shards of a merged weight)."""
        return Q41Blocks(
            torch.cat([p.scale for p in parts]),
            torch.cat([p.minimum for p in parts]),
            torch.cat([p.quants for p in parts]),
        )


def pack_q41(blocks: Q41Blocks, gated: bool = False) -> torch.Tensor:
    """The weight of ``blocks`` in the kernel's Q4_1 panel layout (uint8), for :func:`linear`;
    its products equal those of :func:`pack` on the dequantized weight, bit for bit."""
    lib = _lib()
    assert lib is not None
    n, groups = blocks.scale.shape
    outputs = n // 2 if gated else n
    packed = torch.empty(lib.packed_gemm_q41_bytes(outputs, groups * 32, gated), dtype=torch.uint8)
    scale, minimum, quants = (t.contiguous() for t in (blocks.scale, blocks.minimum, blocks.quants))
    lib.packed_gemm_pack_q41(
        packed.data_ptr(),
        scale.data_ptr(),
        minimum.data_ptr(),
        quants.data_ptr(),
        n,
        groups * 32,
        gated,
    )
    return packed


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    gated: bool = False,
) -> torch.Tensor:
    """``x [..., k] W^T + bias`` with ``W`` packed by :func:`pack` (float32) or :func:`pack_q41`
    (uint8) -> ``[..., out_features]``. ``gated``: ``silu(x Wg^T + bg) * (x Wu^T + bu)``,
    ``out_features`` = d of ``[2 d, k]``."""
    lib = _lib()
    assert lib is not None
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
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
    if packed.dtype == torch.uint8:
        if lib.packed_gemm_q41(*args) != 0:
            raise MemoryError("packed_gemm_q41: no memory for a panel buffer")
    else:
        lib.packed_gemm_f32(*args)
    return y.view(*x.shape[:-1], out_features)
