"""The adapters of one projection, and how a step adds their products to its output.

A step may mix requests of several adapters and of none: the runner puts each adapter's rows in
:class:`LoRAState` before the forward pass, and every projection that an adapter targets adds
``(x[rows] A^T) B^T`` (``B`` pre-scaled by ``alpha / r``) to those rows of its output, shard by
shard for a fused q/k/v or gate/up projection. The packed GEMM still computes every row; a step
without adapter rows costs one empty-list check per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pagedserve.model.layers.activation import silu_and_mul

# One adapter's pair on one output slice: A [r, in], B [width, r] (scaled), the slice's start.
Pair = tuple[torch.Tensor, torch.Tensor, int]


@dataclass
class LoRAState:
    """The step's rows (token indices into the step) of each adapter, by adapter id; empty
    outside steps with adapter requests."""

    groups: list[tuple[torch.Tensor, int]] = field(default_factory=list)


class LoRAWeights:
    """The adapters loaded for one projection, by adapter id."""

    def __init__(self, state: LoRAState) -> None:
        self.state = state
        self.adapters: dict[int, list[Pair]] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base product of ``x``) with each adapter's rows corrected, in place."""
        for rows, adapter in self.state.groups:
            pairs = self.adapters.get(adapter)
            if pairs is not None:
                y.index_add_(0, rows, _delta(x.index_select(0, rows), pairs, y.shape[-1]))
        return y

    def add_gated(
        self, x: torch.Tensor, out: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """A SwiGLU ``silu(gate) * up`` output ``out`` with each adapter's rows recomputed from
        their corrected gate/up products (the activation comes after the adapter's term)."""
        for rows, adapter in self.state.groups:
            pairs = self.adapters.get(adapter)
            if pairs is not None:
                xs = x.index_select(0, rows)
                gate_up = F.linear(xs, weight, bias)
                gate_up += _delta(xs, pairs, gate_up.shape[-1])
                out.index_copy_(0, rows, silu_and_mul(gate_up))
        return out


def _delta(xs: torch.Tensor, pairs: list[Pair], width: int) -> torch.Tensor:
    """One adapter's term for the rows ``xs``, over the projection's whole output width."""
    delta = xs.new_zeros(len(xs), width)
    for a, b, start in pairs:
        delta[:, start : start + b.shape[0]] += (xs @ a.t()) @ b.t()
    return delta
