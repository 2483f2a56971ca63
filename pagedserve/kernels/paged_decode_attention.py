"""Python face of the C decode-attention kernel (float32, CPU)."""

from __future__ import annotations

import ctypes

import torch

from pagedserve.kernels.cpu_build import load_kernel

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


def _bind() -> ctypes._CFuncPtr | None:
    lib = load_kernel("paged_decode_attention")
    if lib is None:
        return None
    fn = lib.paged_decode_attention_f32
    fn.argtypes = [_ptr] * 6 + [_i64] * 7 + [ctypes.c_float]
    fn.restype = None
    return fn


_kernel = None
_bound = False


def available() -> bool:
    global _kernel, _bound
    if not _bound:
        _kernel, _bound = _bind(), True
    return _kernel is not None


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
) -> torch.Tensor:
    """``q [B, Hq, D]`` (one token per sequence) -> ``[B, Hq, D]``; all float32 on the CPU."""
    assert available()
    q = q.contiguous()
    block_tables = block_tables.contiguous()
    seq_lens = seq_lens.contiguous()
    out = torch.empty_like(q)
    num_seqs, num_heads, head_dim = q.shape
    _kernel(
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
        max_seq_len,
        scale,
    )
    return out
