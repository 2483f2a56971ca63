"""Python face of the C decode-attention kernel (float32 queries; float32, float16 or bfloat16
K/V pools; CPU)."""

from __future__ import annotations

import ctypes
from functools import cache

import torch

from pagedserve.kernels.kv_element import bind_kv_kernel

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


@cache
def _lib(kv_dtype: torch.dtype) -> ctypes.CDLL | None:
    """The kernel built for pools of ``kv_dtype``; None if it has no such build."""
    return bind_kv_kernel(
        "paged_decode_attention",
        {
            "paged_decode_attention": (
                [_ptr] * 6 + [_i64] * 6 + [ctypes.c_float, _i64, _i64, ctypes.c_float],
                None,
            ),
            "paged_decode_attention_supports": ([_i64, _i64], ctypes.c_int),
        },
        kv_dtype,
    )


def available(kv_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel for pools of ``kv_dtype`` was built."""
    return _lib(kv_dtype) is not None


def supports(q: torch.Tensor, k_cache: torch.Tensor, softcap: float | None = None) -> bool:
    """Whether the kernel takes these queries and pools: float32 queries on the CPU, head size
    16, 32, ... 128 or 256 (with a ``softcap``: 128 or 256, Gemma 2's), pools of float32,
    float16 or bfloat16."""
    if not q.is_cpu or q.dtype != torch.float32 or not k_cache.is_cpu:
        return False
    lib = _lib(k_cache.dtype)
    capped = softcap is not None
    return lib is not None and bool(lib.paged_decode_attention_supports(q.shape[-1], capped))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q [B, Hq, D]`` (one token per sequence) -> ``[B, Hq, D]``, float32 on the CPU, over
    pools of any type :func:`supports` takes. ``q`` may be a view with any sequence stride (the
    q heads of the fused qkv output). ``window``: each query sees only its context's last
    ``window`` positions; ``softcap``: scores become ``softcap * tanh(score / softcap)``."""
    assert supports(q, k_cache, softcap) and v_cache.dtype == k_cache.dtype
    lib = _lib(k_cache.dtype)
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = q.new_empty(q.shape)
    num_seqs, num_heads, head_dim = q.shape
    lib.paged_decode_attention(
        out.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        seq_lens.data_ptr(),
        num_seqs,
        num_heads,
        k_cache.shape[2],
        head_dim,
        k_cache.shape[1],
        block_tables.shape[1],
        scale,
        q.stride(0),
        window or 0,
        softcap or 0.0,
    )
    return out
