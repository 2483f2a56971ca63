"""Python face of the C elementwise kernels (RMSNorm, SiLU- and GELU-and-mul, rotary; float32,
CPU).

:func:`supports` says whether a call may take the C path: the kernels exist, every tensor is a
float32 CPU tensor, and no autograd graph is being recorded (the kernels write through raw
pointers, invisible to autograd). The layers check it and otherwise run their PyTorch code.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from functools import cache

import torch

from pagedserve.kernels.cpu_build import bind_kernel

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p
_f32 = ctypes.c_float

_SIGNATURES = {
    "rms_norm_f32": ([_ptr] * 3 + [_i64] * 2 + [_f32], None),
    "add_rms_norm_f32": ([_ptr] * 5 + [_i64] * 2 + [_f32], None),
    "silu_and_mul_f32": ([_ptr] * 2 + [_i64] * 2, None),
    "gelu_tanh_and_mul_f32": ([_ptr] * 2 + [_i64] * 2, None),
    "rotary_f32": ([_ptr] * 4 + [_i64] * 6, None),
}


@cache
def _lib() -> ctypes.CDLL | None:
    return bind_kernel("elementwise", _SIGNATURES)


def supports(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can handle an op on these tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_cpu:
            return False
    return _lib() is not None


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _check_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dimension."""
    _check_weight(x, weight)
    x = x.contiguous()
    out = torch.empty_like(x)
    _lib().rms_norm_f32(
        out.data_ptr(), x.data_ptr(), weight.contiguous().data_ptr(), _rows(x), x.shape[-1], eps
    )
    return out


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)`` in one pass. The sum is written over
    ``residual`` (when it is contiguous) and returned: the caller gives up the old residual."""
    _check_weight(x, weight)
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    x = x.contiguous()
    residual = residual.contiguous()
    out = torch.empty_like(x)
    _lib().add_rms_norm_f32(
        out.data_ptr(),
        residual.data_ptr(),
        x.data_ptr(),
        residual.data_ptr(),
        weight.contiguous().data_ptr(),
        _rows(x),
        x.shape[-1],
        eps,
    )
    return out, residual


def _gated(x: torch.Tensor, kernel: Callable[..., None]) -> torch.Tensor:
    """``[..., 2 * d]`` (gate, up) -> ``[..., d]`` through a gated-activation kernel."""
    x = x.contiguous()
    d = x.shape[-1] // 2
    out = x.new_empty((*x.shape[:-1], d))
    kernel(out.data_ptr(), x.data_ptr(), _rows(x), d)
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2 * d]`` (gate, up) -> ``[..., d]`` = ``silu(gate) * up``."""
    return _gated(x, _lib().silu_and_mul_f32)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``[..., 2 * d]`` (gate, up) -> ``[..., d]`` = ``gelu(gate, approximate="tanh") * up``."""
    return _gated(x, _lib().gelu_tanh_and_mul_f32)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, H, D]`` rotated in the halves layout by ``cos``/``sin`` (``[T, 1, D // 2]``,
    or broadcastable to it), into a new contiguous tensor. ``x`` may be a strided view (the q/k
    heads of the fused qkv output): it is read where it lies."""
    tokens, heads, head_dim = x.shape
    if x.stride(2) != 1:
        x = x.contiguous()
    table_shape = (tokens, 1, head_dim // 2)
    if cos.shape != table_shape or sin.shape != table_shape:
        cos, sin = cos.expand(table_shape), sin.expand(table_shape)
    if cos.stride(2) != 1 or sin.stride(2) != 1 or cos.stride(0) != sin.stride(0):
        cos, sin = cos.contiguous(), sin.contiguous()
    out = x.new_empty(x.shape)
    _lib().rotary_f32(
        out.data_ptr(),
        x.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        tokens,
        heads,
        head_dim,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
    )
    return out
