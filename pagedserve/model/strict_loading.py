"""Strict loading of checkpoint tensors into a model's parameters: a name that matches nothing,
a shape that differs or a parameter left unfilled is an error, never a silent random weight."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def copy_into(params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor) -> None:
    """Copy the checkpoint's ``name`` into the parameter of that name."""
    if name not in params:
        raise ValueError(f"checkpoint weight {name!r} matches no model parameter")
    if tensor.shape != params[name].shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)} != "
            f"model shape {tuple(params[name].shape)}"
        )
    params[name].data.copy_(tensor)


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Refuse an integer or boolean tensor where a model's weights are floating point: copying
    it in would cast its values to meaningless weights (a quantized checkpoint's packed
    integers, say) and the model would load and compute garbage."""
    if not tensor.is_floating_point():
        raise ValueError(
            f"checkpoint weight {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
            "expected a floating-point dtype (float32, bfloat16, float16)"
        )


def check_complete(missing: Iterable[str]) -> None:
    """Refuse a checkpoint that left parameters (or shards of them) unfilled."""
    missing = sorted(missing)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint lacks {len(missing)} weights: {shown}")
