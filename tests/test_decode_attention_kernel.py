"""The C decode-attention kernel matches the reference backend and the portable torch path."""

import pytest
import torch

from pagedserve.kernels import paged_decode_attention
from pagedserve.model.layers.attention import (
    AttentionMetadata,
    _decode,
    _decode_torch,
    reference_paged_attention,
)


def _decode_step(seq_lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    """Random pools and one query token per sequence, contexts in scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[: len(seq_lens) * max_blocks].view(len(seq_lens), max_blocks).to(torch.int32)
    q = torch.randn(len(seq_lens), num_heads, head_dim, generator=g)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(seq_lens), dtype=torch.long),
        query_start_loc=torch.arange(len(seq_lens) + 1, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        query_start_loc_cpu=list(range(len(seq_lens) + 1)),
        seq_lens_cpu=list(seq_lens),
        max_query_len=1,
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [
        (9, 3, 64, 16),  # SmolLM2-135M
        (4, 4, 128, 16),  # no GQA, large heads
        (8, 2, 48, 32),  # blocks longer than the kernel's 16-key chunks
        (20, 2, 16, 64),  # a group of 10 query heads: two passes over the context
        (6, 1, 112, 8),
    ],
)
def test_c_kernel_matches_reference(num_heads, num_kv_heads, head_dim, block_size):
    seq_lens = [1, 15, 16, 17, 33, 300, 64 * 3 + 5]
    q, k_cache, v_cache, meta = _decode_step(
        seq_lens, num_heads, num_kv_heads, head_dim, block_size
    )
    assert paged_decode_attention.supports(q), "gcc is on every supported machine"
    scale = head_dim**-0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    got = paged_decode_attention.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    portable = _decode_torch(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
    )
    torch.testing.assert_close(portable, expected, atol=1e-5, rtol=1e-5)


def test_scores_far_apart_stay_finite():
    """Large logits: the online softmax must rescale, not overflow, across chunks."""
    q, k_cache, v_cache, meta = _decode_step([100, 257], 4, 2, 64, 16, seed=1)
    q = q * 40
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    got = paged_decode_attention.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125
    )
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_unsupported_head_size_falls_back_to_torch():
    q, k_cache, v_cache, meta = _decode_step([5, 40], 4, 2, 40, 16)
    assert not paged_decode_attention.supports(q)
    assert not paged_decode_attention.supports(q.double())
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.1)
    got = _decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
