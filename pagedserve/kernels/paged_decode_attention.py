"""Python face of the C decode-attention kernel (float32, CPU)."""

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
        "paged_decode_attention",
        {
            "paged_decode_attention_f32": ([_ptr] * 6 + [_i64] * 6 + [ctypes.c_float, _i64], None),
            "paged_decode_attention_supports": ([_i64], ctypes.c_int),
        },
    )


def supports(q: torch.Tensor) -> bool:
    """Whether the kernel takes these queries: float32 on the CPU, head size 16, 32, ... 128."""
    if q.device.type != "cpu" or q.dtype != torch.float32:
        return False
    lib = _lib()
    return lib is not None and bool(lib.paged_decode_attention_supports(q.shape[-1]))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``q [B, Hq, D]`` (one token per sequence) -> ``[B, Hq, D]``; all float32 on the CPU.
    ``q`` may be a view with any sequence stride (the q heads of the fused qkv output)."""
    lib = _lib()
    assert lib is not None and supports(q)
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
        q = q.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = q.new_empty(q.shape)
    num_seqs, num_heads, head_dim = q.shape
    lib.paged_decode_attention_f32(
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
    )
    return out
