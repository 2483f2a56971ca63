"""The fast paged-attention backend (C decode and prefill kernels) matches the reference."""

import pytest
import torch
from paged_steps import random_step
from tiny_models import DEVICES

from pagedserve.model.layers.attention import (
    fast_paged_attention,
    reference_paged_attention,
)


@pytest.mark.parametrize(
    "query_lens,seq_lens",
    [
        ([1, 1, 1, 1], [1, 17, 40, 100]),  # decodes only
        ([5, 1, 20, 1], [5, 33, 52, 16]),  # fresh prefill, decodes, prefill chunk with context
        ([31], [31]),
        ([3, 1], [200, 129]),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_fast_backend_matches_reference(query_lens, seq_lens, device):
    q, k, v, k_cache, v_cache, meta = random_step(
        query_lens, seq_lens, num_heads=6, num_kv_heads=2, head_dim=32, device=device
    )
    scale = 32**-0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    got = fast_paged_attention(q, k, v, k_cache, v_cache, meta, scale)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
