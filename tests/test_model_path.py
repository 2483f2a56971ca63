"""Resolving and loading model paths: the packaged default, local paths, the local HF cache,
and clear errors for everything else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from pagedserve.model.loader import load_model
from pagedserve.model_path import resolve_model

CPU = torch.device("cpu")


def test_default_is_the_packaged_gguf(smollm2_path):
    assert resolve_model(None) == smollm2_path
    assert smollm2_path.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_local_directory_and_gguf_file(tiny_model_dir, smollm2_path):
    directory = tiny_model_dir("llama")
    assert resolve_model(directory) == directory
    assert resolve_model(smollm2_path) == smollm2_path
    assert resolve_model(str(Path(smollm2_path).parent)) == smollm2_path  # the dir's only .gguf


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("/no/such/model.gguf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model("./no-such-dir/")


def test_not_a_model(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a .gguf model"):
        resolve_model(str(text))
    with pytest.raises(ValueError, match="no config.json and no .gguf"):
        resolve_model(str(tmp_path))


def test_hub_id_not_in_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_hub_id_from_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A Hub id resolves to its snapshot in the cache layout huggingface_hub writes."""
    repo = tmp_path / "models--org--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    resolved = resolve_model("org/tiny")
    assert Path(resolved) == repo / "snapshots" / commit
    assert load_model(resolved, torch.float32, CPU).config.num_hidden_layers == 2


def test_unknown_architecture(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*supported: LlamaForCausalLM"):
        load_model(str(model), torch.float32, CPU)


def test_missing_weights(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    (model / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_model(str(model), torch.float32, CPU)


def test_missing_shard(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama_sharded"), model)
    next(model.glob("model-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="missing shards"):
        load_model(str(model), torch.float32, CPU)


def test_unsupported_dtype(tiny_model_dir):
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_model_dir("llama"), torch.int8, CPU)
