"""Architecture name (``config.architectures[0]``) -> model class."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from pagedserve.model.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

logger = logging.getLogger(__name__)

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}

SUPPORTED_ARCHITECTURES = tuple(MODEL_REGISTRY)


def check_architecture(architectures: list[str] | None, where: str) -> str:
    """The first supported name in ``architectures``, or a ``ValueError`` listing what is."""
    for name in architectures or []:
        if name in MODEL_REGISTRY:
            return name
    raise ValueError(
        f"unsupported model architecture {architectures!r} in {where}; "
        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def get_model_class(config: Any) -> type[nn.Module]:
    name = check_architecture(getattr(config, "architectures", None), "the model config")
    # transformers leaves it None where a config does not use it (Qwen2/3's use_sliding_window).
    window = getattr(config, "sliding_window", None)
    if window and window < config.max_position_embeddings:
        logger.warning(
            "sliding_window=%d is not implemented: attention is full; outputs past %d tokens "
            "differ from the reference",
            window,
            window,
        )
    return MODEL_REGISTRY[name]
