"""Per-request use of the block pool: prefix lookup, slot allocation, copy-on-write, freeing,
and the release of blocks a sliding window has passed."""

from __future__ import annotations

from pagedserve.engine.block_pool import BlockPool, hash_block
from pagedserve.engine.request import Request


class KVCacheManager:
    """Gives each request the blocks that hold its tokens' K/V.

    Full blocks are registered in the prefix cache as soon as the tokens that fill them are
    scheduled: the model writes a step's K/V before any attention of that step reads it, so even a
    request admitted in the same step can share them. A request taken out of the step before it
    runs takes them out again (:meth:`drop_unwritten`).

    With a ``sliding_window`` W on every attention layer (Mistral v0.1), a position older than
    the last W of the next token to compute is never attended again: the blocks all of whose
    positions are that old go back to the pool as the request moves on (vLLM's sliding-window
    manager does the same), so a request holds about W / block_size blocks however long it
    grows. Their places in its block table point at the null block, which is never handed
    out and stays zero: a kernel that reads a masked position there reads finite zeros. A
    given-back block keeps its prefix-cache entry until it is handed out again.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        sliding_window: int | None = None,
    ) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.sliding_window = sliding_window
        # The null block is the cache's last; the pool hands out the others.
        self.null_block = num_blocks - 1 if sliding_window else None
        self.pool = BlockPool(num_blocks - 1 if sliding_window else num_blocks, enable_caching)
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) for the runner, then cleared

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request, num_full_blocks: int) -> list[bytes]:
        """Hashes of the request's first ``num_full_blocks`` full blocks (extends its memo)."""
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = request.all_token_ids[i * bs : (i + 1) * bs]
            if hashes:
                hashes.append(hash_block(hashes[-1], tokens))
            else:
                # Blocks computed with an adapter hold that adapter's K/V: only its requests
                # may share them.
                lora = f"\x00lora:{request.lora_id}" if request.lora_id else ""
                salt = ((request.cache_salt or "") + lora).encode()
                hashes.append(hash_block(None, tokens, salt))
        return hashes[:num_full_blocks]

    def find_cached_prefix(self, request: Request) -> list[int]:
        """The longest chain of cached blocks that starts the request's tokens. With a sliding
        window, only the blocks the window of the token after the prefix reads need be cached:
        those before it come back as the null block (see :meth:`_window_hits`).

        Stops one token short of the end, so the last token is always computed and gives logits.
        A request that wants prompt logprobs needs logits at every prompt position, and one
        that mean-pools needs every position's hidden state: no hits.
        """
        if (
            not self.enable_caching
            or request.params.prompt_logprobs is not None
            or request.pools_every_row
        ):
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        if self.sliding_window is not None:
            return self._window_hits(
                [self.pool.lookup(h) for h in self._hashes(request, max_blocks)]
            )
        hits: list[int] = []
        for block_hash in self._hashes(request, max_blocks):
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _window_hits(self, found: list[int | None]) -> list[int]:
        """The longest prefix of ``found`` (each full block's cached block, or None) whose blocks
        that the window of the token after it reads are all cached: null blocks for the ones
        the window has passed, then those (vLLM's sliding-window hits, which let a long
        conversation hit after its first blocks were evicted)."""
        runs, run = [], 0  # cached blocks in a row, ending at each block
        for block_id in found:
            run = run + 1 if block_id is not None else 0
            runs.append(run)
        for length in range(len(found), 0, -1):
            passed = self._num_passed(length * self.block_size, length)
            if runs[length - 1] >= length - passed:
                kept = [b for b in found[passed:length] if b is not None]
                return [self.null_block] * passed + kept
        return []

    def can_allocate(self, request: Request, num_new_tokens: int, hits: list[int]) -> bool:
        """Whether the blocks for ``num_new_tokens`` more tokens fit. Of free ``hits`` only those
        inside the sliding window count: the ones it has passed go back as soon as they are taken
        (a prompt whose cached prefix alone fills the pool would otherwise wait forever)."""
        needed = self._num_new_blocks(request, num_new_tokens, len(hits))
        kept = hits[self._num_passed(request.num_computed_tokens, len(hits)) :]
        evictable_hits = sum(1 for b in kept if self.pool.ref_counts[b] == 0)
        return needed + evictable_hits <= self.pool.num_free_blocks

    def _num_new_blocks(self, request: Request, num_new_tokens: int, num_hit_blocks: int) -> int:
        held = max(len(request.block_ids), num_hit_blocks)
        total = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        needed = max(0, total - held)
        if self._write_block_is_shared(request):
            needed += 1
        return needed

    def _write_block_is_shared(self, request: Request) -> bool:
        """Whether the block the next token is written into is shared (a fork's partial block)."""
        pos = request.num_computed_tokens
        if pos % self.block_size == 0 or pos // self.block_size >= len(request.block_ids):
            return False
        return self.pool.ref_counts[request.block_ids[pos // self.block_size]] > 1

    def allocate(
        self, request: Request, num_new_tokens: int, hits: list[int] | None = None
    ) -> bool:
        """Give the request blocks for ``num_new_tokens`` more tokens; False if they don't fit.

        ``hits`` (on first admission) are cached blocks that become the start of its table;
        ``num_computed_tokens`` must already count them.
        """
        hits = hits or []
        self._release_passed(request)
        if not self.can_allocate(request, num_new_tokens, hits):
            return False
        if hits:
            passed = self._num_passed(request.num_computed_tokens, len(hits))
            self.pool.touch(hits[passed:])
            request.block_ids = [self.null_block] * passed + hits[passed:]
            request.num_released_blocks = passed
        if self._write_block_is_shared(request):
            i = request.num_computed_tokens // self.block_size
            (new_block,) = self.pool.allocate(1)
            self.pending_copies.append((request.block_ids[i], new_block))
            self.pool.free([request.block_ids[i]])
            request.block_ids[i] = new_block
        total = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        if total > len(request.block_ids):
            request.block_ids.extend(self.pool.allocate(total - len(request.block_ids)))
        if self.enable_caching:
            self._cache_full_blocks(request, request.num_computed_tokens + num_new_tokens)
        return True

    def _release_passed(self, request: Request) -> None:
        """Give back the blocks before the sliding window of the request's next token (at
        position ``num_computed_tokens``, which sees that position and the W - 1 before it)."""
        if self.sliding_window is None:
            return
        start = request.num_released_blocks
        passed = self._num_passed(request.num_computed_tokens, len(request.block_ids))
        if passed <= start:
            return
        self.pool.free(request.block_ids[start:passed][::-1])
        request.block_ids[start:passed] = [self.null_block] * (passed - start)
        request.num_released_blocks = passed

    def _num_passed(self, num_computed_tokens: int, num_blocks: int) -> int:
        """How many of a request's first ``num_blocks`` blocks lie wholly before the sliding
        window of its next token (at position ``num_computed_tokens``); 0 without a window."""
        if self.sliding_window is None:
            return 0
        passed = (num_computed_tokens - self.sliding_window + 1) // self.block_size
        return max(0, min(passed, num_blocks))

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        hashes = self._hashes(request, num_full)
        start = request.num_released_blocks
        for block_id, block_hash in zip(
            request.block_ids[start:num_full], hashes[start:], strict=True
        ):
            self.pool.cache(block_id, block_hash)

    def fork(self, parent: Request, child: Request) -> None:
        """Let ``child`` share all of ``parent``'s blocks (copy-on-write on the partial one)."""
        child.block_ids = list(parent.block_ids)
        child.block_hashes = list(parent.block_hashes)
        child.num_released_blocks = parent.num_released_blocks
        self.pool.touch(child.block_ids[child.num_released_blocks :])

    def drop_unwritten(self, request: Request) -> None:
        """Take out of the prefix cache the blocks that were registered for tokens this step
        was to compute, when the request leaves the step before it runs (the priority policy
        preempts a request it already scheduled): their K/V is never written, and a request
        that found them later would attend to whatever the blocks held before."""
        for block_id in request.block_ids[request.num_computed_tokens // self.block_size :]:
            self.pool.uncache(block_id)

    def free(self, request: Request) -> None:
        self.pool.free(request.block_ids[request.num_released_blocks :][::-1])
        request.block_ids = []
        request.num_released_blocks = 0

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies

    @property
    def usage(self) -> float:
        return self.pool.usage

    def reset_prefix_cache(self) -> bool:
        return self.pool.reset_prefix_cache()
