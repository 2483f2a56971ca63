"""The adapters of one projection, and how a step adds their products to its output.

A step may mix requests of several adapters and of none: the runner puts each adapter's rows in
:class:`LoRAState` before the forward pass (None where one adapter has every row), and every
projection that an adapter targets adds ``(x[rows] A^T) B^T`` to those rows of its output. An
adapter's pairs on one projection (one per shard of a fused q/k/v or gate/up projection) are
stacked at load: ``A`` ``[sum r, in]`` and ``B`` ``[out, sum r]``, each pair's ``B`` (scaled by
``alpha / r``) placed at its shard's rows and its own columns, zero elsewhere, so that a
projection's term is two small matmuls whatever its shards. The packed GEMM still computes
every row; a step without adapter rows costs one empty-list check per projection.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

# One adapter's pair on one output slice: A [r, in], B [width, r] (scaled), the slice's start.
Pair = tuple[torch.Tensor, torch.Tensor, int]


class Stacked(NamedTuple):
    """One adapter's pairs on a projection, stacked: ``a`` [sum r, in], ``b`` [out, sum r]."""

    a: torch.Tensor
    b: torch.Tensor

    @classmethod
    def of(cls, pairs: list[Pair], out_features: int) -> Stacked:
        a = torch.cat([p[0] for p in pairs])
        b = a.new_zeros(out_features, a.shape[0])
        column = 0
        for _, pb, start in pairs:
            b[start : start + pb.shape[0], column : column + pb.shape[1]] = pb
            column += pb.shape[1]
        return cls(a, b)


@dataclass
class LoRAState:
    """The step's rows (token indices into the step; None: all of them) of each adapter, by
    adapter id; empty outside steps with adapter requests."""

    groups: list[tuple[torch.Tensor | None, int]] = field(default_factory=list)


class LoRAWeights:
    """The adapters loaded for one projection, by adapter id."""

    def __init__(self, state: LoRAState) -> None:
        self.state = state
        self.adapters: dict[int, Stacked] = {}

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y`` (the base product of ``x``, ``[m, out]``) with each adapter's rows corrected,
        in place."""
        for rows, adapter in self.state.groups:
            stacked = self.adapters.get(adapter)
            if stacked is None:
                continue
            if rows is None:
                y.addmm_(x @ stacked.a.t(), stacked.b.t())
            else:
                xs = x.index_select(0, rows)
                y.index_add_(0, rows, (xs @ stacked.a.t()) @ stacked.b.t())
        return y
