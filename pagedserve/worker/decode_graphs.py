"""Decode steps replayed from CUDA graphs: one launch instead of about a thousand.

On a GPU a small model's decode step is bound by the CPU launching kernels, not by the GPU
(SmolLM2-135M on an H100, 256 sequences: about 4 ms of GPU work behind 30-40 ms of launches in
bfloat16). A step in which every request computes one token runs its forward pass and lm head from
a graph captured for its padded shape: the batch rounded up to a bucket of
:data:`BATCH_BUCKETS`, the block tables to a power-of-two width. Padded rows compute token 0 at
position 0 into the KV cache's scratch block, which no request owns, and their logits are dropped.

A graph is captured the first time its shape is met; all share one memory pool and one set of
static input and output buffers. On a CPU the same padded pass runs eagerly (no capture): the
engine does not use it there, tests do, to check the padding against the plain step.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import torch
from torch import nn

from pagedserve.model.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class DecodeGraphs:
    """Runs pure-decode steps of up to ``max_num_seqs`` requests through captured graphs.

    ``scratch_block`` is a KV block outside the scheduler's pool; ``max_blocks`` is the widest
    block table a request can have (its context length over the block size).
    """

    def __init__(
        self,
        model: nn.Module,
        block_size: int,
        scratch_block: int,
        max_num_seqs: int,
        max_blocks: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        self.max_blocks = _next_power_of_two(max_blocks)
        self.device = device
        self.capture = device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps: dict[tuple[int, int], Callable[[], None]] = {}
        self._buffers_ready = False

    def _allocate(self) -> None:
        """The static buffers every graph reads and writes (allocated at the first step, in
        the engine's inference mode)."""
        rows, vocab = self.buckets[-1], self.model.config.vocab_size
        longs = dict(dtype=torch.long, device=self.device)
        ints = dict(dtype=torch.int32, device=self.device)
        self.input_ids = torch.zeros(rows, **longs)
        self.positions = torch.zeros(rows, **longs)
        self.slots = torch.full((rows,), self.scratch_slot, **longs)
        self.seq_lens = torch.ones(rows, **ints)
        self.query_start_loc = torch.arange(rows + 1, **ints)
        self.block_tables = torch.full((rows, self.max_blocks), self.scratch_block, **ints)
        self.logits = torch.zeros(rows, vocab, dtype=torch.float32, device=self.device)
        self._buffers_ready = True

    def applies(self, meta: AttentionMetadata) -> bool:
        """Whether this step is one the graphs run: one token per request, and a shape within
        the captured range."""
        return (
            meta.max_query_len == 1
            and meta.num_reqs <= self.buckets[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The float32 logits ``[B, vocab]`` of every row of a step that :meth:`applies`. The
        result is a view of a static buffer: the next step overwrites it."""
        if not self._buffers_ready:
            self._allocate()
        rows = meta.num_reqs
        padded = self.buckets[bisect.bisect_left(self.buckets, rows)]
        width = meta.block_tables.shape[1]
        blocks = min(self.max_blocks, _next_power_of_two(width))
        self.input_ids[:rows].copy_(input_ids)
        self.positions[:rows].copy_(positions)
        self.slots[:rows].copy_(meta.slot_mapping)
        self.seq_lens[:rows].copy_(meta.seq_lens)
        self.block_tables[:rows, :width].copy_(meta.block_tables)
        # Earlier, larger steps left real requests' slots in the padded rows: point them back
        # at the scratch block (columns past a row's length are masked, whatever they hold).
        self.slots[rows:padded].fill_(self.scratch_slot)
        self.seq_lens[rows:padded].fill_(1)
        self.block_tables[rows:padded, 0].fill_(self.scratch_block)
        key = (padded, blocks)
        step = self.steps.get(key)
        if step is None:
            step = self.steps[key] = self._capture(padded, blocks)
        step()
        return self.logits[:rows]

    def _forward(self, rows: int, blocks: int) -> None:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:rows],
            query_start_loc=self.query_start_loc[: rows + 1],
            seq_lens=self.seq_lens[:rows],
            block_tables=self.block_tables[:rows, :blocks],
            query_start_loc_cpu=list(range(rows + 1)),
            seq_lens_cpu=[1] * rows,  # only its length is read on the decode path
            max_query_len=1,
            max_seq_len=blocks * self.block_size,
            block_size=self.block_size,
            prefill_reqs=[],
        )
        hidden = self.model(self.input_ids[:rows], self.positions[:rows], meta)
        self.logits[:rows].copy_(self.model.compute_logits(hidden))

    def _capture(self, rows: int, blocks: int) -> Callable[[], None]:
        """A callable that runs the padded step: a graph's replay on CUDA, else the pass itself.

        The warm-up pass on a side stream lets cuBLAS and cuDNN set up outside the capture; it
        writes the same K/V as the replay that follows, so running it is harmless.
        """

        def forward() -> None:
            self._forward(rows, blocks)

        if not self.capture:
            return forward
        main = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            forward()
        main.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            forward()
        logger.debug("captured a decode graph for %d rows x %d blocks", rows, blocks)
        return graph.replay
