"""``AsyncLLM``: the engine for asyncio programs, as vLLM's ``AsyncLLM``.

The engine steps on its own thread (the one the server uses, :class:`AsyncEngine`); each
``generate`` is an async iterator of the request's cumulative outputs, and any number of them run
batched together. Leaving an iteration early (``break``, a cancelled task) aborts its request.
One instance serves one event loop: the first ``generate`` or ``encode`` starts the engine from
it.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.entrypoints.llm import PromptType, engine_config, prompt_input
from pagedserve.lora.request import LoRARequest
from pagedserve.outputs import EmbeddingRequestOutput, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams


class AsyncLLM:
    """``AsyncLLM(model, **engine_args)`` takes what ``LLM`` takes.

    >>> llm = AsyncLLM("path/to/model")
    >>> async for out in llm.generate("Hello", SamplingParams(max_tokens=16)):
    ...     print(out.outputs[0].text)
    """

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        config = engine_config(model, kwargs, "AsyncLLM")
        self.engine = AsyncEngine.built(lambda: LLMEngine(config))
        self._ids = itertools.count()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """``SamplingParams()`` with the model's generation-config defaults, as ``LLM``'s."""
        return SamplingParams(**self.engine.sampling_defaults)

    def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        *,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """The request's outputs as it runs, each holding everything generated so far; the
        last one is ``finished``. A refused request raises ``ValueError`` from the first
        iteration."""
        params = sampling_params or self.get_default_sampling_params()
        return self._run(prompt, params, request_id, lora_request, priority)

    def encode(
        self,
        prompt: PromptType,
        pooling_params: PoolingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[EmbeddingRequestOutput]:
        """A pooling model's embedding of ``prompt`` (one output)."""
        return self._run(prompt, pooling_params or PoolingParams(), request_id)

    async def _run(
        self,
        prompt: PromptType,
        params: SamplingParams | PoolingParams,
        request_id: str | None,
        lora_request: LoRARequest | None = None,
        priority: int = 0,
    ) -> AsyncIterator[Any]:
        self.engine.start()  # from the running loop; later calls return at once
        request_id = request_id if request_id is not None else f"async-{next(self._ids)}"
        stream = await self.engine.add_request(
            request_id,
            prompt_input(prompt),
            params,  # type: ignore[arg-type] - the engine takes pooling requests too
            priority=priority,
            lora_request=lora_request,
        )
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()  # no-op once finished

    async def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    async def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix block, between two steps; False while requests hold
        blocks."""
        self.engine.start()
        return await self.engine.call(lambda engine: engine.reset_prefix_cache())

    def shutdown(self) -> None:
        """Stop the engine; requests still running fail."""
        self.engine.shutdown()
