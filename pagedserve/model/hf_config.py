"""Configs and weights of Hugging Face model directories (config.json + *.safetensors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from pagedserve.model.registry import check_architecture

SAFETENSORS_INDEX = "model.safetensors.index.json"


def hf_config(model_dir: Path) -> PretrainedConfig:
    """The directory's config, after checking its architecture is one we implement (so an
    unsupported model fails with our list of supported ones, not a transformers error)."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json")
    raw = json.loads(config_file.read_text())
    check_architecture(raw.get("architectures"), str(config_file))
    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except StrictDataclassError as exc:  # a field of the wrong type: transformers names it
        raise ValueError(f"{config_file}: {exc}") from exc


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files: those the shard index names, else every ``*.safetensors``."""
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / name for name in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names missing shards: {', '.join(missing)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} has no *.safetensors weights (PyTorch .bin checkpoints are not supported)"
        )
    return files


def safetensors_weights(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of every shard, in its checkpoint dtype, one at a time."""
    for file in safetensors_files(model_dir):
        with safe_open(file, framework="pt") as shard:
            for name in shard.keys():
                yield name, shard.get_tensor(name)
