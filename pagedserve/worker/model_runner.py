"""Turns a scheduled step into one flattened forward pass and returns the sampling rows' logits."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import NamedTuple

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
        # The reference attention walks per-request Python lists, and a Mixture-of-Experts
        # block picks its experts from the step's data: neither can be replayed from a graph.
        if (
            device.type == "cuda"
            and not enforce_eager
            and layers
            and layers[0].backend != "reference"
            and not getattr(model, "is_moe", False)
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

    def prepare(self, sched: SchedulerOutput) -> PreparedStep:
        """Flatten the step: token ids, positions, attention metadata, and which rows sample.

        A request samples when its known tokens (and speculative drafts) are all computed after
        this step. One that checks drafts attends as one decode per row, each row with its own
        context length (the drafts' K/V are stored before any row attends), so that a step of
        decodes and draft checks is still a pure decode step: the CPU decode stack and the CUDA
        graphs take it, and every row samples.
        """
        reqs = sched.requests
        counts = np.asarray(sched.num_tokens, dtype=np.int64)
        starts = np.fromiter((r.num_computed_tokens for r in reqs), np.int64, len(reqs))
        ids: list[int] = []
        for r, start, n in zip(reqs, starts.tolist(), counts.tolist(), strict=True):
            ids.extend(r.all_token_ids[start : start + n])
            ids.extend(r.spec_token_ids)  # scheduled with the last known token, or empty
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
        drafts = None
        if sched.num_drafts is not None:
            drafts = np.asarray(sched.num_drafts, dtype=np.int64)
            num_known += drafts
        sample_rows = np.nonzero(seq_lens == num_known)[0]
        batch_rows = sample_rows
        attn_counts, attn_cu = counts, cu
        if drafts is not None:  # each checking request's rows become decodes of their own
            per = np.where(drafts > 0, counts, 1)
            entry_req = np.repeat(np.arange(len(reqs)), per)
            split = (drafts > 0)[entry_req]
            within = np.arange(len(entry_req)) - np.repeat(np.cumsum(per) - per, per)
            attn_counts = np.where(split, 1, counts[entry_req])
            seq_lens = np.where(split, starts[entry_req] + within + 1, seq_lens[entry_req])
            block_tables = block_tables[entry_req]
            attn_cu = np.zeros(len(entry_req) + 1, dtype=np.int64)
            np.cumsum(attn_counts, out=attn_cu[1:])
            sample_rows = np.nonzero(split | (seq_lens == num_known[entry_req]))[0]

        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots),
            query_start_loc=self._to_device(attn_cu.astype(np.int32)),
            seq_lens=self._to_device(seq_lens.astype(np.int32)),
            block_tables=self._to_device(block_tables),
            query_start_loc_cpu=attn_cu.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
            max_query_len=int(attn_counts.max()),
            max_seq_len=int(seq_lens.max()),
            block_size=bs,
        )
        meta.split_decodes()
        input_ids = self._to_device(np.asarray(ids, dtype=np.int64))
        offsets = np.fromiter((r.rope_offset for r in reqs), np.int64, len(reqs))
        if offsets.any():  # longrope's long rows (see RotaryEmbedding); the slots keep positions
            positions = positions + offsets[req_of_token]
        return PreparedStep(
            input_ids,
            self._to_device(positions),
            meta,
            sample_rows,
            batch_rows,
            cu.tolist(),
            drafts[batch_rows] if drafts is not None else None,
        )

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> StepLogits:
        """Run the step; return the logits of the sampling rows (and of prompt-logprob rows)."""
        self.kv_cache.copy_blocks(sched.block_copies)
        step = self.prepare(sched)
        with_lora = self._set_lora_rows(sched, step.cu)
        try:
            return self._execute(sched, step, with_lora)
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
        adapters = np.unique(ids).tolist()
        if len(adapters) == 1:  # one adapter has every row: no rows to pick out
            self.lora_state.groups = [(None, adapters[0])]
            return True
        of_token = np.repeat(ids, np.diff(np.asarray(cu)))
        self.lora_state.groups = [
            (self._to_device(np.nonzero(of_token == adapter)[0]), adapter)
            for adapter in adapters
            if adapter > 0
        ]
        return True

    def _lone_adapter(self) -> int | None:
        """The adapter every row of the step has, if one has them all."""
        groups = self.lora_state.groups
        return groups[0][1] if len(groups) == 1 and groups[0][0] is None else None

    def _execute(self, sched: SchedulerOutput, step: PreparedStep, with_lora: bool) -> StepLogits:
        input_ids, positions, meta, sample_rows = step[:4]
        cu = meta.query_start_loc_cpu
        wants_prompt_logits = any(r.params.prompt_logprobs is not None for r in sched.requests)
        if not wants_prompt_logits:
            logits = (
                None if with_lora else self._graph_logits(input_ids, positions, meta, sample_rows)
            )
            if logits is not None:
                return StepLogits(logits, step.batch_rows, [], step.num_drafts)
            stack = self.cpu_stack
            if stack is not None and stack.applies(meta, len(sample_rows)):
                groups = self.lora_state.groups if with_lora else []
                adapters = stack.adapters(groups, len(input_ids)) if groups else None
                if not groups or adapters is not None:  # every row samples
                    hidden = stack.run(input_ids, positions, meta, adapters)
                    logits = self.model.compute_logits(hidden)
                    return StepLogits(logits, step.batch_rows, [], step.num_drafts)
        # Adapter rows are found by their index in the step: every row runs every layer, but
        # where one adapter has them all.
        whole = wants_prompt_logits or (with_lora and self._lone_adapter() is None)
        token_rows = self._to_device(np.asarray(cu[1:], dtype=np.int64)[sample_rows] - 1)
        if not whole and len(sample_rows) < cu[-1]:  # only these rows leave
            meta.output_rows = token_rows
            meta.output_reqs = self._to_device(sample_rows.astype(np.int64))
        hidden = self.model(input_ids, positions, meta)
        rows = hidden if meta.output_rows is not None else hidden.index_select(0, token_rows)
        logits = self.model.compute_logits(rows)
        prompt_logits = self._prompt_logits(sched, hidden, step.cu) if wants_prompt_logits else []
        return StepLogits(logits, step.batch_rows, prompt_logits, step.num_drafts)

    @torch.inference_mode()
    def pool(self, sched: SchedulerOutput, pooler: PoolerConfig) -> list[tuple[int, torch.Tensor]]:
        """Run a pooling model's step: ``(batch index, share of its embedding)`` for each request
        whose prompt rows of this step count (see :meth:`PoolerConfig.partial`)."""
        self.kv_cache.copy_blocks(sched.block_copies)
        input_ids, positions, meta, ending = self.prepare(sched)[:4]
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


class PreparedStep(NamedTuple):
    """A step flattened for the model (see :meth:`ModelRunner.prepare`)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_rows: np.ndarray  # the attention entries whose last row samples
    batch_rows: np.ndarray  # the batch index of each request that samples
    cu: list[int]  # where each request's rows start in the step, and the end
    num_drafts: np.ndarray | None  # per sampling request, the drafts it checks; None: none


@dataclass
class StepLogits:
    """A step's logits: a row per sampling request (``sample_rows`` are their batch indices),
    and for requests that asked for prompt logprobs, ``(batch index, first position, logits)``
    of the prompt positions computed in this step (position p predicts prompt token p + 1)."""

    logits: torch.Tensor
    sample_rows: np.ndarray
    prompt_logits: list[tuple[int, int, torch.Tensor]]
    # Per sampling request, its speculative drafts: it has that many rows more, one per
    # position it checks, in order (None: no drafts in the step)
    num_drafts: np.ndarray | None = None
