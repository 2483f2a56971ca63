"""Architecture name (``config.architectures[0]``) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.model.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextOfMultimodal
from pagedserve.model.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,  # q/k/v and gate/up stored fused, as ours are
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3TextOfMultimodal,
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
    return MODEL_REGISTRY[name]
