"""LoRA adapters served beside their base model (vLLM's ``--enable-lora``)."""

from pagedserve.lora.request import LoRARequest

__all__ = ["LoRARequest"]
