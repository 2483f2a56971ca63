"""pagedserve: a high-throughput LLM inference engine and OpenAI-compatible server."""

from typing import Any

from pagedserve.engine.beam_search import BeamSearchParams
from pagedserve.lora.request import LoRARequest
from pagedserve.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    Logprob,
    RequestOutput,
)
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"
__all__ = [
    "LLM",
    "AsyncLLM",
    "SamplingParams",
    "BeamSearchParams",
    "StructuredOutputsParams",
    "PoolingParams",
    "LoRARequest",
    "EmbeddingRequestOutput",
    "EmbeddingOutput",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "__version__",
]


def __getattr__(name: str) -> Any:
    # LLM and AsyncLLM pull in torch and the model code; load them only when asked for.
    if name == "LLM":
        from pagedserve.entrypoints.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from pagedserve.entrypoints.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
