"""The C elementwise kernels (RMSNorm, SiLU-and-mul, rotary, K/V stores) match the PyTorch
reference, and the layers fall back to PyTorch where the kernels do not apply."""

import pytest
import torch
import torch.nn.functional as F

from pagedserve.kernels import elementwise, kv_store
from pagedserve.kernels.cpu_build import load_kernel
from pagedserve.model.layers.activation import gelu_tanh_and_mul, silu_and_mul
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import RotaryEmbedding, apply_rotary

EPS = 1e-5
SHAPES = [(1, 576), (3, 7), (64, 576), (2048, 576), (5, 1000), (4, 1)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _norm(hidden: int, seed: int = 0) -> RMSNorm:
    norm = RMSNorm(hidden, EPS)
    norm.weight.data = torch.randn(hidden, generator=_gen(seed + 1))
    return norm


def _rms_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm in float64."""
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)
    return (weight.double() * normed).float()


def test_kernels_build_on_this_machine():
    assert elementwise.supports(torch.ones(1)), "gcc is on every supported machine"


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_DISABLE_C_KERNELS", "1")
    assert load_kernel.__wrapped__("elementwise") is None


@pytest.mark.parametrize("rows,cols", SHAPES)
@torch.inference_mode()
def test_rms_norm(rows, cols):
    norm = _norm(cols)
    x = torch.randn(rows, cols, generator=_gen()) * 3
    got = norm(x)
    torch.testing.assert_close(got, _rms_reference(x, norm.weight), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, norm._norm(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,cols", SHAPES)
@torch.inference_mode()
def test_add_rms_norm(rows, cols):
    norm = _norm(cols)
    x = torch.randn(rows, cols, generator=_gen(2))
    residual = torch.randn(rows, cols, generator=_gen(3))
    x_before, expected_sum = x.clone(), x + residual
    got, total = norm(x, residual)
    torch.testing.assert_close(total, expected_sum, rtol=0, atol=0)
    torch.testing.assert_close(got, _rms_reference(expected_sum, norm.weight), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x_before)


@torch.inference_mode()
def test_rms_norm_strided_and_batched_inputs():
    norm = _norm(48)
    base = torch.randn(6, 100, generator=_gen(4))
    x = base[:, 2:50]  # rows 100 apart
    torch.testing.assert_close(norm(x), _rms_reference(x, norm.weight), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 5, 48, generator=_gen(5))
    r3 = torch.randn(2, 5, 48, generator=_gen(6)).transpose(0, 1).contiguous().transpose(0, 1)
    expected_sum = x3 + r3
    got, total = norm(x3, r3)
    assert got.shape == total.shape == (2, 5, 48)
    torch.testing.assert_close(total, expected_sum, rtol=0, atol=0)
    torch.testing.assert_close(got, _rms_reference(expected_sum, norm.weight), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,d", [(1, 1536), (3, 5), (64, 1536), (300, 1536), (7, 1)])
@torch.inference_mode()
def test_silu_and_mul(rows, d):
    x = torch.randn(rows, 2 * d, generator=_gen(7)) * 8
    expected = F.silu(x[:, :d]) * x[:, d:]
    torch.testing.assert_close(silu_and_mul(x), expected, rtol=1e-6, atol=1e-30)


@torch.inference_mode()
def test_silu_and_mul_extremes_and_batched_input():
    gate = torch.cat(
        [
            torch.linspace(-120, 120, 20001),
            torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 88.5, -88.5]),
        ]
    )
    up = torch.rand(gate.shape, generator=_gen(8)) + 0.5
    x = torch.cat([gate, up])[None]
    expected = F.silu(gate) * up
    torch.testing.assert_close(silu_and_mul(x)[0], expected, rtol=1e-6, atol=1e-30, equal_nan=True)
    x3 = torch.randn(2, 3, 16, generator=_gen(9))
    torch.testing.assert_close(
        silu_and_mul(x3), F.silu(x3[..., :8]) * x3[..., 8:], rtol=1e-6, atol=1e-30
    )


@pytest.mark.parametrize("rows,d", [(1, 1536), (3, 5), (300, 1536)])
@torch.inference_mode()
def test_gelu_tanh_and_mul(rows, d):
    """Against float64 (PyTorch's float32 value loses ~1e-7 of |gate| where 1 + tanh cancels)."""
    x = torch.randn(rows, 2 * d, generator=_gen(10)) * 4
    wide = x.double()
    expected = F.gelu(wide[:, :d], approximate="tanh") * wide[:, d:]
    torch.testing.assert_close(gelu_tanh_and_mul(x).double(), expected, rtol=2e-6, atol=1e-9)


@torch.inference_mode()
def test_gelu_tanh_and_mul_extremes():
    """Far out either way, gelu_tanh(g) is g or 0."""
    gate = torch.cat(
        [torch.linspace(-120, 120, 20001), torch.tensor([float("inf"), 0.0, -0.0, 1e20, -1e20])]
    )
    up = torch.rand(gate.shape, generator=_gen(11)) + 0.5
    expected = F.gelu(gate.double(), approximate="tanh") * up.double()
    got = gelu_tanh_and_mul(torch.cat([gate, up])[None])[0]
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-9)


def _rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@pytest.mark.parametrize(
    "tokens,q_heads,kv_heads,head_dim",
    [(1, 9, 3, 64), (64, 9, 3, 64), (37, 4, 1, 6), (2048, 2, 2, 128)],
)
@torch.inference_mode()
def test_rotary_on_qkv_view(tokens, q_heads, kv_heads, head_dim):
    """As the model calls it: the q and k heads of the fused qkv output, rotated together."""
    rope = RotaryEmbedding(head_dim, 4096, 10000.0, {"rope_type": "default"})
    positions = torch.randint(0, 4096, (tokens,), generator=_gen(10))
    cos, sin = rope(positions)
    heads = q_heads + kv_heads
    qkv = torch.randn(tokens, (heads + kv_heads) * head_dim, generator=_gen(11))
    qk = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    expected = _rotary_reference(qk, cos, sin)
    before = qkv.clone()

    got = apply_rotary(qk, cos, sin)
    assert got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(qkv, before)


@torch.inference_mode()
def test_rotary_odd_layouts():
    """Broadcast cos/sin, a non-unit innermost stride, and separate cos/sin tensors."""
    x = torch.randn(5, 3, 8, generator=_gen(12))
    cos = torch.randn(1, 1, 4, generator=_gen(13))
    sin = torch.randn(5, 1, 4, generator=_gen(14))
    torch.testing.assert_close(apply_rotary(x, cos, sin), _rotary_reference(x, cos, sin))
    strided = torch.randn(5, 3, 16, generator=_gen(15))[..., ::2]
    expected = _rotary_reference(strided, cos, sin)
    torch.testing.assert_close(apply_rotary(strided, cos, sin), expected)


def test_other_dtypes_and_autograd_use_pytorch():
    norm = _norm(16)
    x = torch.randn(3, 16, generator=_gen(16), dtype=torch.float64)
    assert not elementwise.supports(x)
    torch.testing.assert_close(
        norm(x), _rms_reference(x, norm.weight).double(), rtol=1e-5, atol=1e-5
    )
    bf16 = torch.randn(3, 16, generator=_gen(17)).bfloat16()
    assert norm.to(torch.bfloat16)(bf16).dtype == torch.bfloat16

    x32 = torch.randn(3, 16, generator=_gen(18), requires_grad=True)
    assert not elementwise.supports(x32)
    silu_and_mul(x32).sum().backward()
    assert x32.grad is not None and x32.grad.shape == x32.shape


@pytest.mark.parametrize("tokens", [1, 7, 2048])
def test_write_kv_matches_index_copy(tokens):
    """K/V rows taken from views of a fused qkv output land at their slots, as index_copy_ puts
    them; nothing else in the pools changes."""
    heads, kv_heads, dim, blocks, block = 9, 3, 64, 160, 16
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=_gen())
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    slots = torch.randperm(blocks * block, generator=_gen(1))[:tokens]
    pools = [torch.randn(blocks, block, kv_heads, dim, generator=_gen(s)) for s in (2, 3)]
    expected = [p.clone() for p in pools]
    expected[0].view(-1, kv_heads, dim).index_copy_(0, slots, k)
    expected[1].view(-1, kv_heads, dim).index_copy_(0, slots, v)
    kv_store.write_kv(k, v, pools[0], pools[1], slots)
    assert torch.equal(pools[0], expected[0]) and torch.equal(pools[1], expected[1])
