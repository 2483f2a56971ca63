"""Python face of the C packed-weight GEMM (``y = x W^T + b``; float32, CPU)."""

from __future__ import annotations

import ctypes
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


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None,
    gated: bool = False,
) -> torch.Tensor:
    """``x [..., k] W^T + bias`` with ``W`` packed by :func:`pack` -> ``[..., out_features]``.
    ``gated``: ``silu(x Wg^T + bg) * (x Wu^T + bu)``, ``out_features`` = d of ``[2 d, k]``."""
    lib = _lib()
    assert lib is not None
    k = x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    if bias is not None:
        bias = bias.detach().contiguous()
    y = x2.new_empty((x2.shape[0], out_features))
    lib.packed_gemm_f32(
        y.data_ptr(),
        x2.data_ptr(),
        packed.data_ptr(),
        bias.data_ptr() if bias is not None else None,
        x2.shape[0],
        out_features,
        k,
        gated,
    )
    return y.view(*x.shape[:-1], out_features)
