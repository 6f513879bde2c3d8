"""The shared convolution layers compute exactly what their textbook forms compute, values and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.conv import PointwiseConv, Upsample

FORMATS = [torch.contiguous_format, torch.channels_last]


def gradients(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    return list(torch.autograd.grad(out, tensors, grad))


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_equals_a_1x1_conv(memory_format, bias):
    torch.manual_seed(0)
    ours = PointwiseConv(24, 40, bias=bias).double()
    reference = nn.Conv2d(24, 40, 1, bias=bias).double()
    reference.load_state_dict(ours.state_dict())  # same keys and shapes as nn.Conv2d's
    x = torch.randn(3, 24, 5, 7, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()

    out, expected = ours(x), reference(x)
    assert out.shape == (3, 40, 5, 7)
    assert out.is_contiguous(memory_format=memory_format)  # the input's layout is kept
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(gradients(out, x, *ours.parameters()), gradients(expected, x, *reference.parameters()),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_conv_on_channels_last_maps_through_onednn_equals_a_1x1_conv(onednn, bias):
    """fp32, where `ldm.nn.linear` sends products to oneDNN: the map goes to oneDNN's own 1x1 convolution; no output
    channels gives an empty map, as a convolution does."""
    torch.manual_seed(0)
    ours = PointwiseConv(24, 40, bias=bias)
    reference = nn.Conv2d(24, 40, 1, bias=bias).double()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(3, 24, 5, 7).contiguous(memory_format=torch.channels_last).requires_grad_()

    out, expected = ours(x), reference(x.double())
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert (out.grad_fn.name() == "MkldnnConvolutionBackward0") == onednn
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    got = torch.autograd.grad(out, (x, *ours.parameters()), grad)
    want = torch.autograd.grad(expected, (x, *reference.parameters()), grad.double())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)
    assert PointwiseConv(24, 0, bias=bias)(x).shape == (3, 0, 5, 7)


def test_pointwise_conv_maps_under_vmap():
    """torch.func.vmap over the layer, as over nn.Conv2d (its memory-format query raised inside vmap)."""
    conv = PointwiseConv(8, 6)
    x = torch.randn(3, 2, 8, 4, 4)
    out = torch.func.vmap(conv)(x)
    torch.testing.assert_close(out, torch.stack([F.conv2d(xi, conv.weight, conv.bias) for xi in x]))


def test_pointwise_conv_under_bf16_autocast_returns_bf16_like_a_conv():
    conv = PointwiseConv(16, 8)
    x = torch.randn(2, 16, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = conv(x), F.conv2d(x, conv.weight, conv.bias)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("memory_format", FORMATS)
@pytest.mark.parametrize("size", [(4, 4), (5, 7), (1, 1)])
def test_upsample_equals_nearest_2x_then_3x3_conv(memory_format, size):
    torch.manual_seed(0)
    up = Upsample(6).double()
    assert set(up.state_dict()) == {"conv.weight", "conv.bias"}  # LDM / SD checkpoints load unchanged
    x = torch.randn(2, 6, *size, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()

    out = up(x)
    expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (2, 6, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    params = list(up.parameters())
    for got, want in zip(gradients(out, x, *params), gradients(expected, x, *params), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_upsample_in_fp32_stays_within_rounding_of_the_textbook_form():
    torch.manual_seed(0)
    up = Upsample(64)
    x = torch.randn(2, 64, 8, 8)
    expected = up.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    torch.testing.assert_close(up(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_format", FORMATS)
def test_pointwise_conv_rounds_the_same_for_a_frozen_copy(memory_format, onednn):
    """An EMA or loaded copy (requires_grad False) must give the trained module's outputs bit for bit."""
    torch.manual_seed(0)
    trained = PointwiseConv(4, 4)
    frozen = PointwiseConv(4, 4).requires_grad_(False)
    frozen.load_state_dict(trained.state_dict())
    moments = torch.randn(4, 8, 8, 8).contiguous(memory_format=memory_format)
    z = moments.chunk(2, dim=1)[0]  # a strided view, as the posterior's mean is
    with torch.no_grad():
        assert torch.equal(trained(z), frozen(z))
