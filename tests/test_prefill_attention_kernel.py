"""The C prefill-attention kernel matches the reference paged attention: fresh prefills, chunks
with earlier context, mixed steps with decodes, GQA groups, head sizes and block sizes."""

from __future__ import annotations

import pytest
import torch
from paged_steps import random_step

from pagedserve.kernels import prefill_attention
from pagedserve.model.layers import attention
from pagedserve.model.layers.attention import fast_paged_attention, reference_paged_attention

TOL = {"atol": 2e-5, "rtol": 2e-5}


def _kernel(q, k_cache, v_cache, meta, scale, **kwargs) -> torch.Tensor:
    return prefill_attention.prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale, **kwargs
    )


def _check(query_lens, seq_lens, window=None, softcap=None, **step_args) -> None:
    q, _, _, k_cache, v_cache, meta = random_step(query_lens, seq_lens, **step_args)
    scale = q.shape[-1] ** -0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale, window, softcap)
    got = _kernel(q, k_cache, v_cache, meta, scale, window=window, softcap=softcap)
    torch.testing.assert_close(got, expected, **TOL)


def test_kernel_builds_on_this_machine():
    assert prefill_attention.available(), "gcc is on every supported machine"


@pytest.mark.parametrize("length", [1, 2, 15, 16, 17, 31, 33, 64, 65, 100, 129, 300])
def test_fresh_prefill(length):
    _check([length], [length])


@pytest.mark.parametrize(
    "query_len,seq_len", [(2, 3), (5, 40), (16, 80), (64, 200), (100, 300), (37, 101)]
)
def test_chunk_with_earlier_context(query_len, seq_len):
    _check([query_len], [seq_len])


@pytest.mark.parametrize("window", [1, 7, 16, 64, 65, 200])
def test_sliding_window(window):
    """Each row sees its last ``window`` positions: windows shorter than a key tile and longer,
    chunks with earlier context, rows whose window starts past a whole tile of keys."""
    _check([300, 37, 5, 100], [300, 101, 40, 260], window)
    _check([130, 20], [130, 90], window, num_heads=9, num_kv_heads=3, block_size=5)


@pytest.mark.parametrize("window", [None, 16, 65])
def test_soft_capped_scores(window):
    """Gemma 2's ``softcap * tanh(score / softcap)``, with a cap small enough (0.5) to change
    every score, alone and with a window; head size 256 (Gemma's) too."""
    _check([300, 37, 5], [300, 101, 40], window, 0.5)
    _check([70, 9], [70, 77], window, 0.5, head_dim=256, num_heads=8, num_kv_heads=4)


def test_several_requests_in_one_call():
    _check([7, 120, 33, 64, 2], [7, 250, 90, 64, 40])


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2), (9, 3), (8, 2), (16, 2)])
def test_gqa_groups(num_heads, num_kv_heads):
    _check([70, 20], [70, 90], num_heads=num_heads, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("head_dim", [32, 64, 128, 48, 20])
def test_head_dims(head_dim):
    _check([50, 9], [50, 77], head_dim=head_dim)


@pytest.mark.parametrize("block_size", [1, 5, 16, 32])
def test_block_sizes(block_size):
    _check([45, 30], [45, 100], block_size=block_size)


def test_peaked_scores():
    """Large scores: the running max changes a lot between key tiles."""
    _check([200, 40], [200, 300], q_scale=8.0)


def test_only_listed_requests_are_written():
    q, _, _, k_cache, v_cache, meta = random_step([10, 1, 20], [30, 5, 20])
    out = torch.full_like(q, 7.0)
    requests = torch.tensor([0, 2], dtype=torch.int32)
    _kernel(q, k_cache, v_cache, meta, 0.125, requests=requests, out=out)
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(out[:10], expected[:10], **TOL)
    torch.testing.assert_close(out[11:], expected[11:], **TOL)
    assert torch.all(out[10] == 7.0)


def test_strided_queries():
    """Queries as a view of a fused projection's output (token stride wider than Hq * D)."""
    q, _, _, k_cache, v_cache, meta = random_step([40], [60], num_heads=6, num_kv_heads=2)
    fused = torch.cat([q, torch.randn(40, 2, 64)], dim=1)
    view = fused[:, :6]
    assert not view.is_contiguous()
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(_kernel(view, k_cache, v_cache, meta, 0.125), expected, **TOL)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_mixed_step_through_fast_backend(monkeypatch, use_kernel):
    """Decodes interleaved with fresh prefills and chunks; with the kernel or the SDPA fallback."""
    if not use_kernel:
        monkeypatch.setattr(attention.prefill_attention, "supports", lambda q, k_cache: False)
    q, k, v, k_cache, v_cache, meta = random_step([1, 30, 1, 17, 5, 1], [40, 30, 9, 50, 5, 300])
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    got = fast_paged_attention(q, k, v, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, expected, **TOL)
