"""Benchmark workloads: random prompts of a set length, prompts read from a JSONL file, or
conversations of a ShareGPT file (vLLM's ``--dataset-name sharegpt``).

Random prompts follow vLLM's random dataset so that the same flags give comparable work: token ids
drawn uniformly from the non-special vocabulary, decoded to text (for HTTP benchmarks) and
re-encoded, then trimmed or topped up until the text re-encodes to the requested length (a decoded
sequence of random ids rarely re-encodes to the same number of tokens).
"""

from __future__ import annotations

import json
import random
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


def sharegpt_requests(
    path: str | Path,
    tokenizer: Any,
    num_prompts: int,
    seed: int = 0,
    output_len: int | None = None,
) -> list[SampleRequest]:
    """vLLM's ShareGPT workload: conversations shuffled with ``seed``, each one's first turn as
    the prompt and the length of the reply after it as the output length (or ``output_len``).
    As vLLM, a conversation is skipped with fewer than two turns, a prompt or a reply of fewer
    than 4 tokens, a prompt of more than 1024, or more than 2048 in all."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    requests = []
    for i in order:
        turns = data[i].get("conversations") if isinstance(data[i], dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value"), turns[1].get("value")
        if not isinstance(prompt, str) or not isinstance(reply, str):
            continue
        prompt_len = len(_encode(tokenizer, prompt))
        wanted = output_len or len(_encode(tokenizer, reply))
        if prompt_len < 4 or wanted < 4 or prompt_len > 1024 or prompt_len + wanted > 2048:
            continue
        requests.append(SampleRequest(prompt, prompt_len, wanted))
        if len(requests) == num_prompts:
            break
    if not requests:
        raise ValueError(f"{path}: no conversation fits (see sharegpt_requests)")
    return requests


def dataset_requests(args: Any, tokenizer: Any) -> list[SampleRequest] | None:
    """The prompts of a file workload (``--dataset sharegpt`` or ``custom`` with
    ``--dataset-path``, or ``--dataset FILE.jsonl``); None for the random one."""
    name, path = args.dataset, args.dataset_path
    if name == "random":
        return None
    if name == "sharegpt":
        if path is None:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE.json")
        output_len = args.output_len if args.sharegpt_output_len else None
        return sharegpt_requests(path, tokenizer, args.num_prompts, args.seed, output_len)
    if name == "custom":
        if path is None:
            raise ValueError("--dataset custom needs --dataset-path FILE.jsonl")
        name = path
    return file_requests(name, tokenizer, args.output_len, args.num_prompts)


def load_tokenizer(name: str | None) -> Any:
    """The tokenizer to make and count prompts with: a HF folder, a ``.gguf`` file, a cached Hub
    id, or, when ``name`` is None, the packaged model's."""
    from pagedserve.model_path import resolve_model
    from pagedserve.tokenizer import load_tokenizer as load_model_tokenizer

    return load_model_tokenizer(resolve_model(name))
