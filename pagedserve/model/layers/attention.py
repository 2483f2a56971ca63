"""Paged attention: write this step's K/V into the block pools, attend through block tables.

The model calls :class:`Attention` once per layer with the flattened tokens of every scheduled
request. :func:`reference_paged_attention` is the plain-PyTorch oracle that faster backends are
tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Where each token of one step lives in the paged KV cache.

    T = tokens in the step, B = requests in the step. Request ``i`` owns query rows
    ``query_start_loc[i]:query_start_loc[i+1]``; its context (cached + new tokens) has
    ``seq_lens[i]`` tokens, stored in blocks ``block_tables[i, :ceil(seq_lens[i] / block_size)]``.
    The new tokens are the last ones of the context, so query row j of request i sits at
    position ``seq_lens[i] - query_len_i + j`` and attends causally to positions <= that.
    """

    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32 (unused entries are 0)
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store new keys/values ``[T, Hkv, D]`` at their slots of pools ``[N, block_size, Hkv, D]``."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def gather_context(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first ``seq_len`` tokens of one request's context, ``[seq_len, Hkv, D]``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[:num_blocks].long())
    return blocks.flatten(0, 1)[:seq_len]


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of queries ``[T, Hq, D]`` over paged contexts, one request at a time."""
    out = torch.empty_like(q)
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    for i in range(meta.num_reqs):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        seq_len = meta.seq_lens_cpu[i]
        qlen = end - start
        keys = gather_context(k_cache, meta.block_tables[i], seq_len)
        values = gather_context(v_cache, meta.block_tables[i], seq_len)
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        q_pos = torch.arange(seq_len - qlen, seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        mask = k_pos[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=scale,
        )
        out[start:end] = o.transpose(0, 1)
    return out


class Attention(nn.Module):
    """One layer's attention over the paged KV cache.

    ``k_cache`` / ``v_cache`` are this layer's pools ``[num_blocks, block_size, Hkv, D]``; the
    model runner assigns them after it allocates the cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``q [T, Hq*D]``, ``k``/``v`` ``[T, Hkv*D]`` -> ``[T, Hq*D]``."""
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not allocated"
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = reference_paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)
