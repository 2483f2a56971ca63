"""The C packed-weight GEMM matches ``F.linear`` on every tile and panel shape it handles."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import packed_gemm
from pagedserve.model.layers.linear import GateUpSilu, Linear


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
