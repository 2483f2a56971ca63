"""Which adapter a request runs with (vLLM's ``LoRARequest``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT LoRA adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)
    under a name; requests that name the same ``lora_name`` share one loaded copy."""

    lora_name: str
    lora_int_id: int
    lora_path: str
