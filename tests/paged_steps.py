"""Random paged-attention steps for the kernel tests: pools with blocks in shuffled order, one
step's new K/V written into them, its queries and metadata."""

from __future__ import annotations

import torch

from pagedserve.model.layers.attention import AttentionMetadata, write_kv


def random_step(
    query_lens: list[int],
    seq_lens: list[int],
    num_heads: int = 9,
    num_kv_heads: int = 3,
    head_dim: int = 64,
    block_size: int = 16,
    seed: int = 0,
    q_scale: float = 1.0,
    kv_dtype: torch.dtype = torch.float32,
    device: str = "cpu",
):
    """``(q, k, v, k_cache, v_cache, meta)`` for requests with these query and context lengths
    (a query length of 1 is a decode), the pools of ``kv_dtype``, all on ``device``."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(kv_dtype)
    v_cache = torch.randn(shape, generator=g).to(kv_dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32)
    slots, starts = [], [0]
    for i, (ql, sl) in enumerate(zip(query_lens, seq_lens, strict=True)):
        tables[i, : blocks[i]] = torch.tensor([perm.pop() for _ in range(blocks[i])])
        for p in range(sl - ql, sl):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
        starts.append(starts[-1] + ql)
    total = starts[-1]
    q = torch.randn(total, num_heads, head_dim, generator=g) * q_scale
    k = torch.randn(total, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    q, k, v, k_cache, v_cache = (t.to(device) for t in (q, k, v, k_cache, v_cache))
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        query_start_loc_cpu=starts,
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )
    meta.split_decodes()
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return q, k, v, k_cache, v_cache, meta
