"""Python face of the C K/V store (``kv_store.c``): a step's new float32 keys and values into
pools of float32, float16 or bfloat16 on the CPU, rounded as ``.to()`` rounds."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from pagedserve.kernels.kv_element import bind_kv_kernel

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


@cache
def _lib(kv_dtype: torch.dtype) -> ctypes.CDLL | None:
    """The store built for pools of ``kv_dtype``; None if it has no such build."""
    return bind_kv_kernel("kv_store", {"write_kv": ([_ptr] * 5 + [_i64] * 4, None)}, kv_dtype)


def available(kv_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the store for pools of ``kv_dtype`` was built."""
    return _lib(kv_dtype) is not None


def supports(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> bool:
    """Whether the C store takes these: float32 K/V and same-typed pools, all on the CPU, no
    autograd graph being recorded (the kernel writes through raw pointers)."""
    if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
        return False
    if k.dtype != torch.float32 or v.dtype != torch.float32 or v_cache.dtype != k_cache.dtype:
        return False
    if not (k.is_cpu and v.is_cpu and k_cache.is_cpu and v_cache.is_cpu):
        return False
    return available(k_cache.dtype)


def _rows_of_heads(x: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` with each token's heads side by side (any token stride)."""
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        x = x.contiguous()
    return x


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store ``k``/``v`` ``[T, Hkv, D]`` at ``slots`` of contiguous pools ``[N, block, Hkv, D]``."""
    if k.shape != v.shape or k.shape[1:] != k_cache.shape[2:] or v_cache.shape != k_cache.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit the pools")
    assert supports(k, v, k_cache, v_cache)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    k, v = _rows_of_heads(k), _rows_of_heads(v)
    slots = slots.to(torch.int64).contiguous()
    _lib(k_cache.dtype).write_kv(
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        slots.data_ptr(),
        k.shape[0],
        k.shape[1] * k.shape[2],
        k.stride(0),
        v.stride(0),
    )
