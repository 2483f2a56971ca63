"""Benchmark workloads: random prompts of a set length, or prompts read from a JSONL file.

Random prompts follow vLLM's random dataset so that the same flags give comparable work: token ids
drawn uniformly from the non-special vocabulary, decoded to text (for HTTP benchmarks) and
re-encoded, then trimmed or topped up until the text re-encodes to the requested length (a decoded
sequence of random ids rarely re-encodes to the same number of tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_MAX_LENGTH_FIXES = 10


@dataclass
class SampleRequest:
    """One benchmark request: a text prompt or prompt token ids, and its lengths in tokens."""

    prompt: str | list[int]
    prompt_len: int
    expected_output_len: int


def allowed_token_ids(tokenizer: Any) -> np.ndarray:
    """The ids a random prompt may use: the whole vocabulary less special and added tokens."""
    vocab_size = len(tokenizer)
    excluded = set(tokenizer.all_special_ids)
    excluded.update(getattr(tokenizer, "added_tokens_decoder", {}).keys())
    keep = np.ones(vocab_size, dtype=bool)
    keep[[i for i in excluded if 0 <= i < vocab_size]] = False
    return np.flatnonzero(keep)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def text_of_length(
    tokenizer: Any,
    rng: np.random.Generator,
    vocab: np.ndarray,
    length: int,
    prefix: str = "",
) -> tuple[str, int]:
    """Random text that, appended to ``prefix``, re-encodes to about ``prefix + length`` tokens.

    Returns the text (prefix included) and its length in tokens when re-encoded.
    """
    prefix_len = len(_encode(tokenizer, prefix)) if prefix else 0
    target = prefix_len + length
    ids = rng.choice(vocab, size=length).tolist()
    text = prefix + tokenizer.decode(ids)
    encoded = _encode(tokenizer, text)
    for _ in range(_MAX_LENGTH_FIXES):
        if len(encoded) == target:
            break
        if len(encoded) > target:
            ids = encoded[prefix_len:target]
        else:
            ids = encoded[prefix_len:] + rng.choice(vocab, size=target - len(encoded)).tolist()
        text = prefix + tokenizer.decode(ids)
        encoded = _encode(tokenizer, text)
    return text, len(encoded)


def random_text_requests(
    tokenizer: Any,
    num_prompts: int,
    input_len: int,
    output_len: int,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Text prompts of ``prefix_len + input_len`` tokens; all share one random prefix."""
    rng = np.random.default_rng(seed)
    vocab = allowed_token_ids(tokenizer)
    prefix = text_of_length(tokenizer, rng, vocab, prefix_len)[0] if prefix_len > 0 else ""
    requests = []
    for _ in range(num_prompts):
        text, n = text_of_length(tokenizer, rng, vocab, input_len, prefix)
        requests.append(SampleRequest(text, n, output_len))
    return requests


def random_token_requests(
    vocab: np.ndarray,
    num_prompts: int,
    input_len: int,
    output_len: int,
    prefix_len: int = 0,
    seed: int = 0,
) -> list[SampleRequest]:
    """Prompts given as token ids of exactly ``prefix_len + input_len`` tokens (offline use)."""
    rng = np.random.default_rng(seed)
    prefix = rng.choice(vocab, size=prefix_len)
    body = rng.choice(vocab, size=(num_prompts, input_len))
    total = prefix_len + input_len
    return [
        SampleRequest(np.concatenate([prefix, row]).tolist(), total, output_len) for row in body
    ]


def file_requests(
    path: str | Path,
    tokenizer: Any,
    default_output_len: int,
    num_prompts: int | None = None,
) -> list[SampleRequest]:
    """Prompts from a JSONL file, one ``{"prompt": str, "output_len"?: int}`` object a line."""
    requests = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(f"{path}:{lineno}: expected an object with a string 'prompt'")
            prompt = record["prompt"]
            output_len = int(record.get("output_len", default_output_len))
            requests.append(SampleRequest(prompt, len(_encode(tokenizer, prompt)), output_len))
            if num_prompts is not None and len(requests) == num_prompts:
                break
    if not requests:
        raise ValueError(f"{path}: no prompts")
    return requests


def load_tokenizer(name: str | None) -> Any:
    """The tokenizer to make and count prompts with: a HF folder, a ``.gguf`` file, a cached Hub
    id, or, when ``name`` is None, the packaged model's."""
    from pagedserve.model_path import resolve_model
    from pagedserve.tokenizer import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(resolve_model(name))
