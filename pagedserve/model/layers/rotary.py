"""Rotary position embedding with a precomputed cos/sin table indexed by position.

Supports the plain RoPE of Llama/Qwen2 (``rope_theta``), the ``linear`` and ``llama3``
frequency scalings of Hugging Face configs, rotation of only the first ``partial_rotary_factor``
of each head, and Phi-3's ``longrope``. GGUF files of Llama 3.1 carry the llama3 scaling as
per-frequency divisors (``rope_freqs.weight``); :meth:`RotaryEmbedding.set_freq_factors` applies
those.

``longrope`` has two sets of frequencies: the short factors for sequences that fit the
pretraining context (``original_max_position_embeddings``), the long ones beyond it, both with
cos and sin scaled by an attention factor. transformers picks them per forward pass by the
sequence's length so far; here the table holds both, the long rows after the short ones, and
a request whose prompt is longer than the pretraining context reads the long rows throughout
(:meth:`RotaryEmbedding.rope_offset`), so that its queries and cached keys rotate alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.kernels import elementwise

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


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


def rotary_dim(head_dim: int, scaling: dict[str, Any]) -> int:
    """How many of a head's dimensions rotate (the first ones; the rest pass through)."""
    return int(head_dim * scaling.get("partial_rotary_factor", 1.0))


def inverse_frequencies(dim: int, theta: float, scaling: dict[str, Any]) -> torch.Tensor:
    """Per-pair rotation frequencies ``[dim // 2]`` (float32) of ``dim`` rotated dimensions,
    scaled as ``scaling`` says (``longrope``: by its short factors)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rope_type = scaling["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "longrope":
        return inv_freq / torch.tensor(scaling["short_factor"], dtype=torch.float32)
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(
        f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _longrope_attention_factor(scaling: dict[str, Any], max_positions: int) -> float:
    """longrope's scale of cos and sin: given, or from how far the context was stretched."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_positions / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


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

    ``cos_sin`` is ``[max_positions, dim]`` (``dim``: the rotated dimensions of a head): cosines
    in the first half, sines in the second, stored in the model dtype (Hugging Face also casts
    cos/sin to the activation dtype). With ``longrope`` it has twice the rows (see the module
    docstring).
    """

    def __init__(self, dim: int, max_positions: int, theta: float, scaling: dict[str, Any]) -> None:
        super().__init__()
        self.dim = dim
        self.max_positions = max_positions
        self.inv_freq = inverse_frequencies(dim, theta, scaling)
        table = self._table(self.inv_freq)
        # longrope: positions past this read the long rows (None: there are none).
        self.original_max_positions: int | None = None
        if scaling["rope_type"] == "longrope":
            self.original_max_positions = scaling["original_max_position_embeddings"]
            plain = inverse_frequencies(dim, theta, {"rope_type": "default"})
            long = plain / torch.tensor(scaling["long_factor"], dtype=torch.float32)
            factor = _longrope_attention_factor(scaling, max_positions)
            table = (torch.cat((table.float(), self._table(long).float())) * factor).to(table.dtype)
        self.register_buffer("cos_sin", table, persistent=False)

    def rope_offset(self, prompt_len: int) -> int:
        """Where a request's rows of the table start: longrope's long rows for a prompt longer
        than the pretraining context, else 0."""
        if self.original_max_positions is None or prompt_len <= self.original_max_positions:
            return 0
        return self.max_positions

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
