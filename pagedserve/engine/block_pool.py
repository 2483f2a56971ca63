"""The pool of KV-cache blocks: free list, reference counts and the prefix-cache table."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def hash_block(parent: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    """Key of a full block: chained over its parent so equal keys mean equal prefixes.

    SHA-256 rather than Python's ``hash`` so that one user cannot craft a prompt whose blocks
    collide with another user's cached prefix.
    """
    h = hashlib.sha256(parent or b"")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    h.update(extra)
    return h.digest()


class BlockPool:
    """Hands out block ids and takes them back.

    A block with ref count 0 sits in the free queue, least recently freed first. If it holds a
    full block of some prefix it keeps its hash and stays findable through :meth:`lookup` until
    the pool hands it out again (eviction). Blocks in use (ref count > 0) are never handed out.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_counts = np.zeros(num_blocks, dtype=np.int32)
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use by some request (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def allocate(self, count: int) -> list[int]:
        """Take ``count`` blocks from the free queue, evicting their cached prefixes."""
        if count > len(self.free_queue):
            raise RuntimeError(f"asked for {count} blocks, {len(self.free_queue)} free")
        ids = []
        for _ in range(count):
            block_id, _ = self.free_queue.popitem(last=False)
            self.uncache(block_id)
            self.ref_counts[block_id] = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Add a reference to blocks that a new owner shares (prefix hits, forks)."""
        for block_id in block_ids:
            if self.ref_counts[block_id] == 0:
                del self.free_queue[block_id]
            self.ref_counts[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; pass them tail first so that a prefix's last
        blocks are evicted before its first ones."""
        for block_id in block_ids:
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_queue[block_id] = None

    def lookup(self, block_hash: bytes) -> int | None:
        return self.cached.get(block_hash)

    def cache(self, block_id: int, block_hash: bytes) -> None:
        """Make a full block findable by its hash (the first block with a given hash wins)."""
        if not self.enable_caching or self.block_hash[block_id] is not None:
            return
        if block_hash not in self.cached:
            self.cached[block_hash] = block_id
            self.block_hash[block_id] = block_hash

    def uncache(self, block_id: int) -> None:
        """Make a block unfindable by its hash (if it was the one registered for it)."""
        block_hash = self.block_hash[block_id]
        if block_hash is not None:
            del self.cached[block_hash]
            self.block_hash[block_id] = None

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True
