"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import elementwise


class RMSNorm(nn.Module):
    """``weight * x / rms(x)``, normalised in float32 as Hugging Face's LlamaRMSNorm does.

    Called with a ``residual``, it first adds it to ``x`` and returns ``(normed, x + residual)``,
    so a decoder layer carries the residual stream without a separate add kernel; the caller
    gives ``residual`` up (the C path writes the sum over it). Float32 CPU tensors take one C
    kernel pass (:mod:`pagedserve.kernels.elementwise`), others the PyTorch code.
    """

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if x.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), shape, None, self.eps).to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            if elementwise.supports(x, self.weight):
                return elementwise.rms_norm(x, self.weight, self.eps)
            return self._norm(x)
        if elementwise.supports(x, residual, self.weight):
            return elementwise.add_rms_norm(x, residual, self.weight, self.eps)
        x = x + residual
        return self._norm(x), x


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``x / rms(x) * (1 + weight)``, in float32 whatever the dtype of ``x``
    (Gemma checkpoints store the weight around 0). :meth:`prepare`, after loading, keeps
    ``1 + weight`` in float32 so that a float32 CPU tensor takes the C kernel."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.eps = eps
        self.scale: torch.Tensor | None = None

    def prepare(self) -> None:
        self.scale = 1.0 + self.weight.detach().float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale if self.scale is not None else 1.0 + self.weight.float()
        if elementwise.supports(x, scale):
            return elementwise.rms_norm(x, scale, self.eps)
        return (F.rms_norm(x.float(), (x.shape[-1],), None, self.eps) * scale).to(x.dtype)
