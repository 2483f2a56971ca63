"""A pooling engine's requests: each computes its prompt, pools the final hidden states into an
embedding, and finishes in the step that computes its last prompt token (nothing is sampled).

Chunked prefill, prefix caching (last-token pooling only: mean and CLS pooling need every
position's hidden state), preemption and aborts work as for generation; the scheduler sees a
prompt to compute like any other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from pagedserve.engine.request import Request, RequestStatus, RequestTimes
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.model.loader import load_config
from pagedserve.model.pooler import PoolerConfig, has_sentence_transformers_pooler, label_scores
from pagedserve.model.registry import is_headless
from pagedserve.outputs import EmbeddingOutput, EmbeddingRequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.model_runner import ModelRunner

RUNNERS = ("auto", "generate", "pooling")

# The parameters an embedding request carries for the scheduler and the KV cache manager.
_POOLING_REQUEST = SamplingParams(max_tokens=1, detokenize=False)


def resolve_runner(name: str, model_path: str, hf_overrides: dict | None = None) -> str:
    """``generate`` or ``pooling`` (embeddings). ``auto`` pools, as vLLM's does, for a
    sentence-transformers model directory (one whose ``modules.json`` has a Pooling module) or
    a bare decoder (``LlamaModel``, ``Qwen2Model``, ... with no lm head); else it generates."""
    if name not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}; got {name!r}")
    if name != "auto":
        return name
    config = load_config(model_path, hf_overrides)
    if has_sentence_transformers_pooler(model_path) or is_headless(config):
        return "pooling"
    return "generate"


class EmbeddingRequests:
    """The embedding requests in flight, by id."""

    def __init__(
        self,
        pooler: PoolerConfig,
        scheduler: Scheduler,
        runner: ModelRunner,
        max_model_len: int,
        classify: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.pooler = pooler
        # A classifier's head: its output is the input's label scores, not the pooled state.
        self.classify = classify
        self.scheduler = scheduler
        self.runner = runner
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}

    def add(
        self,
        request_id: str,
        token_ids: list[int],
        params: PoolingParams,
        times: RequestTimes,
        cache_salt: str | None,
        priority: int,
        rope_offset: int,
    ) -> None:
        """Queue one prompt (its token ids already checked against the vocabulary)."""
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"the input has {len(token_ids)} tokens; this model's maximum context length "
                f"is {self.max_model_len}"
            )
        self.pooler.check(params)
        req = Request(
            request_id,
            token_ids,
            _POOLING_REQUEST,
            None,
            times,
            cache_salt=cache_salt,
            priority=priority,
        )
        req.rope_offset = rope_offset
        req.pooling = params
        req.pools_every_row = self.pooler.needs_every_row
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None:
            self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)

    def step(self, sched: SchedulerOutput) -> list[EmbeddingRequestOutput]:
        """Run the scheduled step; the outputs of the requests it finished."""
        for batch_row, part in self.runner.pool(sched, self.pooler):
            req = sched.requests[batch_row]
            # A request recomputed after preemption starts its sum again.
            fresh = req.pooled is None or req.num_computed_tokens == 0
            req.pooled = part if fresh else req.pooled + part
        outputs = []
        now = time.time()
        for req, n in zip(sched.requests, sched.num_tokens, strict=True):
            req.num_computed_tokens += n
            if req.num_computed_tokens < req.num_prompt_tokens:
                continue
            assert req.pooled is not None and req.pooling is not None
            if self.classify is not None:
                state = self.pooler.pooled_state(req.pooled, req.num_prompt_tokens)
                embedding = label_scores(self.classify(state[None])[0])
            else:
                embedding = self.pooler.finish(req.pooled, req.num_prompt_tokens, req.pooling)
            req.times.first_token_time = req.times.finished_time = now
            self.scheduler.finish(req, RequestStatus.FINISHED_STOPPED)
            del self.requests[req.request_id]
            outputs.append(
                EmbeddingRequestOutput(
                    req.request_id,
                    req.prompt_token_ids,
                    EmbeddingOutput(embedding),
                    num_cached_tokens=req.num_cached_tokens,
                    metrics=req.times.as_dict(),
                )
            )
        return outputs
