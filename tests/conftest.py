"""Shared fixtures. Expensive things (the packaged model's tokenizer, tiny model directories)
are built once per session."""

from __future__ import annotations

import pytest
from tiny_models import write_tiny_model

from pagedserve.model_path import packaged_model_path
from pagedserve.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The packaged SmolLM2-135M-Instruct GGUF file."""
    return str(packaged_model_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer):
    """``tiny_model_dir(kind)`` -> path of a tiny random HF model directory with SmolLM2's
    tokenizer; kinds: llama, llama_tied, llama_sharded, qwen2 (see tests/tiny_models.py)."""
    made: dict[str, str] = {}

    def make(kind: str = "llama") -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            made[kind] = str(write_tiny_model(path, kind, smollm2_tokenizer))
        return made[kind]

    return make
