"""The C packed-weight GEMM matches ``F.linear`` on every tile and panel shape it handles."""

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import packed_gemm
from pagedserve.model.layers.linear import Linear


@pytest.mark.parametrize(
    "rows,out_features,in_features",
    [
        (1, 5, 3),  # one row, one partial panel
        (7, 33, 17),  # a tile below the tile height, a panel and one column
        (15, 64, 64),  # one row past a 14-row tile
        (64, 576, 576),  # a 64-sequence decode step of SmolLM2-135M
        (600, 96, 40),  # more rows than one pass over the panels takes
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, out_features, in_features, bias):
    generator = torch.Generator().manual_seed(rows + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
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
