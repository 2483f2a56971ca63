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
            "packed_gemm_panel_width": ([], _i64),
            "packed_gemm_pack_f32": ([_ptr, _ptr, _i64, _i64], None),
            "packed_gemm_f32": ([_ptr] * 4 + [_i64] * 3, None),
        },
    )


def available() -> bool:
    return _lib() is not None


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight [n, k]`` (float32, CPU) in the kernel's panel layout, a flat tensor."""
    lib = _lib()
    assert lib is not None and weight.dtype == torch.float32 and weight.device.type == "cpu"
    n, k = weight.shape
    width = lib.packed_gemm_panel_width()
    packed = torch.empty(-(-n // width) * width * k)
    weight = weight.detach().contiguous()
    lib.packed_gemm_pack_f32(packed.data_ptr(), weight.data_ptr(), n, k)
    return packed


def linear(
    x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x [..., k] W^T + bias`` with ``W`` packed by :func:`pack` -> ``[..., out_features]``."""
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
    )
    return y.view(*x.shape[:-1], out_features)
