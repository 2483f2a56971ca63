"""The C decode-attention kernel matches the reference backend and the portable torch path."""

import pytest
import torch
from paged_steps import random_step

from pagedserve.kernels import paged_decode_attention
from pagedserve.model.layers.attention import (
    _decode,
    _decode_torch,
    reference_paged_attention,
)


def _decode_step(seq_lens, num_heads, num_kv_heads, head_dim, block_size, seed=0):
    """One query token per sequence, contexts in scattered blocks."""
    q, _, _, k_cache, v_cache, meta = random_step(
        [1] * len(seq_lens), seq_lens, num_heads, num_kv_heads, head_dim, block_size, seed
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
        # the group sizes not above (each has its own compiled kernel)
        (10, 5, 32, 16),
        (5, 1, 80, 16),
        (14, 2, 96, 16),
        (16, 2, 64, 16),
        # Gemma's head size: 2 (Gemma 2 2B, Gemma 3 4B) and 4 (Gemma 3 1B) query heads a kv head
        (8, 4, 256, 16),
        (4, 1, 256, 16),
    ],
)
def test_c_kernel_matches_reference(num_heads, num_kv_heads, head_dim, block_size):
    seq_lens = [1, 15, 16, 17, 33, 300, 64 * 3 + 5]
    q, k_cache, v_cache, meta = _decode_step(
        seq_lens, num_heads, num_kv_heads, head_dim, block_size
    )
    assert paged_decode_attention.supports(q, k_cache), "gcc is on every supported machine"
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
    assert not paged_decode_attention.supports(q, k_cache)
    capped, k_capped, _, _ = _decode_step([5], 4, 2, 64, 16)
    assert not paged_decode_attention.supports(capped, k_capped, softcap=50.0)
    assert not paged_decode_attention.supports(q.double(), k_cache)
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.1)
    got = _decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, 0.1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_strided_queries_are_read_in_place():
    """q as the q heads of a fused qkv row (a view with a larger sequence stride)."""
    q, k_cache, v_cache, meta = _decode_step([3, 40, 17], 9, 3, 64, 16, seed=2)
    fused = torch.randn(q.shape[0], 15, 64)
    fused[:, :9] = q
    view = fused[:, :9]
    assert not view.is_contiguous()
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    got = paged_decode_attention.paged_decode_attention(
        view, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [1, 5, 16, 40, 299])
def test_c_kernel_sliding_window_matches_reference(window):
    """Each query sees its context's last ``window`` positions: windows inside one block, across
    blocks, and longer than some contexts; the work split counts only the keys attended."""
    seq_lens = [1, 15, 16, 17, 33, 300, 64 * 3 + 5]
    q, k_cache, v_cache, meta = _decode_step(seq_lens, 8, 2, 64, 16, seed=3)
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125, window)
    got = paged_decode_attention.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, 0.125, window
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,window",
    [(8, 4, 256, None), (32, 16, 128, None), (8, 4, 256, 40), (6, 1, 128, None)],
)
def test_c_kernel_soft_cap_matches_reference(num_heads, num_kv_heads, head_dim, window):
    """Gemma 2's soft-capped scores (``cap * tanh(score / cap)``) at its head sizes (256 in 2B
    and 9B, 128 in 27B), with a sliding window as its local layers have; scores large enough
    that the cap changes the softmax."""
    seq_lens = [1, 15, 17, 300, 64 * 3 + 5]
    q, k_cache, v_cache, meta = _decode_step(
        seq_lens, num_heads, num_kv_heads, head_dim, 16, seed=4
    )
    q, scale, cap = q * 8, head_dim**-0.5, 5.0
    assert paged_decode_attention.supports(q, k_cache, cap)
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale, window, cap)
    uncapped = reference_paged_attention(q, k_cache, v_cache, meta, scale, window)
    assert (expected - uncapped).abs().max() > 0.1
    got = paged_decode_attention.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale, window, cap
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
