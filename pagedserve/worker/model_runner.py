"""Turns a scheduled step into one flattened forward pass and returns the sampling rows' logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.model.layers.attention import Attention, AttentionMetadata, build_kernels
from pagedserve.model.pooler import PoolerConfig
from pagedserve.worker.cpu_decode import CpuDecodeStack
from pagedserve.worker.decode_graphs import DecodeGraphs
from pagedserve.worker.kv_cache import KVCache

logger = logging.getLogger(__name__)


class ModelRunner:
    """Owns the model and its KV cache; one :meth:`execute` per engine step.

    Unless ``enforce_eager``, pure-decode steps replay CUDA graphs on CUDA
    (:mod:`pagedserve.worker.decode_graphs`; ``max_num_seqs`` and ``max_model_len`` bound their
    shapes), and on the CPU run all the decoder layers in one C call
    (:mod:`pagedserve.worker.cpu_decode`).
    """

    def __init__(
        self,
        model: nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        max_num_seqs: int,
        max_model_len: int,
        enforce_eager: bool = False,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size
        layers = [m for m in model.modules() if isinstance(m, Attention)]
        assert len(layers) == len(kv_cache.k), "one KV pool per attention layer"
        for layer, k, v in zip(layers, kv_cache.k, kv_cache.v, strict=True):
            layer.k_cache, layer.v_cache = k, v
        model_dtype = next(model.parameters()).dtype
        if device.type == "cpu" and model_dtype == torch.float32 and layers:
            build_kernels(kv_cache.k[0].dtype)
        self.lora_state = getattr(model, "lora_state", None)  # set by a LoRAManager
        self.graphs: DecodeGraphs | None = None
        self.cpu_stack: CpuDecodeStack | None = None
        if device.type == "cpu" and not enforce_eager:
            self.cpu_stack = CpuDecodeStack.build(model, self.block_size)
        # The reference attention walks per-request Python lists, which a graph cannot replay.
        if (
            device.type == "cuda"
            and not enforce_eager
            and layers
            and layers[0].backend != "reference"
        ):
            self.graphs = DecodeGraphs(
                model,
                self.block_size,
                kv_cache.scratch_block,
                max_num_seqs,
                -(-max_model_len // self.block_size),
                device,
            )

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device, non_blocking=True)

    def prepare(
        self, sched: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, np.ndarray]:
        """Flatten the step: token ids, positions, attention metadata, and which rows sample.

        Returns the index (into the step's tokens) of the last token of every request whose
        known tokens are all computed after this step: those are the rows that sample.
        """
        reqs = sched.requests
        counts = np.asarray(sched.num_tokens, dtype=np.int64)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, len(reqs))
        ids: list[int] = []
        for r, start, n in zip(reqs, starts.tolist(), counts.tolist(), strict=True):
            ids.extend(r.all_token_ids[start : start + n])
        cu = np.zeros(len(reqs) + 1, dtype=np.int64)
        np.cumsum(counts, out=cu[1:])
        total = int(cu[-1])
        req_of_token = np.repeat(np.arange(len(reqs)), counts)
        positions = np.arange(total) - cu[:-1][req_of_token] + starts[req_of_token]
        seq_lens = starts + counts

        max_blocks = max(len(r.block_ids) for r in reqs)
        block_tables = np.zeros((len(reqs), max_blocks), dtype=np.int32)
        for i, r in enumerate(reqs):
            block_tables[i, : len(r.block_ids)] = r.block_ids
        bs = self.block_size
        slots = block_tables[req_of_token, positions // bs].astype(np.int64) * bs + positions % bs

        num_known = np.fromiter((r.num_tokens for r in reqs), np.int64, len(reqs))
        sample_rows = np.nonzero(seq_lens == num_known)[0]

        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            query_start_loc=self._to_device(cu.astype(np.int32)),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            block_tables=self._to_device(block_tables),
            query_start_loc_cpu=cu.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            max_query_len=int(counts.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=bs,
        )
        meta.split_decodes()
        input_ids = self._to_device(np.asarray(ids, dtype=np.int64))
        offsets = np.fromiter((r.rope_offset for r in reqs), np.int64, len(reqs))
        if offsets.any():  # longrope's long rows (see RotaryEmbedding); the slots keep positions
            positions = positions + offsets[req_of_token]
        return input_ids, self._to_device(positions), meta, sample_rows

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepLogits:
        """Run the step; return the logits of the sampling rows (and of prompt-logprob rows)."""
        self.kv_cache.copy_blocks(sched.block_copies)
        input_ids, positions, meta, sample_rows = self.prepare(sched)
        with_lora = self._set_lora_rows(sched, meta.query_start_loc_cpu)
        try:
            return self._execute(sched, input_ids, positions, meta, sample_rows, with_lora)
        finally:
            if with_lora:
                self.lora_state.groups = []

    def _set_lora_rows(self, sched: SchedulerOutput, cu: list[int]) -> bool:
        """Tell the projections which of the step's rows belong to which LoRA adapter; False
        when no request of the step has one."""
        if self.lora_state is None:
            return False
        ids = np.fromiter((r.lora_id for r in sched.requests), np.int64, len(sched.requests))
        if not ids.any():
            return False
        of_token = np.repeat(ids, np.diff(np.asarray(cu)))
        self.lora_state.groups = [
            (self._to_device(np.nonzero(of_token == adapter)[0]), adapter)
            for adapter in np.unique(ids[ids > 0]).tolist()
        ]
        return True

    def _execute(
        self,
        sched: SchedulerOutput,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_rows: np.ndarray,
        with_lora: bool,
    ) -> StepLogits:
        cu = meta.query_start_loc_cpu
        wants_prompt_logits = any(r.params.prompt_logprobs is not None for r in sched.requests)
        # Adapter rows are found by their index in the step: every row runs every layer.
        whole = wants_prompt_logits or with_lora
        if not whole:
            logits = self._graph_logits(input_ids, positions, meta, sample_rows)
            if logits is not None:
                return StepLogits(logits, sample_rows, [])
            if self.cpu_stack is not None and self.cpu_stack.applies(meta, len(sample_rows)):
                hidden = self.cpu_stack.run(input_ids, positions, meta)  # every row samples
                return StepLogits(self.model.compute_logits(hidden), sample_rows, [])
        token_rows = self._to_device(np.asarray(cu[1:], dtype=np.int64)[sample_rows] - 1)
        if not whole and len(sample_rows) < cu[-1]:  # only these rows leave
            meta.output_rows = token_rows
            meta.output_reqs = self._to_device(sample_rows.astype(np.int64))
        hidden = self.model(input_ids, positions, meta)
        rows = hidden if meta.output_rows is not None else hidden.index_select(0, token_rows)
        logits = self.model.compute_logits(rows)
        prompt_logits = self._prompt_logits(sched, hidden, cu) if wants_prompt_logits else []
        return StepLogits(logits, sample_rows, prompt_logits)

    @torch.inference_mode()
    def pool(self, sched: SchedulerOutput, pooler: PoolerConfig) -> list[tuple[int, torch.Tensor]]:
        """Run a pooling model's step: ``(batch index, share of its embedding)`` for each request
        whose prompt rows of this step count (see :meth:`PoolerConfig.partial`)."""
        self.kv_cache.copy_blocks(sched.block_copies)
        input_ids, positions, meta, ending = self.prepare(sched)
        cu = meta.query_start_loc_cpu
        encoder = getattr(self.model, "is_encoder", False)  # its layers take every row
        if not pooler.needs_every_row and len(ending) and not encoder:
            # Last-token pooling: the last layer computes only the rows of the prompts that end
            # in this step (as for sampling rows), and those rows are the embeddings.
            meta.output_rows = self._to_device(np.asarray(cu[1:], dtype=np.int64)[ending] - 1)
            meta.output_reqs = self._to_device(ending.astype(np.int64))
            hidden = self.model(input_ids, positions, meta)
            return [(int(i), row.float()) for i, row in zip(ending, hidden, strict=True)]
        hidden = self.model(input_ids, positions, meta)
        pooled = []
        for i, req in enumerate(sched.requests):
            rows = hidden[cu[i] : cu[i + 1]]
            part = pooler.partial(rows, req.num_computed_tokens, req.num_prompt_tokens)
            if part is not None:
                pooled.append((i, part))
        return pooled

    def _graph_logits(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        sample_rows: np.ndarray,
    ) -> torch.Tensor | None:
        """The sampling rows' logits from a decode graph; None where the graphs do not take
        the step. A capture that fails turns the graphs off, with a warning: steps then run
        eagerly, as with ``enforce_eager``."""
        if self.graphs is None or not self.graphs.applies(meta):
            return None
        try:
            logits = self.graphs.run(input_ids, positions, meta)
        except RuntimeError:
            logger.warning("CUDA graph capture failed; decode steps run eagerly", exc_info=True)
            self.graphs = None
            return None
        if len(sample_rows) < len(logits):
            logits = logits[self._to_device(sample_rows)]
        return logits

    def _prompt_logits(
        self, sched: SchedulerOutput, hidden: torch.Tensor, cu: list[int]
    ) -> list[tuple[int, int, torch.Tensor]]:
        prompt_logits = []
        for i, req in enumerate(sched.requests):
            if req.params.prompt_logprobs is None:
                continue
            start = req.num_computed_tokens
            end = min(start + sched.num_tokens[i], req.num_prompt_tokens - 1)
            if end > start:
                rows = hidden[cu[i] : cu[i] + end - start]
                prompt_logits.append((i, start, self.model.compute_logits(rows)))
        return prompt_logits


@dataclass
class StepLogits:
    """A step's logits: one row per sampling request (``sample_rows`` are their batch indices),
    and for requests that asked for prompt logprobs, ``(batch index, first position, logits)``
    of the prompt positions computed in this step (position p predicts prompt token p + 1)."""

    logits: torch.Tensor
    sample_rows: np.ndarray
    prompt_logits: list[tuple[int, int, torch.Tensor]]
