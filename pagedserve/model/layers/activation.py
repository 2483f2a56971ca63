"""Gated activations over a fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.kernels import elementwise


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where the input is ``[..., 2 * d]`` = gate and up side by side."""
    if elementwise.supports(x):
        return elementwise.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (GeGLU) where the input is ``[..., 2 * d]`` = gate and up side by
    side."""
    if elementwise.supports(x):
        return elementwise.gelu_tanh_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
