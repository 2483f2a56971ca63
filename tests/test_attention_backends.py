"""The fast paged-attention backend (C decode kernel, SDPA prefill) matches the reference."""

import pytest
import torch

from pagedserve.model.layers.attention import (
    AttentionMetadata,
    fast_paged_attention,
    reference_paged_attention,
    write_kv,
)

BLOCK = 16


def _step(query_lens, seq_lens, num_heads=6, num_kv_heads=2, head_dim=32, num_blocks=64, seed=0):
    """Random pools plus one step's new tokens for requests with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_dim, generator=g)
    v_cache = torch.randn(num_blocks, BLOCK, num_kv_heads, head_dim, generator=g)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    max_blocks = max(-(-s // BLOCK) for s in seq_lens)
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots, starts = [], [0]
    for i, (ql, sl) in enumerate(zip(query_lens, seq_lens, strict=True)):
        nb = -(-sl // BLOCK)
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)], dtype=torch.int32)
        for p in range(sl - ql, sl):
            slots.append(int(tables[i, p // BLOCK]) * BLOCK + p % BLOCK)
        starts.append(starts[-1] + ql)
    total = starts[-1]
    q = torch.randn(total, num_heads, head_dim, generator=g)
    k = torch.randn(total, num_kv_heads, head_dim, generator=g)
    v = torch.randn(total, num_kv_heads, head_dim, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_start_loc_cpu=starts,
        seq_lens_cpu=list(seq_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=BLOCK,
    )
    meta.split_decodes()
    write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
    return q, k, v, k_cache, v_cache, meta


@pytest.mark.parametrize(
    "query_lens,seq_lens",
    [
        ([1, 1, 1, 1], [1, 17, 40, 100]),  # decodes only
        ([5, 1, 20, 1], [5, 33, 52, 16]),  # fresh prefill, decodes, prefill chunk with context
        ([31], [31]),
        ([3, 1], [200, 129]),
    ],
)
def test_fast_backend_matches_reference(query_lens, seq_lens):
    q, k, v, k_cache, v_cache, meta = _step(query_lens, seq_lens)
    scale = 32**-0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    got = fast_paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
