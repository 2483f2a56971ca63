"""The synchronous engine core: add requests, step, abort. The offline LLM and the server use it."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.devices import (
    check_one_device,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from pagedserve.engine.embedding_requests import EmbeddingRequests, resolve_runner
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.output_processor import OutputProcessor, RequestGroup
from pagedserve.engine.request import Request, RequestStatus, RequestTimes
from pagedserve.engine.request_checks import (
    check_logprobs,
    check_prompt,
    check_task,
    check_token_ids,
    resolve_max_logprobs,
)
from pagedserve.engine.scheduler import Scheduler
from pagedserve.lora.manager import LoRAManager
from pagedserve.lora.request import LoRARequest
from pagedserve.model.generation_config import load_generation_config
from pagedserve.model.loader import load_config, load_model
from pagedserve.model.pooler import load_pooler_config, sentence_transformers_max_length
from pagedserve.model.registry import check_not_moe
from pagedserve.model.token_classifier import resolve_token_ids
from pagedserve.model_path import resolve_model
from pagedserve.outputs import EmbeddingRequestOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sample.bad_words import bad_word_sequences
from pagedserve.sample.sampler import Sampler, SamplingRow, gather_logprobs, make_generator
from pagedserve.sample.structured_output import GrammarCompiler
from pagedserve.sample.thinking_budget import thinking_markers, thinking_tracker
from pagedserve.sampling_params import SamplingParams
from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.ngram import NgramSpeculator
from pagedserve.tokenizer import load_tokenizer
from pagedserve.worker.cpu_malloc import keep_freed_memory_in_heap
from pagedserve.worker.kv_cache import KVCache, fitted_context, shared_sliding_window
from pagedserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_total_blocks: int
    num_free_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens: int
    generation_tokens: int
    # speculative decoding: sequences whose drafts were checked, their drafts, those accepted
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_num_accepted_tokens_per_pos: tuple[int, ...] = ()


class LLMEngine:
    """Continuous batching over a paged KV cache, one model step per :meth:`step`."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        check_one_device(config.tensor_parallel_size, config.pipeline_parallel_size)
        if config.trust_remote_code:
            logger.info(
                "trust_remote_code has no effect: pagedserve loads the architectures it "
                "implements and runs no code from the model's directory"
            )
        spec = None
        if config.speculative_config is not None:
            spec = SpeculativeConfig.parse(config.speculative_config)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.kv_cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        torch.manual_seed(config.seed)
        if self.device.type == "cpu":
            keep_freed_memory_in_heap()
        self.model_name = resolve_model(config.model)
        self.tokenizer = load_tokenizer(config.tokenizer or self.model_name, config.chat_template)
        overrides = resolve_token_ids(config.hf_overrides or {}, self.tokenizer)
        self.runner_type = resolve_runner(config.runner, self.model_name, overrides)
        pooling = self.runner_type == "pooling"
        if pooling and spec is not None:
            raise ValueError("speculative decoding is for generation; a pooling model embeds")
        if config.enable_lora:
            check_not_moe(load_config(self.model_name, overrides), "--enable-lora (LoRA adapters)")
        self.model = load_model(self.model_name, self.dtype, self.device, pooling, overrides)
        if getattr(self.model, "is_encoder", False) and not pooling:
            raise ValueError(
                f"{self.model_name} is an encoder: it embeds (--runner pooling), it cannot generate"
            )
        self.pooler = None
        if pooling:
            self.pooler = load_pooler_config(
                self.model_name,
                self.model.config,
                config.pooler_config,
                getattr(self.model, "default_pooling_type", "LAST"),
            )
            classifies = getattr(self.model, "classify", None) is not None
            logger.info(
                "runner pooling: %s of %s pooling%s",
                "class probabilities" if classifies else "embeddings",
                self.pooler.pooling_type.lower(),
                ", normalized" if self.pooler.normalize and not classifies else "",
            )
        self.generation_config = load_generation_config(
            self.model_name, config.generation_config, config.override_generation_config
        )
        if self.generation_config.sampling_defaults:
            logger.info(
                "sampling defaults from the model's generation config (requests that leave "
                "them out get these): %s",
                self.generation_config.sampling_defaults,
            )
        hf = self.model.config
        # An encoder keeps no K/V (see model/bert.py): its blocks only count the tokens of the
        # inputs in flight, and each input runs whole.
        encoder = getattr(self.model, "is_encoder", False)
        longest = getattr(self.model, "max_positions", hf.max_position_embeddings)
        if pooling:
            longest = min(longest, sentence_transformers_max_length(self.model_name) or longest)
        self.max_model_len = min(config.max_model_len or longest, longest)
        self.max_logprobs = resolve_max_logprobs(config.max_logprobs, hf.vocab_size)
        kv_cache = KVCache.for_model(
            hf,
            0 if encoder else hf.num_hidden_layers,
            config.kv_cache_memory,
            config.block_size,
            self.kv_cache_dtype,
            self.device,
            max_useful_tokens=config.max_num_seqs * self.max_model_len,
            gpu_memory_utilization=config.gpu_memory_utilization,
        )
        num_blocks = kv_cache.num_blocks
        whole = encoder or not config.enable_chunked_prefill  # every prompt in one step
        window = None if encoder else shared_sliding_window(self.model)
        budget = config.max_num_batched_tokens
        # A prompt runs whole, or its short tail with its last chunk (see Scheduler._chunk).
        longest_step = self.max_model_len if whole else budget + budget // 16
        self.max_model_len = fitted_context(
            self.max_model_len, num_blocks, config.block_size, window, longest_step
        )
        self.loras: LoRAManager | None = None
        if config.enable_lora:  # an adapter stays loaded while a live request runs with it
            self.loras = LoRAManager(self.model, config.max_lora_rank, self._lora_ids_in_use)
        self.runner = ModelRunner(
            self.model,
            kv_cache,
            self.device,
            config.max_num_seqs,
            self.max_model_len,
            config.enforce_eager,
        )
        caching = config.enable_prefix_caching and not encoder
        self.kv = KVCacheManager(num_blocks, config.block_size, caching, window)
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            max(budget, self.max_model_len) if whole else budget,
            self.max_model_len,
            config.scheduling_policy,
            chunked_prefill=not whole,
        )
        self.eos_token_ids = self._eos_token_ids()
        self.sampler = Sampler(hf.vocab_size, self.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, hf.vocab_size, self.eos_token_ids)
        self.thinking = thinking_markers(config.reasoning_parser, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        self.groups: dict[str, RequestGroup] = {}
        self.embeddings = None
        if self.pooler is not None:
            classify = getattr(self.model, "classify", None)
            if classify is not None and getattr(hf, "type_vocab_size", 1) > 1:
                self.model.sep_token_id = self.tokenizer.sep_token_id  # pairs' token types
            self.embeddings = EmbeddingRequests(
                self.pooler, self.scheduler, self.runner, self.max_model_len, classify
            )
        self.generation_tokens = 0
        self.speculator = None
        if spec is not None:
            self.speculator = NgramSpeculator(spec, self.max_model_len)

    def _eos_token_ids(self) -> set[int]:
        ids = getattr(self.model.config, "eos_token_id", None)
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        ids |= self.generation_config.eos_token_ids
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def is_classifier(self) -> bool:
        """Whether the model has a classification head (``*ForSequenceClassification``): each
        output is its input's label scores; a pair's input makes it a cross-encoder's score."""
        return self.embeddings is not None and self.embeddings.classify is not None

    @property
    def num_blocks(self) -> int:
        return self.kv.pool.num_blocks

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | PoolingParams,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Queue a request; raises ``ValueError`` if it can never run. Requests share cached
        prefix blocks only when their ``cache_salt`` is the same (None for most). ``priority``
        (lower first) needs the ``priority`` scheduling policy. ``PoolingParams`` ask a
        pooling engine for the prompt's embedding; ``SamplingParams`` ask a generating one for
        a completion, with the LoRA adapter ``lora_request`` names if given (``enable_lora``)."""
        if request_id in self.groups or request_id in self._embedding_requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if priority != 0 and self.scheduler.policy != "priority":
            raise ValueError(
                f"priority {priority} needs the priority scheduling policy "
                "(--scheduling-policy priority); this engine serves in arrival order"
            )
        check_task(params, pooling=self.pooler is not None)
        if isinstance(prompt, str):
            prompt_text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            prompt_text, token_ids = None, [int(t) for t in prompt]
        times = RequestTimes(arrival_time=arrival_time or time.time())
        if isinstance(params, PoolingParams):
            assert self.embeddings is not None
            if lora_request is not None:
                raise ValueError("LoRA adapters apply to generation, not to embeddings")
            check_token_ids(token_ids, self.model.config.vocab_size)
            offset = self.model.rope_offset(len(token_ids))
            self.embeddings.add(request_id, token_ids, params, times, cache_salt, priority, offset)
            return
        check_prompt(token_ids, params, self.model.config.vocab_size, self.max_model_len)
        check_logprobs(params, self.max_logprobs)
        lora_id = self._lora_id(lora_request)
        generator = make_generator(params.seed, self.device)
        req = Request(
            request_id,
            token_ids,
            params,
            generator,
            times,
            cache_salt=cache_salt,
            priority=priority,
        )
        req.rope_offset = self.model.rope_offset(len(token_ids))
        req.lora_id = lora_id
        if params.structured_outputs is not None:
            req.grammar = self.grammars.matcher(params.structured_outputs)
        req.thinking = thinking_tracker(self.thinking, params, token_ids)
        if params.bad_words:
            params.bad_words_token_ids = bad_word_sequences(self.tokenizer, params.bad_words)
        params.sampler_cache.clear()  # params reused after a change to their fields: built anew
        group = RequestGroup(request_id, prompt_text, token_ids, params)
        group.sequences.append(self.outputs.new_sequence(req))
        self.groups[request_id] = group
        self.scheduler.add(req)

    def _lora_id(self, lora_request: LoRARequest | None) -> int:
        if lora_request is None:
            return 0
        if self.loras is None:
            raise ValueError(
                f"LoRA adapter {lora_request.lora_name!r} asked for, but this engine serves no "
                "adapters; start it with --enable-lora (LLM(..., enable_lora=True))"
            )
        return self.loras.slot(lora_request)

    def remove_lora(self, name: str) -> bool:
        """Unload the adapter loaded as ``name``; False if there is none. Requests running with
        it finish on it; later ones that name it are refused (``LoRAAdapterUnloadedError``)."""
        return self.loras is not None and self.loras.remove(name)

    def _lora_ids_in_use(self) -> set[int]:
        return {group.sequences[0].request.lora_id for group in self.groups.values()}

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests now and free their blocks; unknown ids are ignored."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            if self.embeddings is not None:
                self.embeddings.abort(request_id)
            group = self.groups.pop(request_id, None)
            if group is None:
                continue
            for seq in group.sequences:
                if not seq.request.is_finished:
                    self.scheduler.finish(seq.request, RequestStatus.FINISHED_ABORTED)
        if self.loras is not None:
            self.loras.release()

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups or self._embedding_requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.groups) + len(self._embedding_requests)

    @property
    def _embedding_requests(self) -> dict[str, Request]:
        return self.embeddings.requests if self.embeddings is not None else {}

    @torch.inference_mode()
    def step(self) -> list[RequestOutput] | list[EmbeddingRequestOutput]:
        """Schedule, run the model once, sample, and return outputs of requests that moved
        (a pooling engine: of the requests whose embedding is done)."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        now = time.time()
        for req in sched.requests:
            if req.times.first_scheduled_time is None:
                req.times.first_scheduled_time = now
        if self.embeddings is not None:
            return self.embeddings.step(sched)
        step = self.runner.execute(sched)
        logits = step.logits
        for batch_row, start, prompt_logits in step.prompt_logits:
            self._prompt_logprobs(sched.requests[batch_row], start, prompt_logits)
        for req, n in zip(sched.requests, sched.num_tokens, strict=True):
            req.num_computed_tokens += n

        sampling: list[Request] = []
        rows: list[SamplingRow] = []
        row_of_logits: list[int] = []
        spans: list[int] = []  # rows of each sampling sequence: 1 + its drafts
        drafts = step.num_drafts.tolist() if step.num_drafts is not None else None
        logit_row = 0
        for i, batch_row in enumerate(step.sample_rows.tolist()):
            req = sched.requests[batch_row]
            if drafts and drafts[i]:  # a row per position it checks (see NgramSpeculator)
                sampling.append(req)
                assert self.speculator is not None
                rows.extend(self.speculator.rows(req))
                row_of_logits.extend(range(logit_row, logit_row + drafts[i] + 1))
                spans.append(drafts[i] + 1)
                logit_row += drafts[i] + 1
                continue
            seqs = [req] + self._fork(req)
            sampling.extend(seqs)
            rows.extend(SamplingRow.of(r) for r in seqs)
            row_of_logits.extend([logit_row] * len(seqs))
            spans.extend([1] * len(seqs))
            logit_row += 1
        if not sampling:
            return []
        if len(row_of_logits) != logits.shape[0]:
            logits = logits[torch.tensor(row_of_logits, device=logits.device)]
        result = self.sampler(logits, rows)
        tokens, entries = result.token_ids, result.logprobs
        if drafts:  # each sequence emits its accepted drafts and the token after them
            assert self.speculator is not None
            tokens, entries = self.speculator.emitted(sampling, spans, tokens, entries)
        else:
            tokens, entries = [[t] for t in tokens], [[e] for e in entries]
        outputs = self._process(sampling, tokens, entries)
        if self.speculator is not None:
            self.speculator.propose(sampling, len(self.scheduler.running))
        return outputs

    def _prompt_logprobs(self, req: Request, start: int, logits: torch.Tensor) -> None:
        group = self.groups[req.request_id]
        targets = req.prompt_token_ids[start + 1 : start + 1 + logits.shape[0]]
        entries = gather_logprobs(
            torch.log_softmax(logits, dim=-1),
            torch.tensor(targets, device=logits.device),
            [req.params.prompt_logprobs] * len(targets),
        )
        self.outputs.add_prompt_logprobs(group, start, entries)

    def _fork(self, req: Request) -> list[Request]:
        """On its first sample, a request with ``n > 1`` becomes ``n`` sequences."""
        params = req.params
        if params.n == 1 or req.num_output_tokens > 0 or req.index != 0:
            return []
        group = self.groups[req.request_id]
        if len(group.sequences) > 1:
            return []
        children = []
        for i in range(1, params.n):
            gen = make_generator(params.seed, self.device, i)
            child = Request(
                req.request_id,
                req.prompt_token_ids,
                params,
                gen,
                req.times,
                index=i,
                cache_salt=req.cache_salt,
                priority=req.priority,
            )
            child.num_cached_tokens = req.num_cached_tokens
            child.rope_offset = req.rope_offset
            child.lora_id = req.lora_id
            if req.grammar is not None:
                child.grammar = req.grammar.deep_copy()
            child.thinking = req.thinking.copy() if req.thinking is not None else None
            self.scheduler.fork(req, child)
            group.sequences.append(self.outputs.new_sequence(child))
            children.append(child)
        return children

    def _process(
        self, sampling: list[Request], token_ids: list[list[int]], logprobs: list[list]
    ) -> list[RequestOutput]:
        """Append each sequence's new tokens (one, or more after accepted drafts) up to the
        first that finishes it."""
        now = time.time()
        touched: dict[str, RequestGroup] = {}
        for req, new_tokens, new_entries in zip(sampling, token_ids, logprobs, strict=True):
            group = self.groups[req.request_id]
            seq = group.sequences[req.index]
            if req.times.first_token_time is None:
                req.times.first_token_time = now
            req.times.last_token_time = now
            for token_id, entry in zip(new_tokens, new_entries, strict=True):
                self.generation_tokens += 1
                status = self.outputs.append(seq, token_id, entry)
                if req.grammar is not None and status is None:
                    status = _grammar_status(req, token_id)
                if status is not None:
                    self.scheduler.finish(req, status)
                    break
            touched[req.request_id] = group
        outputs = []
        for request_id, group in touched.items():
            if group.finished:
                group.sequences[0].request.times.finished_time = now
                del self.groups[request_id]
            outputs.append(
                self.outputs.make_output(group, group.sequences[0].request.num_cached_tokens)
            )
        if self.loras is not None:
            self.loras.release()  # the weights of unloaded adapters whose last request ended
        return outputs

    def get_stats(self) -> EngineStats:
        s = self.scheduler.stats
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.kv.usage,
            num_total_blocks=self.num_blocks,
            num_free_blocks=self.kv.pool.num_free_blocks,
            num_preemptions=s.num_preemptions,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
            prompt_tokens=s.prompt_tokens,
            generation_tokens=self.generation_tokens,
            **(self.speculator.stats() if self.speculator is not None else {}),
        )

    def reset_prefix_cache(self) -> bool:
        return self.kv.reset_prefix_cache()


def _grammar_status(req: Request, token_id: int) -> RequestStatus | None:
    """Feed the sampled token to the sequence's grammar: FINISHED_STOPPED when nothing may follow
    it (the JSON object is closed, the choice is made), FINISHED_ERROR when the grammar failed.
    The mask only lets through tokens the grammar takes, so a failure is the grammar engine
    hitting one of its limits (a regex such as ``a{1000000}`` builds too many lexer states), not
    a token it refused: the text so far cannot be continued inside the constraint."""
    assert req.grammar is not None
    if not req.grammar.consume_token(token_id):
        logger.warning(
            "request %s: its output constraint failed at token %d, the request ends with "
            "finish_reason 'error': %s",
            req.request_id,
            token_id,
            req.grammar.get_error(),
        )
        return RequestStatus.FINISHED_ERROR
    return RequestStatus.FINISHED_STOPPED if req.grammar.is_stopped() else None
