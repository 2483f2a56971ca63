"""The C packed-weight GEMM matches ``F.linear`` on every tile and panel shape it handles."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from pagedserve.kernels import packed_gemm
from pagedserve.model.layers.activation import silu_and_mul
from pagedserve.model.layers.linear import (
    QUANTIZED_MAX_ROWS,
    GateUpSilu,
    Linear,
    MergedLinear,
    packed_for,
)


@pytest.mark.parametrize(
    "rows,out_features,in_features",
    [
        (1, 5, 3),  # one row, one partial panel
        (7, 33, 17),  # a tile below the tile height, a panel and one column
        (15, 64, 64),  # one row past a 14-row tile
        (64, 576, 576),  # a 64-sequence decode step of SmolLM2-135M
        (300, 96, 40),  # enough rows that the threads split the rows, one slice each
        (1031, 96, 576),  # a prefill chunk: each thread's rows in slices, the last one short
        (300, 40, 5000),  # rows so long that a slice is a single tile
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, out_features, in_features, bias):
    generator = torch.Generator().manual_seed(rows + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    # unit-scale outputs, so that float32 rounding over 5000 terms stays inside the tolerance
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    got = packed_gemm.linear(x, packed_gemm.pack(weight), out_features, b)
    torch.testing.assert_close(got, F.linear(x, weight, b), atol=1e-4, rtol=1e-4)


def _bf16_reference(x, weight, bias, gated):
    """x W^T (+ b) from bfloat16-rounded x and W, summed in float64; gated: silu(gate) * up."""
    y = F.linear(x.bfloat16().double(), weight.bfloat16().double())
    y = (y if bias is None else y + bias.double()).float()
    if not gated:
        return y
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.skipif(not packed_gemm.bf16_available(), reason="this CPU lacks AVX512-BF16")
@pytest.mark.parametrize(
    "rows,out_features,in_features",
    [
        (1, 6, 3),  # one row, one partial panel, an odd input count (a zero pair padding it)
        (15, 64, 64),  # one row past a 14-row tile
        (64, 576, 576),  # a 64-sequence decode step of SmolLM2-135M
        (300, 96, 41),  # the threads split the rows; odd inputs
        (1031, 96, 576),  # a prefill chunk: each thread's rows in slices, the last one short
    ],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("gated", [False, True])
def test_bf16_panels_sum_bf16_products_in_float32(rows, out_features, in_features, bias, gated):
    generator = torch.Generator().manual_seed(rows + in_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator) * in_features**-0.5
    b = torch.randn(out_features, generator=generator) if bias else None
    packed = packed_gemm.pack(weight, gated, torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    size = out_features // 2 if gated else out_features
    got = packed_gemm.linear(x, packed, size, b, gated)
    torch.testing.assert_close(got, _bf16_reference(x, weight, b, gated), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not packed_gemm.bf16_available(), reason="this CPU lacks AVX512-BF16")
def test_bf16_rounding_is_to_nearest_even_and_keeps_nan_and_inf():
    """Weights and inputs round as PyTorch's ``.bfloat16()`` does, including ties, the largest
    floats (to inf), infinities and NaN. (Subnormal inputs count as zero: VDPBF16PS flushes
    them.)"""
    edge = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 3.4e38, float("inf"), float("-inf"), 1.5]
    weight = torch.tensor(edge + [0.0]).reshape(8, 1)
    got = packed_gemm.linear(
        torch.ones(1, 1), packed_gemm.pack(weight, False, torch.bfloat16), 8, None
    )
    assert got[0].tolist() == weight.bfloat16().float()[:, 0].tolist()
    x = torch.tensor([edge + [0.0]]).reshape(8, 1)
    got = packed_gemm.linear(x, packed_gemm.pack(torch.ones(1, 1), False, torch.bfloat16), 1, None)
    assert got[:, 0].tolist() == x.bfloat16().float()[:, 0].tolist()
    nan = packed_gemm.linear(
        torch.tensor([[float("nan")]]),
        packed_gemm.pack(torch.ones(1, 1), False, torch.bfloat16),
        1,
        None,
    )
    assert nan.isnan().all()


def test_linear_module_packs_and_keeps_leading_dims():
    layer = Linear(24, 40, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 24)
    expected = F.linear(x, layer.weight, layer.bias)
    layer.prepack()
    assert layer.packed is not None, "gcc is on every supported machine"
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-4)
        assert layer(x[:0]).shape == (0, 3, 40)


@pytest.mark.parametrize(
    "rows,size,in_features", [(1, 5, 3), (15, 40, 24), (64, 1536, 576), (1031, 48, 576)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_gated_matches_silu_of_gate_times_up(rows, size, in_features, bias):
    generator = torch.Generator().manual_seed(size)
    x = torch.randn(rows, in_features, generator=generator)
    # unit-scale gate and up: the product of two sums of in_features terms otherwise magnifies
    # float32 rounding past any fixed tolerance
    weight = torch.randn(2 * size, in_features, generator=generator) * in_features**-0.5
    b = torch.randn(2 * size, generator=generator) if bias else None
    gate, up = F.linear(x, weight, b).chunk(2, dim=-1)
    got = packed_gemm.linear(x, packed_gemm.pack(weight, gated=True), size, b, gated=True)
    torch.testing.assert_close(got, F.silu(gate) * up, atol=1e-4, rtol=1e-4)


def test_gate_up_silu_module_packed_and_not():
    layer = GateUpSilu(24, 40, bias=True)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 24)
    with torch.no_grad():
        plain = layer(x)
        layer.prepack()
        assert layer.packed is not None
        torch.testing.assert_close(layer(x), plain, atol=1e-4, rtol=1e-4)
    gate, up = F.linear(x, layer.weight, layer.bias).chunk(2, dim=-1)
    torch.testing.assert_close(plain, F.silu(gate) * up, atol=1e-5, rtol=1e-5)


def test_many_threads_take_few_rows_in_passes_over_the_panels(tmp_path):
    """With more threads than this machine has, 600 rows are too few to split among them: they
    split the panels and walk the rows in passes of ``ROW_BLOCK`` (512), the last one short."""
    script = tmp_path / "check.py"
    script.write_text(
        "import torch, torch.nn.functional as F\n"
        "from pagedserve.kernels import packed_gemm\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x, w, b = torch.randn(600, 40, generator=g), torch.randn(96, 40, generator=g), "
        "torch.randn(96, generator=g)\n"
        "got = packed_gemm.linear(x, packed_gemm.pack(w), 96, b)\n"
        "torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "8"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _quantized(weight: torch.Tensor, kind: str) -> tuple[packed_gemm.QuantBlocks, torch.Tensor]:
    """``weight`` quantized by gguf to ``kind``: its blocks, and the float32 weight they stand
    for."""
    qtype = GGMLQuantizationType[kind]
    raw = quantize(weight.numpy(), qtype)
    blocks = raw.reshape(weight.shape[0], weight.shape[1] // 32, -1)
    head = 4 if kind == "Q4_1" else 2
    halves = torch.from_numpy(blocks[..., :head].copy().view(np.float16).astype(np.float32))
    minimum = halves[..., 1] if kind == "Q4_1" else None
    quantized = packed_gemm.QuantBlocks(
        kind, halves[..., 0], minimum, torch.from_numpy(blocks[..., head:].copy())
    )
    return quantized, torch.from_numpy(dequantize(raw, qtype).copy())


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (66, 96), (40, 1536)])
def test_quantized_panels_give_the_float32_panels_products_bit_for_bit(
    out_features, in_features, gated, kind
):
    """The quantized panels dequantize to the float32 weights gguf computes (Q4_1: d * q,
    rounded, then + m) and sum them in the same order: equal outputs, for every row count and
    partial panel."""
    generator = torch.Generator().manual_seed(out_features)
    n = 2 * out_features if gated else out_features
    blocks, weight = _quantized(torch.randn(n, in_features, generator=generator), kind)
    bias = torch.randn(n, generator=generator)
    packed, quantized = packed_gemm.pack(weight, gated), packed_gemm.pack_quantized(blocks, gated)
    for rows in (1, 3, 14, 29, 33):
        x = torch.randn(rows, in_features, generator=generator)
        want = packed_gemm.linear(x, packed, out_features, bias, gated)
        assert torch.equal(packed_gemm.linear(x, quantized, out_features, bias, gated), want)


def test_a_merged_layer_uses_its_quantized_shards_for_few_rows_only():
    generator = torch.Generator().manual_seed(3)
    layer = GateUpSilu(64, 48)
    shards = [_quantized(torch.randn(48, 64, generator=generator), "Q4_1") for _ in range(2)]
    for shard, (blocks, weight) in enumerate(shards):
        layer.load_shard(shard, "weight", weight)
        layer.set_quantized(shard, blocks)
    layer.prepack()
    assert layer.packed_quantized is not None and not layer.quantized_shards
    few, many = torch.randn(QUANTIZED_MAX_ROWS, 64), torch.randn(QUANTIZED_MAX_ROWS + 1, 64)
    assert packed_for(few, layer.packed, layer.packed_quantized) is layer.packed_quantized
    assert packed_for(many, layer.packed, layer.packed_quantized) is layer.packed
    assert torch.equal(layer(few), layer(torch.cat([few, many]))[:QUANTIZED_MAX_ROWS])


@pytest.mark.parametrize("second", [None, "Q8_0"])
def test_a_merged_layer_needs_every_shard_quantized_alike(second):
    """One shard of two quantized, or the two in different types: the float32 panels serve."""
    generator = torch.Generator().manual_seed(4)
    layer = MergedLinear(64, [48, 48])
    layer.set_quantized(0, _quantized(torch.randn(48, 64, generator=generator), "Q4_1")[0])
    if second:
        layer.set_quantized(1, _quantized(torch.randn(48, 64, generator=generator), second)[0])
    layer.prepack()
    assert layer.packed is not None and layer.packed_quantized is None


@pytest.mark.parametrize(
    "panels",
    [
        "float32",
        pytest.param(
            "bfloat16",
            marks=pytest.mark.skipif(
                not packed_gemm.bf16_available(), reason="this CPU lacks AVX512-BF16"
            ),
        ),
        "Q4_1",
        "Q8_0",
    ],
)
def test_gated_products_are_the_gate_and_up_products_before_the_activation(panels):
    """A gated weight's panels, multiplied as a plain weight, give the gate and up products
    (what an adapter's term is added to before silu(gate) * up), in place again, for every
    panel type; None where the size does not split into whole vectors."""
    generator = torch.Generator().manual_seed(7)
    size, in_features = 1536 // 4, 576
    weight = torch.randn(2 * size, in_features, generator=generator)
    if panels in ("Q4_1", "Q8_0"):
        blocks, weight = _quantized(weight, panels)
        packed = packed_gemm.pack_quantized(blocks, gated=True)
    else:
        packed = packed_gemm.pack(weight, gated=True, dtype=getattr(torch, panels))
    for rows in (1, 5, 64):
        x = torch.randn(rows, in_features, generator=generator)
        got = packed_gemm.gated_products(x, packed, size)
        if panels == "bfloat16":
            want = _bf16_reference(x, weight, None, gated=False)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got, x @ weight.t(), atol=1e-4, rtol=1e-5)
            plain = packed_gemm.linear(x, packed, size, None, gated=True)
            torch.testing.assert_close(silu_and_mul(got), plain, atol=1e-6, rtol=1e-6)
    uneven = packed_gemm.pack(weight[:-2], gated=True)
    assert packed_gemm.gated_products(x, uneven, size - 1) is None
