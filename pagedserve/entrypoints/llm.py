"""The offline ``LLM`` class: batch generation and chat, as in vLLM."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from pagedserve.config import EngineConfig
from pagedserve.engine.beam_search import BeamSearchParams, request_output, search
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.entrypoints.scoring import cosine, pair_token_ids, score_pairs
from pagedserve.lora.request import LoRARequest
from pagedserve.outputs import (
    ClassificationOutput,
    ClassificationRequestOutput,
    EmbeddingRequestOutput,
    RequestOutput,
    ScoringOutput,
    ScoringRequestOutput,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams

PromptType = str | dict[str, Any]
Message = dict[str, Any]


class LLM:
    """Generate completions for batches of prompts with one engine.

    ``LLM()`` loads the packaged SmolLM2-135M-Instruct; ``LLM("dir_or.gguf", dtype=...,
    kv_cache_memory=..., ...)`` takes any :class:`EngineConfig` field as a keyword.
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.llm_engine = LLMEngine(engine_config(model, kwargs, "LLM"))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block (between benchmark runs, say); False while running
        requests hold blocks."""
        return self.llm_engine.reset_prefix_cache()

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams()`` with the model's generation-config defaults (temperature, top_p,
        top_k, min_p, the three penalties, max_tokens), as vLLM's; what ``generate`` and ``chat``
        use when given no sampling params."""
        return SamplingParams(**self.llm_engine.generation_config.sampling_defaults)

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the prompts' order.

        A prompt is a string or ``{"prompt_token_ids": [...]}`` (or ``{"prompt": str}``); a dict
        may add ``"cache_salt"``: only prompts with the same salt share cached prefix blocks.
        ``priority``: one per prompt, lower first (``scheduling_policy="priority"``).
        ``lora_request``: the LoRA adapter of every prompt, or one (or None) per prompt
        (``enable_lora=True``).
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("need one SamplingParams, or one per prompt")
        if priority is not None and len(priority) != len(prompts):
            raise ValueError("need one priority per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            lora_request = [lora_request] * len(prompts)
        if len(lora_request) != len(prompts):
            raise ValueError("need one LoRARequest, or one per prompt")
        return self._run(self._submit(prompts, sampling_params, priority, lora_request), use_tqdm)

    def embed(
        self,
        prompts: PromptType | Sequence[PromptType],
        pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[EmbeddingRequestOutput]:
        """vLLM's ``LLM.embed``: each prompt's embedding (``outputs.embedding``), in the
        prompts' order, from a model run as a pooling model (``runner="pooling"``, or a
        sentence-transformers directory). ``truncate_prompt_tokens=k`` embeds each prompt's
        last k tokens."""
        if self.llm_engine.is_classifier:
            raise ValueError(
                "this model is a classifier: it scores text pairs (LLM.score) and classifies "
                "texts (LLM.classify), it does not embed"
            )
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if pooling_params is None or isinstance(pooling_params, PoolingParams):
            pooling_params = [pooling_params or PoolingParams()] * len(prompts)
        if len(pooling_params) != len(prompts):
            raise ValueError("need one PoolingParams, or one per prompt")
        if truncate_prompt_tokens is not None:
            prompts = self._truncated(prompts, truncate_prompt_tokens)
        return self._run(self._submit(prompts, pooling_params), use_tqdm)

    def _truncated(self, prompts: Sequence[PromptType], keep: int) -> list[PromptType]:
        """Each prompt's last ``keep`` tokens (vLLM's ``truncate_prompt_tokens``)."""
        if keep < 1:
            raise ValueError("truncate_prompt_tokens must be >= 1")
        tokenizer = self.get_tokenizer()
        return [{"prompt_token_ids": _token_ids(tokenizer, p)[-keep:]} for p in prompts]

    def classify(
        self,
        prompts: PromptType | Sequence[PromptType],
        use_tqdm: bool = True,
        truncate_prompt_tokens: int | None = None,
    ) -> list[ClassificationRequestOutput]:
        """vLLM's ``LLM.classify``: each prompt's class probabilities (``outputs.probs``) from a
        sequence classifier (``*ForSequenceClassification``)."""
        if not self.llm_engine.is_classifier:
            raise ValueError("this model has no classification head (*ForSequenceClassification)")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if truncate_prompt_tokens is not None:
            prompts = self._truncated(prompts, truncate_prompt_tokens)
        outputs = self._run(self._submit(prompts, [PoolingParams()] * len(prompts)), use_tqdm)
        return [
            ClassificationRequestOutput(
                o.request_id, o.prompt_token_ids, ClassificationOutput(o.outputs.embedding)
            )
            for o in outputs
        ]

    def score(
        self,
        data_1: str | Sequence[str],
        data_2: str | Sequence[str],
        truncate_prompt_tokens: int | None = None,
        use_tqdm: bool = True,
    ) -> list[ScoringRequestOutput]:
        """vLLM's ``LLM.score``: the score of ``data_1`` (one text, or one per ``data_2``
        text) against each ``data_2`` text, in order: a cross-encoder's relevance of each pair
        (``*ForSequenceClassification``), or an embedding model's cosine similarity."""
        pairs = score_pairs(data_1, data_2)
        tokenizer = self.get_tokenizer()
        if self.llm_engine.is_classifier:
            prompts = [
                {"prompt_token_ids": pair_token_ids(tokenizer, a, b, truncate_prompt_tokens)}
                for a, b in pairs
            ]
            params = [PoolingParams()] * len(prompts)
            outputs = self._run(self._submit(prompts, params), use_tqdm)
            return [
                ScoringRequestOutput(
                    o.request_id, o.prompt_token_ids, ScoringOutput(o.outputs.embedding[0])
                )
                for o in outputs
            ]
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))  # each embedded once
        outputs = self.embed(
            texts, use_tqdm=use_tqdm, truncate_prompt_tokens=truncate_prompt_tokens
        )
        embedded = dict(zip(texts, outputs, strict=True))
        results = []
        for a, b in pairs:
            first, second = embedded[a], embedded[b]
            similarity = cosine(first.outputs.embedding, second.outputs.embedding)
            results.append(
                ScoringRequestOutput(
                    str(next(self._ids)),
                    first.prompt_token_ids + second.prompt_token_ids,
                    ScoringOutput(similarity),
                )
            )
        return results

    def _submit(
        self,
        prompts: Sequence[PromptType],
        params: Sequence[SamplingParams] | Sequence[PoolingParams],
        priority: Sequence[int] | None = None,
        lora_requests: Sequence[LoRARequest | None] | None = None,
    ) -> list[str]:
        ids = []
        try:
            for i, (prompt, one) in enumerate(zip(prompts, params, strict=True)):
                request_id = str(next(self._ids))
                salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
                self.llm_engine.add_request(
                    request_id,
                    prompt_input(prompt),
                    one,
                    cache_salt=salt,
                    priority=0 if priority is None else priority[i],
                    lora_request=None if lora_requests is None else lora_requests[i],
                )
                ids.append(request_id)
        except BaseException:
            self.llm_engine.abort_request(ids)
            raise
        return ids

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template: str | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        lora_request: LoRARequest | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.get_tokenizer()
        prompts: list[PromptType] = []
        for conversation in conversations:
            ids = tokenizer.apply_chat_template(
                conversation,
                tokenize=True,
                return_dict=True,
                add_generation_prompt=add_generation_prompt and not continue_final_message,
                continue_final_message=continue_final_message,
                chat_template=chat_template,
                **(chat_template_kwargs or {}),
            )["input_ids"]
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request=lora_request)

    def beam_search(
        self, prompts: PromptType | Sequence[PromptType], params: BeamSearchParams
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.beam_search``: each prompt's ``beam_width`` best beams, as a finished
        output with one completion per beam, best first (see ``engine.beam_search``). The
        searches of all prompts share each step."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        engine = self.llm_engine
        token_ids = []
        for prompt in prompts:
            ids = _token_ids(engine.tokenizer, prompt)
            if len(ids) + params.max_tokens > engine.max_model_len:
                raise ValueError(
                    f"a prompt of {len(ids)} tokens and max_tokens {params.max_tokens} exceed the "
                    f"context length {engine.max_model_len}"
                )
            token_ids.append(ids)
        searches = [search(ids, params, engine.eos_token_ids) for ids in token_ids]
        pending = {i: next(s) for i, s in enumerate(searches)}
        results = {}
        step = params.step_params()
        while pending:
            request_ids = []
            for sequences in pending.values():
                for sequence in sequences:
                    request_ids.append(str(next(self._ids)))
                    engine.add_request(request_ids[-1], sequence, step)
            outputs = iter(self._run(request_ids, use_tqdm=False))
            following = {}
            for i, sequences in pending.items():
                candidates = [next(outputs).outputs[0].logprobs[0] for _ in sequences]
                try:
                    following[i] = searches[i].send(candidates)
                except StopIteration as done:
                    results[i] = done.value
            pending = following
        return [
            request_output(
                str(i),
                prompt if isinstance(prompt, str) else None,
                token_ids[i],
                results[i],
                engine.tokenizer,
                params,
            )
            for i, prompt in enumerate(prompts)
        ]

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[Any]:
        """Step until the requests are done; their final outputs, in their order."""
        engine = self.llm_engine
        done: dict[str, Any] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", disable=not use_tqdm)
        out_tokens = 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update(1)
                        if isinstance(output, RequestOutput):
                            out_tokens += sum(len(o.token_ids) for o in output.outputs)
                            elapsed = bar.format_dict["elapsed"] or 1e-9
                            bar.set_postfix_str(f"output: {out_tokens / elapsed:.1f} tok/s")
        except BaseException:
            engine.abort_request(request_ids)
            raise
        finally:
            bar.close()
        return [done[i] for i in request_ids]


def engine_config(model: str | None, kwargs: dict[str, Any], caller: str) -> EngineConfig:
    """The EngineConfig of ``caller(model, **kwargs)``; a TypeError names unknown keywords."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    unknown = set(kwargs) - fields
    if unknown:
        raise TypeError(f"unknown {caller} arguments: {', '.join(sorted(unknown))}")
    return EngineConfig(model=model, **kwargs)


def _token_ids(tokenizer: Any, prompt: PromptType) -> list[int]:
    given = prompt_input(prompt)
    if isinstance(given, list):
        return given
    return tokenizer.encode(given, add_special_tokens=True)


def prompt_input(prompt: PromptType) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a prompt is a string, {'prompt': str} or {'prompt_token_ids': [...]}")
