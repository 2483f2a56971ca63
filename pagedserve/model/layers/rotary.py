"""Rotary position embedding with a precomputed cos/sin table indexed by position.

Supports the plain RoPE of Llama/Qwen2 (``rope_theta``), and the ``linear`` and ``llama3``
frequency scalings of Hugging Face configs. GGUF files of Llama 3.1 carry the llama3 scaling as
per-frequency divisors (``rope_freqs.weight``); :meth:`RotaryEmbedding.set_freq_factors` applies
those.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.kernels import elementwise

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(config: Any) -> tuple[float, dict[str, Any]]:
    """``(rope_theta, scaling)`` from a transformers config, old (``rope_theta`` +
    ``rope_scaling``) or new (``rope_parameters``) style. ``scaling["rope_type"]`` is always set."""
    params = getattr(config, "rope_parameters", None)
    if params:
        scaling = dict(params)
        theta = scaling.pop("rope_theta", getattr(config, "rope_theta", 10000.0))
    else:
        theta = getattr(config, "rope_theta", None) or 10000.0
        scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), scaling


def inverse_frequencies(head_dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Per-pair rotation frequencies ``[head_dim // 2]`` (float32), scaled as ``scaling`` says."""
    partial = scaling.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial} is not supported (only 1.0)")
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth
    blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """The cos/sin of each position, for :func:`apply_rotary` ("rotate half" layout of HF Llama).

    ``cos_sin`` is ``[max_positions, head_dim]``: cosines in the first half, sines in the second,
    stored in the model dtype (Hugging Face also casts cos/sin to the activation dtype).
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.inv_freq = inverse_frequencies(head_dim, theta, scaling)
        self.register_buffer("cos_sin", self._table(self.inv_freq), persistent=False)

    def _table(self, inv_freq: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(self.max_positions, dtype=torch.float32, device=inv_freq.device)
        freqs = positions[:, None] * inv_freq[None, :]
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
        return table.to(torch.get_default_dtype())

    def set_freq_factors(self, factors: torch.Tensor) -> None:
        """Divide every frequency by ``factors[i]`` (llama.cpp's ``rope_freqs``) and rebuild."""
        if factors.shape != self.inv_freq.shape:
            raise ValueError(
                f"rope_freqs has shape {tuple(factors.shape)}, expected {tuple(self.inv_freq.shape)}"
            )
        inv_freq = self.inv_freq / factors.to(self.inv_freq.device, torch.float32)
        table = self._table(inv_freq)
        self.cos_sin = table.to(device=self.cos_sin.device, dtype=self.cos_sin.dtype)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[T, 1, head_dim // 2]``, for ``positions`` ``[T]``: looked up
        once per step and shared by every layer."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)
        return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, H, head_dim]`` rotated (halves layout); returns a new tensor."""
    if elementwise.supports(x, cos, sin):
        return elementwise.rotary(x, cos, sin)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
