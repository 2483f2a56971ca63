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
from pagedserve.model.layers.linear import Q41_MAX_ROWS, GateUpSilu, Linear, MergedLinear


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


def _q41(weight: torch.Tensor) -> tuple[packed_gemm.Q41Blocks, torch.Tensor]:
    """``weight`` quantized to Q4_1 by gguf: its blocks, and the float32 weight they stand for."""
    raw = quantize(weight.numpy(), GGMLQuantizationType.Q4_1)
    rows, groups = weight.shape[0], weight.shape[1] // 32
    blocks = raw.reshape(rows, groups, 20)
    halves = torch.from_numpy(blocks[..., :4].copy().view(np.float16).astype(np.float32))
    q41 = packed_gemm.Q41Blocks(halves[..., 0], halves[..., 1], torch.from_numpy(blocks[..., 4:]))
    return q41, torch.from_numpy(dequantize(raw, GGMLQuantizationType.Q4_1).copy())


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("out_features,in_features", [(960, 576), (66, 96), (40, 1536)])
def test_q41_panels_give_the_float32_panels_products_bit_for_bit(out_features, in_features, gated):
    """The 4-bit panels expand to the float32 weights gguf dequantizes (d * q, rounded, then + m)
    and sum them in the same order: equal outputs, for every row count and partial panel."""
    generator = torch.Generator().manual_seed(out_features)
    n = 2 * out_features if gated else out_features
    q41, weight = _q41(torch.randn(n, in_features, generator=generator))
    bias = torch.randn(n, generator=generator)
    packed, packed_q41 = packed_gemm.pack(weight, gated), packed_gemm.pack_q41(q41, gated)
    for rows in (1, 3, 14, 29, 33):
        x = torch.randn(rows, in_features, generator=generator)
        want = packed_gemm.linear(x, packed, out_features, bias, gated)
        assert torch.equal(packed_gemm.linear(x, packed_q41, out_features, bias, gated), want)


def test_a_merged_layer_uses_its_q41_shards_for_few_rows_only():
    generator = torch.Generator().manual_seed(3)
    layer = GateUpSilu(64, 48)
    shards = [_q41(torch.randn(48, 64, generator=generator)) for _ in range(2)]
    for shard, (q41, weight) in enumerate(shards):
        layer.load_shard(shard, "weight", weight)
        layer.set_q41(shard, q41)
    layer.prepack()
    assert layer.packed_q41 is not None and layer.packed_q41.dtype == torch.uint8
    few, many = torch.randn(Q41_MAX_ROWS, 64), torch.randn(Q41_MAX_ROWS + 1, 64)
    assert layer.packed_for(few) is layer.packed_q41 and layer.packed_for(many) is layer.packed
    both = torch.cat([few, many])
    assert torch.equal(layer(few), layer(both)[:Q41_MAX_ROWS])
    half = Linear(64, 48)
    half.set_q41(0, shards[0][0])
    half.weight.data.copy_(shards[0][1])
    half.prepack()
    assert half.packed_q41 is not None
    unquantized = MergedLinear(64, [48, 48])
    unquantized.set_q41(0, shards[0][0])  # one shard of two: the float32 panels serve
    unquantized.prepack()
    assert unquantized.packed_q41 is None and not unquantized.q41_shards
