"""Python face of the C prefill-attention kernel (flash attention over the paged KV pools;
float32 queries, float32, float16 or bfloat16 pools; CPU; bfloat16 products on request where
the CPU has AVX512-BF16)."""

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
        "prefill_attention",
        {
            "prefill_attention": (
                [_ptr] * 8 + [_i64] * 7 + [ctypes.c_float, _i64, _i64, ctypes.c_float],
                ctypes.c_int,
            ),
            "prefill_attention_bf16_products": ([], _i64),
        },
        kv_dtype,
    )


def available(kv_dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernel for pools of ``kv_dtype`` was built (it takes any head size)."""
    return _lib(kv_dtype) is not None


def bf16_products_available(kv_dtype: torch.dtype) -> bool:
    """Whether the kernel for pools of ``kv_dtype`` can multiply in bfloat16 (bfloat16 pools on
    a CPU with AVX512-BF16): Q and the softmax's P rounded to bfloat16, both products two
    multiply-adds per lane per instruction, the rest float32. Head sizes 64 and 128."""
    lib = _lib(kv_dtype)
    return lib is not None and bool(lib.prefill_attention_bf16_products())


def supports(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernel takes these queries and pools: float32 queries on the CPU, pools of
    float32, float16 or bfloat16, and the kernel built."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and k_cache.device.type == "cpu"
        and available(k_cache.dtype)
    )


def _int32(x: torch.Tensor) -> torch.Tensor:
    assert x.dtype == torch.int32 and x.device.type == "cpu", "int32 CPU tensor expected"
    return x.contiguous()


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    requests: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    bf16_products: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over paged contexts; float32 queries on the CPU, pools
    of any type :func:`supports` takes.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i+1]``, the last ones of
    its ``seq_lens[i]`` context positions, whose K/V are already in the pools
    ``[num_blocks, block_size, Hkv, D]`` at blocks ``block_tables[i]``. Only the rows of the
    requests listed in ``requests`` (int32 indices; default all) are computed, into ``out``
    (default a new tensor); its other rows are left as they are. ``q`` may have any token
    stride (a view of a fused projection's output): only its heads must be contiguous.
    ``bf16_products``: multiply in bfloat16 where :func:`bf16_products_available` (and the head
    size is 64 or 128); float32 otherwise. ``window``: each row sees only its last ``window``
    positions (itself included). ``softcap``: scores become ``softcap * tanh(score / softcap)``.
    """
    assert supports(q, k_cache) and v_cache.dtype == k_cache.dtype
    assert v_cache.device.type == "cpu"
    lib = _lib(k_cache.dtype)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    if requests is None:
        requests = torch.arange(seq_lens.shape[0], dtype=torch.int32)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype)
    assert out.shape == q.shape and out.dtype == torch.float32 and out.is_contiguous()
    block_tables = _int32(block_tables)
    query_start_loc = _int32(query_start_loc)
    seq_lens = _int32(seq_lens)
    requests = _int32(requests)
    status = lib.prefill_attention(
        out.data_ptr(),
        q.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        block_tables.data_ptr(),
        query_start_loc.data_ptr(),
        seq_lens.data_ptr(),
        requests.data_ptr(),
        requests.shape[0],
        num_heads,
        num_kv_heads,
        head_dim,
        k_cache.shape[1],
        block_tables.shape[1],
        q.stride(0),
        scale,
        bf16_products,
        window or 0,
        softcap or 0.0,
    )
    if status != 0:
        raise MemoryError("prefill_attention: no memory for the kernel's scratch buffers")
    return out
