"""Linear layers whose weights come from a checkpoint, including fused (merged) projections.

Parameters are allocated with ``torch.empty`` under the caller's default device and dtype: the
loader overwrites every one of them, so random initialisation would only waste start-up time.

On CPU in float32, :func:`pack_weight` reorders a weight once into the panel layout of the C
GEMM kernel (``kernels/packed_gemm.c``) and :func:`linear` multiplies with it: 1.2-1.45x
oneDNN's prepacked matmul at a 64-sequence decode step, as fast at one row and at a prefill
chunk, and 2-3x ``F.linear``; results equal within float rounding.

With ``panel_dtype`` bfloat16 (``--dtype bfloat16`` on a CPU with AVX512-BF16), the panels are
packed in bfloat16 instead and the kernel rounds each product's input to bfloat16 too, summing in
float32: 1.8-1.9x the float32 panels' rate at a prefill chunk.

A weight that came from a GGUF file's Q4_0, Q4_1, Q4_K, Q6_K or Q8_0 blocks keeps them too,
packed for the same kernel (:meth:`Linear.set_quantized`): steps of at most
:func:`quantized_max_rows` rows (decodes) multiply with those panels, which take a fifth (4-bit)
or a third (8-bit) of the float32 panels' memory traffic, and get the same results bit for bit.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.kernels import packed_gemm
from pagedserve.kernels.packed_gemm import QuantBlocks
from pagedserve.lora.weights import LoRAWeights
from pagedserve.model.layers.activation import silu_and_mul

# Rows up to which the quantized panels take a product beside float32 panels. SmolLM2-135M's
# Q4_1 projections, 30 layers through the modules, on this project's 2-core AVX-512 machine: 3.4
# against 11.9 ms at 1 row, 5.9 against 12.7 at 8, 10.5 against 14.5 at 16, 19.3 against 19.9 at
# 32; the float32 panels win from 48 (28.0 against 26.3).
QUANTIZED_MAX_ROWS = 32
# The same beside bfloat16 panels, which move half float32's bytes at twice its multiply-adds:
# 3.2 against 5.2-6.5 ms at 1 row, 6.1 against 8.3 at 6, 7.5-8.4 against 7.5-8.6 at 8; from 12
# the bfloat16 panels win (10.0 against 11.3; at 32, 20.1 against 30.2).
QUANTIZED_MAX_ROWS_BF16 = 8


def quantized_max_rows(packed: torch.Tensor | None) -> int:
    """Rows up to which quantized panels serve a product rather than ``packed``."""
    if packed is not None and packed.dtype == torch.bfloat16:
        return QUANTIZED_MAX_ROWS_BF16
    return QUANTIZED_MAX_ROWS


def packed_for(
    x: torch.Tensor, packed: torch.Tensor | None, quantized: torch.Tensor | None
) -> torch.Tensor | None:
    """The packed weight to multiply ``x`` with: the quantized one for few rows, if any."""
    if quantized is not None and x.numel() <= quantized_max_rows(packed) * x.shape[-1]:
        return quantized
    return packed


_WHOLE = -1  # the key of quantized blocks that cover every shard


class Linear(nn.Module):
    """``y = x W^T + b`` with ``W`` shaped ``[out_features, in_features]`` as in checkpoints."""

    gated = False  # packed as a SwiGLU gate/up pair (GateUpSilu)

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: torch.Tensor | None = None
        self.packed_quantized: torch.Tensor | None = None
        self.quantized_shards: dict[int, QuantBlocks] = {}
        self.lora: LoRAWeights | None = None  # set when the engine serves LoRA adapters

    @property
    def num_shards(self) -> int:
        return 1

    def set_quantized(self, shard: int | None, blocks: QuantBlocks) -> None:
        """The blocks that shard ``shard`` of the weight was dequantized from; ``None``: the
        whole weight, as a checkpoint that stores it fused (Phi-3's q/k/v, gate/up) has it."""
        if shard is None:
            self.quantized_shards = {_WHOLE: blocks}
        else:
            self.quantized_shards[shard] = blocks

    def prepack(self, panel_dtype: torch.dtype = torch.float32) -> None:
        """Pack the loaded weight for the fast CPU path in ``panel_dtype`` (call after loading
        the weights), and its quantized blocks when every shard has some of one type."""
        self.packed = pack_weight(self.weight, self.gated, panel_dtype)
        shards, self.quantized_shards = self.quantized_shards, {}
        if self.packed is None:
            return
        blocks = shards.get(_WHOLE)
        if blocks is None and len(shards) == self.num_shards:
            blocks = QuantBlocks.cat([shards[i] for i in range(self.num_shards)])
        if blocks is not None:
            self.packed_quantized = packed_gemm.pack_quantized(blocks, self.gated)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.weight, self.bias, packed_for(x, self.packed, self.packed_quantized))
        if self.lora is not None and self.lora.state.groups:
            return self.lora.add(x, y)
        return y


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and os.environ.get("PAGEDSERVE_DISABLE_PREPACK") != "1"
        and packed_gemm.available()
    )


def bf16_panels_available() -> bool:
    """Whether :func:`pack_weight` can pack in bfloat16 here (AVX512-BF16, prepacking on)."""
    return os.environ.get("PAGEDSERVE_DISABLE_PREPACK") != "1" and packed_gemm.bf16_available()


def pack_weight(
    weight: torch.Tensor, gated: bool = False, panel_dtype: torch.dtype = torch.float32
) -> torch.Tensor | None:
    """The weight ``[out, in]`` packed for the C GEMM in ``panel_dtype``, or None where that
    path does not apply."""
    if not can_pack(weight):
        return None
    return packed_gemm.pack(weight, gated, panel_dtype)


def _uses_packed(x: torch.Tensor, packed: torch.Tensor | None) -> bool:
    """Whether the C GEMM takes this call: a packed weight, rows to compute, no autograd."""
    return (
        packed is not None and x.numel() > 0 and not (torch.is_grad_enabled() and x.requires_grad)
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    """``x W^T + b`` through the packed weight when there is one."""
    if not _uses_packed(x, packed):
        return F.linear(x, weight, bias)
    return packed_gemm.linear(x, packed, weight.shape[0], bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked into one GEMM (q/k/v, or gate/up).

    ``output_sizes[i]`` rows of the weight belong to shard ``i``; :meth:`load_shard` copies a
    checkpoint's separate tensor into its rows.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(in_features, sum(output_sizes), bias)
        self.output_sizes = list(output_sizes)
        self.offsets = [sum(output_sizes[:i]) for i in range(len(output_sizes))]

    @property
    def num_shards(self) -> int:
        return len(self.output_sizes)

    def load_shard(self, shard: int, name: str, tensor: torch.Tensor, source: str = "") -> None:
        """Copy ``tensor`` (a weight ``[size, in]`` or bias ``[size]``) into shard ``shard``;
        ``source``, the checkpoint tensor's name, is what an error names."""
        source = source or f"shard {shard} {name}"
        param = self.weight if name == "weight" else self.bias
        if param is None:
            raise ValueError(f"{source}: checkpoint has a {name} for a layer built without one")
        start, size = self.offsets[shard], self.output_sizes[shard]
        target = param.data[start : start + size]
        if tensor.shape != target.shape:
            raise ValueError(
                f"{source}: checkpoint shape {tuple(tensor.shape)} != "
                f"expected {tuple(target.shape)}"
            )
        target.copy_(tensor)


class GateUpSilu(MergedLinear):
    """A SwiGLU MLP's gate and up projections stacked, returning ``silu(gate) * up`` ``[..., d]``.

    With a packed weight the GEMM applies the activation to each tile before storing it, so the
    ``[..., 2 d]`` gate/up product is never written out (and no separate pass reads it back).
    """

    gated = True

    def __init__(self, in_features: int, size: int, bias: bool = False) -> None:
        super().__init__(in_features, [size, size], bias)
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = packed_for(x, self.packed, self.packed_quantized)
        if self.lora is not None and self.lora.state.groups:
            # an adapter's term goes in before the activation
            return silu_and_mul(self.lora.add(x, self._products(x, packed)))
        if not _uses_packed(x, packed):
            return silu_and_mul(F.linear(x, self.weight, self.bias))
        return packed_gemm.linear(x, packed, self.size, self.bias, gated=True)

    def _products(self, x: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
        """The gate and up products ``[..., 2 d]``, before the activation."""
        products = None
        if _uses_packed(x, packed):
            assert packed is not None
            products = packed_gemm.gated_products(x, packed, self.size)
        if products is None:
            return F.linear(x, self.weight, self.bias)
        return products if self.bias is None else products.add_(self.bias)
