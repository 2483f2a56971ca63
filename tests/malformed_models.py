"""Malformed model directories for tests/test_model_config_errors.py: a tiny model of each
family, copied and edited (its config.json fields, its safetensors tensors)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_dense import write_dense_model
from tiny_models import write_tiny_model
from tiny_moe import MOE_KINDS, write_tiny_moe

from pagedserve.model.loader import load_model

ConfigEdit = Callable[[dict[str, Any]], None]
TensorEdit = Callable[[dict[str, torch.Tensor]], None]


def write_base(path: Path, kind: str) -> Path:
    """A tiny model directory of ``kind`` at ``path``: a MoE kind, a dense one, ``llama``, or
    ``mixtral_stacked`` (Mixtral with transformers 5's stacked expert tensors)."""
    if kind == "mixtral_stacked":
        return write_tiny_moe(path, "mixtral", stacked=True)
    if kind in MOE_KINDS:
        return write_tiny_moe(path, kind)
    if kind == "llama":
        return write_tiny_model(path, kind)
    return write_dense_model(path, kind)


def edited(
    base: Path, dest: Path, config: ConfigEdit | None = None, tensors: TensorEdit | None = None
) -> str:
    """A copy of the model directory ``base`` at ``dest`` with its config.json and its
    safetensors edited in place by ``config`` and ``tensors``."""
    shutil.copytree(base, dest)
    if config is not None:
        raw = json.loads((dest / "config.json").read_text())
        config(raw)
        (dest / "config.json").write_text(json.dumps(raw))
    if tensors is not None:
        weights = load_file(dest / "model.safetensors")
        tensors(weights)
        save_file(weights, dest / "model.safetensors")
    return str(dest)


def load(path: str) -> torch.nn.Module:
    return load_model(path, torch.float32, torch.device("cpu"))


def set_field(**fields: Any) -> ConfigEdit:
    return lambda raw: raw.update(fields)


def drop_field(*names: str) -> ConfigEdit:
    def edit(raw: dict[str, Any]) -> None:
        for name in names:
            raw.pop(name, None)

    return edit


def set_experts(count: int | None) -> ConfigEdit:
    """Set (None: remove) the expert count under both of its names (Qwen3-MoE saves
    ``num_local_experts``, Qwen2-MoE ``num_experts``)."""

    def edit(raw: dict[str, Any]) -> None:
        for name in ("num_experts", "num_local_experts"):
            raw.pop(name, None)
            if count is not None:
                raw[name] = count

    return edit


def put(name: str, tensor: torch.Tensor) -> TensorEdit:
    return lambda weights: weights.__setitem__(name, tensor)


def drop_tensors(prefix: str) -> TensorEdit:
    def edit(weights: dict[str, torch.Tensor]) -> None:
        for name in [n for n in weights if n.startswith(prefix)]:
            del weights[name]

    return edit


def as_int(name: str) -> TensorEdit:
    return lambda weights: weights.__setitem__(name, (weights[name] * 100).to(torch.int32))


def case(kind: str, edit: Any, message: str, what: str) -> Any:
    """One malformed model: ``kind`` edited by ``edit``, refused with an error matching
    ``message``."""
    return pytest.param(kind, edit, message, id=f"{kind}-{what}")
