"""Architecture name (``config.architectures[0]``) -> model class."""

from __future__ import annotations

from typing import Any

from torch import nn

from pagedserve.model.bert import (
    BertForSequenceClassification,
    BertModel,
    RobertaForSequenceClassification,
    RobertaModel,
)
from pagedserve.model.gemma import (
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextOfMultimodal,
    GemmaForCausalLM,
)
from pagedserve.model.granite import GraniteForCausalLM
from pagedserve.model.llama import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen3ForCausalLM,
    Qwen3ForSequenceClassification,
)
from pagedserve.model.modernbert import ModernBertForSequenceClassification, ModernBertModel
from pagedserve.model.moe import MixtralForCausalLM, Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from pagedserve.model.olmo2 import Olmo2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,  # q/k/v and gate/up stored fused, as ours are
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "GraniteForCausalLM": GraniteForCausalLM,  # model/granite.py
    "Olmo2ForCausalLM": Olmo2ForCausalLM,  # model/olmo2.py
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3TextOfMultimodal,
    # Mixture-of-Experts decoders (model/moe.py).
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    # Decoders saved without their lm head (embedding models such as e5-mistral); they run
    # only as pooling models, their tensor names lacking the ``model.`` prefix.
    "LlamaModel": LlamaForCausalLM,
    "MistralModel": LlamaForCausalLM,
    "Qwen2Model": Qwen2ForCausalLM,
    "Qwen3Model": Qwen3ForCausalLM,
    # Encoders (embeddings only; see model/bert.py).
    "BertModel": BertModel,
    "RobertaModel": RobertaModel,
    "XLMRobertaModel": RobertaModel,
    # Cross-encoders (scores of text pairs: /score, /rerank).
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": RobertaForSequenceClassification,
    "XLMRobertaForSequenceClassification": RobertaForSequenceClassification,
    # ModernBERT: an encoder with rotary positions and local attention (model/modernbert.py)
    "ModernBertModel": ModernBertModel,
    "ModernBertForSequenceClassification": ModernBertForSequenceClassification,
    # Decoder classifiers and reward models (last-token pooling, a score head).
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "MistralForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "Qwen3ForSequenceClassification": Qwen3ForSequenceClassification,
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
    return MODEL_REGISTRY[architecture_name(config)]


def architecture_name(config: Any) -> str:
    """The supported architecture name the config lists first."""
    return check_architecture(getattr(config, "architectures", None), "the model config")


def is_headless(config: Any) -> bool:
    """Whether the checkpoint is a bare decoder (``LlamaModel``...) with no lm head."""
    return not architecture_name(config).endswith(("ForCausalLM", "ForConditionalGeneration"))


def check_not_moe(config: Any, what: str) -> None:
    """Refuse ``what`` (a flag, a weight format) for a Mixture-of-Experts architecture, whose
    experts are stacked tensors rather than the projections that path works on."""
    name = architecture_name(config)
    if getattr(MODEL_REGISTRY[name], "is_moe", False):
        raise ValueError(
            f"{what} is not supported for Mixture-of-Experts models ({name}); "
            "serve the model without it"
        )
