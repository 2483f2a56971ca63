"""Paged attention: write this step's K/V into the block pools, attend through block tables.

The model calls :class:`Attention` once per layer with the flattened tokens of every scheduled
request. :func:`reference_paged_attention` is the plain-PyTorch oracle that faster backends are
tested against; :func:`fast_paged_attention` (the default) batches all decodes into one call of
a C kernel on CPU (or a gathered SDPA elsewhere), and all prefill chunks into one call of a C
flash-attention kernel that reads the pools directly (or one SDPA per chunk elsewhere).
``PAGEDSERVE_ATTENTION_BACKEND=reference`` selects the oracle.

A layer with a sliding window (Mistral v0.1, Qwen2/3 with ``use_sliding_window``, Gemma) lets
each query see only its last ``window`` positions (itself included), as transformers'
sliding-window mask does; one with a ``softcap`` (Gemma 2) squashes each score to
``softcap * tanh(score / softcap)`` before the softmax. The C kernels take both (the decode
kernel a soft cap at head sizes 128 and 256, Gemma 2's).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import kv_store, paged_decode_attention, prefill_attention


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
    # Requests with one query token (decodes) and the rest (prefill chunks), for fast backends.
    prefill_reqs: list[int] | None = None  # filled by split_decodes()
    prefill_index: torch.Tensor | None = None  # the same, int32, for the C prefill kernel
    # In a mixed step, the decodes' query rows, block tables and context lengths (gathered once
    # per step rather than once per layer).
    decode_rows: torch.Tensor | None = None
    decode_block_tables: torch.Tensor | None = None
    decode_seq_lens: torch.Tensor | None = None
    # The rows whose hidden state leaves the model (the last token of each request that samples)
    # and their requests, when that is fewer than all rows: the last layer computes only those
    # beyond its K/V. None = every row.
    output_rows: torch.Tensor | None = None  # [N] int64 token rows
    output_reqs: torch.Tensor | None = None  # [N] int64 request indices

    @property
    def num_reqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_decodes(self) -> int:
        assert self.prefill_reqs is not None, "call split_decodes() first"
        return self.num_reqs - len(self.prefill_reqs)

    def split_decodes(self) -> None:
        """Split decodes from prefill chunks by query length (once per step)."""
        qsl = self.query_start_loc_cpu
        self.prefill_reqs = [i for i in range(self.num_reqs) if qsl[i + 1] - qsl[i] != 1]
        if self.prefill_reqs:
            self.prefill_index = torch.tensor(
                self.prefill_reqs, dtype=torch.int32, device=self.seq_lens.device
            )
            prefill = set(self.prefill_reqs)
            decodes = [i for i in range(self.num_reqs) if i not in prefill]
            index = torch.tensor(decodes, dtype=torch.long, device=self.seq_lens.device)
            self.decode_rows = self.query_start_loc[index].long()
            self.decode_block_tables = self.block_tables[index]
            self.decode_seq_lens = self.seq_lens[index]


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Store new keys/values ``[T, Hkv, D]`` at their slots of pools ``[N, block_size, Hkv, D]``
    (rounded to the pools' type when that is narrower)."""
    if kv_store.supports(k, v, k_cache, v_cache):
        kv_store.write_kv(k, v, k_cache, v_cache, slots)
        return
    k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


def build_kernels(kv_dtype: torch.dtype) -> None:
    """Build (or load from the on-disk cache) the C kernels that attention with float32 queries
    over CPU pools of ``kv_dtype`` calls, side by side, at start-up: otherwise gcc runs inside
    the first request (about 5 s for the decode kernel on a fresh machine)."""
    builds = (paged_decode_attention.available, prefill_attention.available, kv_store.available)
    with ThreadPoolExecutor(len(builds)) as pool:
        list(pool.map(lambda available: available(kv_dtype), builds))


def gather_context(
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    dtype: torch.dtype,
    first_block: int = 0,
) -> torch.Tensor:
    """One request's context from block ``first_block`` to position ``seq_len``,
    ``[seq_len - first_block * block_size, Hkv, D]`` in ``dtype``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache.index_select(0, block_table[first_block:num_blocks].long())
    return blocks.flatten(0, 1)[: seq_len - first_block * block_size].to(dtype)


def active_window(window: int | None, max_seq_len: int) -> int | None:
    """The window, or None where it covers every context of the step: then the kernels without
    one give the same answer (Phi-3-mini's 2047 positions, Mistral's 4096, mostly)."""
    return None if window is None or max_seq_len <= window else window


def window_blocks(window: int, block_size: int) -> int:
    """The most blocks that ``window`` consecutive positions can touch."""
    return (window - 1) // block_size + 2


def causal_mask(
    q_pos: torch.Tensor, seq_len: int, window: int | None, first: int = 0
) -> torch.Tensor:
    """``[len(q_pos), seq_len - first]``: which context positions, from ``first`` on, each query
    position attends to."""
    k_pos = torch.arange(first, seq_len, device=q_pos.device)[None, :]
    mask = k_pos <= q_pos[:, None]
    if window is not None:
        mask &= k_pos > q_pos[:, None] - window
    return mask


def reference_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of queries ``[T, Hq, D]`` over paged contexts, one request at a time."""
    out = torch.empty_like(q)
    for i in range(meta.num_reqs):
        start, end = meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1]
        seq_len = meta.seq_lens_cpu[i]
        qlen = end - start
        keys = gather_context(k_cache, meta.block_tables[i], seq_len, q.dtype)
        values = gather_context(v_cache, meta.block_tables[i], seq_len, q.dtype)
        q_pos = torch.arange(seq_len - qlen, seq_len, device=q.device)
        mask = causal_mask(q_pos, seq_len, window)
        o = scaled_attention(
            q[start:end].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            mask,
            scale,
            softcap,
        )
        out[start:end] = o.transpose(0, 1)
    return out


def scaled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` over ``[..., H, L, D]`` tensors (k/v may have fewer heads:
    grouped queries), with a boolean ``mask`` or ``is_causal``. PyTorch's SDPA, unless scores
    are soft-capped: then the math as transformers' eager Gemma 2 does it."""
    if softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=True
        )
    group = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    if is_causal:
        q_len, k_len = scores.shape[-2:]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1, dtype=torch.float32).to(q.dtype), v)


def _decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention by gathering padded contexts; the portable (CUDA, no-compiler) path,
    and that of layers with a sliding ``window`` (which gather only the blocks it covers) or a
    ``softcap``."""
    block_size = k_cache.shape[1]
    num_blocks = -(-max_seq_len // block_size)
    span = torch.arange(num_blocks * block_size, device=q.device)
    if window is not None and window_blocks(window, block_size) < num_blocks:
        num_blocks = window_blocks(window, block_size)
        first = (seq_lens.long() - window).clamp(min=0) // block_size  # [B]
        index = first[:, None] + torch.arange(num_blocks, device=q.device)
        table = block_tables.long().gather(1, index.clamp(max=block_tables.shape[1] - 1))
        positions = first[:, None] * block_size + span[: num_blocks * block_size]
    else:
        table = block_tables[:, :num_blocks].long()
        positions = span[None, :]
    keys = k_cache[table].to(q.dtype).flatten(1, 2).transpose(1, 2)  # [B, Hkv, L, D]
    values = v_cache[table].to(q.dtype).flatten(1, 2).transpose(1, 2)
    mask = positions < seq_lens[:, None]
    if window is not None:
        mask &= positions >= seq_lens[:, None] - window
    mask = mask[:, None, None, :]
    return scaled_attention(q.unsqueeze(2), keys, values, mask, scale, softcap).squeeze(2)


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    window = active_window(window, max_seq_len)
    if paged_decode_attention.supports(q, k_cache, softcap):
        return paged_decode_attention.paged_decode_attention(
            q, k_cache, v_cache, block_tables, seq_lens, scale, window, softcap
        )
    return _decode_torch(
        q, k_cache, v_cache, block_tables, seq_lens, max_seq_len, scale, window, softcap
    )


def fast_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    bf16_products: bool = False,
    window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decodes in one batched kernel call; prefill chunks in another (C kernel on CPU, with
    bfloat16 products if asked and it has them) or each through SDPA."""
    window = active_window(window, meta.max_seq_len)
    if meta.prefill_reqs is None:
        meta.split_decodes()
    if not meta.prefill_reqs:
        return _decode(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            meta.max_seq_len,
            scale,
            window,
            softcap,
        )
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if meta.num_decodes:
        assert meta.decode_rows is not None
        out[meta.decode_rows] = _decode(
            q[meta.decode_rows],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_seq_lens,
            meta.max_seq_len,
            scale,
            window,
            softcap,
        )
    if prefill_attention.supports(q, k_cache):
        prefill_attention.prefill_attention(
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            scale,
            requests=meta.prefill_index,
            out=out,
            bf16_products=bf16_products,
            window=window,
            softcap=softcap,
        )
    else:
        _prefill_sdpa(out, q, k, v, k_cache, v_cache, meta, scale, window, softcap)
    return out


def _prefill_sdpa(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> None:
    """Each prefill chunk through SDPA into its rows of ``out``; the portable path.

    A chunk with no earlier context attends to its own new K/V (no gather from the pools).
    """
    assert meta.prefill_reqs is not None
    qsl = meta.query_start_loc_cpu
    for i in meta.prefill_reqs:
        start, end, seq_len = qsl[i], qsl[i + 1], meta.seq_lens_cpu[i]
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        if seq_len == end - start:
            mask = (
                None if window is None or window >= seq_len else causal_mask(q_pos, seq_len, window)
            )
            o = _sdpa(q[start:end], k[start:end], v[start:end], mask, scale, softcap)
        else:
            # A window needs the context only from the chunk's first query's window on.
            first_pos = 0 if window is None else max(0, seq_len - (end - start) - window + 1)
            first_block = first_pos // meta.block_size
            table = meta.block_tables[i]
            keys = gather_context(k_cache, table, seq_len, q.dtype, first_block)
            values = gather_context(v_cache, table, seq_len, q.dtype, first_block)
            mask = causal_mask(q_pos, seq_len, window, first_block * meta.block_size)
            o = _sdpa(q[start:end], keys, values, mask, scale, softcap)
        out[start:end] = o


def _sdpa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """Attention of ``q [Tq, Hq, D]`` over ``k``/``v`` ``[Tk, Hkv, D]``; causal when no mask.

    Batched 4-D inputs: PyTorch's CPU SDPA runs about 7x faster on them than on 3-D ones.
    """
    o = scaled_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        mask,
        scale,
        softcap,
        is_causal=mask is None,
    )
    return o[0].transpose(0, 1)


class Attention(nn.Module):
    """One layer's attention over the paged KV cache.

    ``k_cache`` / ``v_cache`` are this layer's pools ``[num_blocks, block_size, Hkv, D]``; the
    model runner assigns them after it allocates the cache. ``bf16_products``: the model's
    matmuls run in bfloat16 (see ``Linear``), and so may prefill attention's, over a bfloat16
    cache on a CPU that has them (``prefill_attention.bf16_products_available``).
    ``sliding_window``: how many positions (the query's own included) each query sees; None:
    all before it. ``softcap``: scores become ``softcap * tanh(score / softcap)``.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend = os.environ.get("PAGEDSERVE_ATTENTION_BACKEND", "fast")
        self.bf16_products = False

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        output_only: bool = False,
    ) -> torch.Tensor:
        """``q [T, Hq*D]``, ``k``/``v`` ``[T, Hkv*D]`` -> ``[T, Hq*D]``.

        With ``output_only`` (the last layer) and ``meta.output_rows`` set, every new K/V is
        still stored but only the output rows attend: ``-> [N, Hq*D]`` in their order. Each is
        the last token of its request, so that is a decode over the request's whole context.
        """
        assert self.k_cache is not None and self.v_cache is not None, "KV cache not allocated"
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        rows = meta.output_rows if output_only else None
        if self.backend == "reference":
            out = reference_paged_attention(
                q, self.k_cache, self.v_cache, meta, self.scale, self.sliding_window, self.softcap
            )
            if rows is not None:
                out = out.index_select(0, rows)
        elif rows is not None:
            assert meta.output_reqs is not None
            out = _decode(
                q.index_select(0, rows),
                self.k_cache,
                self.v_cache,
                meta.block_tables.index_select(0, meta.output_reqs),
                meta.seq_lens.index_select(0, meta.output_reqs),
                meta.max_seq_len,
                self.scale,
                self.sliding_window,
                self.softcap,
            )
        else:
            out = fast_paged_attention(
                q,
                k,
                v,
                self.k_cache,
                self.v_cache,
                meta,
                self.scale,
                self.bf16_products,
                self.sliding_window,
                self.softcap,
            )
        return out.reshape(-1, self.num_heads * self.head_dim)
