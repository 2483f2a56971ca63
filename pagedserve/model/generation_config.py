"""A model's ``generation_config.json``: its end-of-turn tokens and its makers' sampling defaults.

Instruct models often list the token that ends a turn only there (Gemma's ``<end_of_turn>``,
Llama 3's ``<|eot_id|>``, Qwen's ``<|endoftext|>`` beside ``<|im_end|>``): without it a chat
would run on past its answer. The sampling values (Qwen3's temperature 0.6, top_p 0.95, top_k
20, say) become the defaults of requests that leave them out, as vLLM's default
``--generation-config auto`` makes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FILE = "generation_config.json"

# generation_config.json key -> SamplingParams field, the keys vLLM takes over.
SAMPLING_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "max_new_tokens": "max_tokens",
}


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: frozenset[int] = frozenset()
    sampling_defaults: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields


def load_generation_config(
    model_path: str, source: str = "auto", overrides: dict[str, Any] | None = None
) -> GenerationConfig:
    """``source``: ``auto`` (the model directory's file; a GGUF file has none), ``vllm`` (none:
    the built-in defaults), or a directory holding a ``generation_config.json``. ``overrides``
    (vLLM's ``--override-generation-config``, in the file's keys) go over what it says."""
    unknown = sorted(set(overrides or {}) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(
            f"override_generation_config: {', '.join(unknown)} not taken; the keys are "
            f"{', '.join(SAMPLING_KEYS)}"
        )
    return _parse({**_read(model_path, source), **(overrides or {})})


def _read(model_path: str, source: str) -> dict[str, Any]:
    if source == "vllm":
        return {}
    if source == "auto":
        directory = Path(model_path)
        if not directory.is_dir():
            return {}
    else:
        directory = Path(source)
        if not (directory / FILE).is_file():
            raise FileNotFoundError(f"generation config {source!r} has no {FILE}")
    path = directory / FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _parse(raw: dict[str, Any]) -> GenerationConfig:
    eos = raw.get("eos_token_id")
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    defaults = {ours: raw[key] for key, ours in SAMPLING_KEYS.items() if raw.get(key) is not None}
    return GenerationConfig(frozenset(int(i) for i in eos_ids), defaults)
