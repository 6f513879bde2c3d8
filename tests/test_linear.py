"""`ldm.nn.linear.Linear` computes nn.Linear's values and gradients on either route (BLAS or oneDNN), and a frozen
copy rounds as the trained layer; the route is oneDNN's only where MKL lacks the CPU's AVX-512 kernels."""

import platform
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ldm.nn.linear
from ldm.nn.linear import MIN_MACS, Linear, blas_lacks_avx512, cpu_vendor


def backward_ops(out: torch.Tensor) -> set[str]:
    """Names of the autograd nodes behind `out` (which kernels the route took)."""
    seen, todo = set(), [out.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn.name() not in seen:
            seen.add(fn.name())
            todo.extend(next_fn for next_fn, _ in fn.next_functions)
    return seen


def gradients(out: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)  # same draws in fp64
    return list(torch.autograd.grad(out, tensors, grad))


@pytest.mark.parametrize("shape", [(3, 5, 24), (7, 24), (24,), (2, 3, 4, 24)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_equals_nn_linear_in_values_and_gradients(onednn, shape, bias):
    torch.manual_seed(0)
    ours = Linear(24, 40, bias=bias)
    reference = nn.Linear(24, 40, bias=bias).double()
    reference.load_state_dict(ours.state_dict())  # same keys and shapes as nn.Linear's
    x = torch.randn(shape).requires_grad_()

    out = ours(x)
    expected = reference(x.double())
    assert out.shape == (*shape[:-1], 40) and out.dtype == torch.float32
    assert ("MkldnnConvolutionBackward0" in backward_ops(out)) == onednn  # the route taken
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    got = gradients(out, x, *ours.parameters())
    want = gradients(expected, x, *reference.parameters())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x", [torch.randn(2, 8, 5).transpose(1, 2), torch.randn(8, 7).t(),
                               torch.randn(1, 8).expand(7, 8)], ids=["transposed", "2d-transposed", "expanded"])
def test_linear_reads_a_strided_input_and_returns_a_contiguous_output(onednn, x):
    """Views as the attention and the spatial transformer make; the output is contiguous, as nn.Linear's."""
    layer = Linear(8, 6)
    out = layer(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
    assert out.is_contiguous()


def test_only_products_of_min_macs_or_more_go_to_onednn(monkeypatch):
    """Smaller products ran slower through oneDNN than through BLAS, on one thread or two."""
    monkeypatch.setattr(ldm.nn.linear, "ONEDNN_PRODUCTS", True)
    layer = Linear(128, 128)
    assert "MkldnnConvolutionBackward0" in backward_ops(layer(torch.randn(MIN_MACS // 128 ** 2, 128)))
    assert "MkldnnConvolutionBackward0" not in backward_ops(layer(torch.randn(MIN_MACS // 128 ** 2 - 1, 128)))
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # the user's switch: no oneDNN
    assert "MkldnnConvolutionBackward0" not in backward_ops(layer(torch.randn(MIN_MACS // 128 ** 2, 128)))


def test_a_frozen_copy_rounds_as_the_trained_linear(onednn):
    """An EMA or loaded copy (requires_grad False) gives the trained layer's outputs bit for bit."""
    torch.manual_seed(0)
    trained = Linear(64, 96)
    frozen = Linear(64, 96).requires_grad_(False)
    frozen.load_state_dict(trained.state_dict())
    x = torch.randn(4, 33, 64)
    for tokens in (x, x.transpose(0, 1).contiguous().transpose(0, 1)):
        with torch.no_grad():
            assert torch.equal(trained(tokens), frozen(tokens))
        assert torch.equal(trained(tokens).detach(), frozen(tokens))


def test_linear_under_bf16_autocast_stays_on_the_autocast_route(onednn):
    """Under autocast the product is bf16, which torch already sends to oneDNN; the layer does as nn.Linear."""
    layer = Linear(16, 8)
    x = torch.randn(2, 5, 16).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = layer(x), F.linear(x, layer.weight, layer.bias)
    assert out.dtype == torch.bfloat16
    assert "MkldnnConvolutionBackward0" not in backward_ops(out)
    assert torch.equal(out, expected)


def test_linear_takes_empty_inputs_and_outputs(onednn):
    assert Linear(4, 6)(torch.zeros(0, 3, 4)).shape == (0, 3, 6)
    assert Linear(4, 0)(torch.zeros(3, 4)).shape == (3, 0)


@pytest.mark.parametrize(("vendor", "capability", "mkl", "onednn", "expected"), [
    ("AuthenticAMD", "AVX512", True, True, True),    # Zen 4 / Zen 5: MKL takes its AVX2 kernels
    ("GenuineIntel", "AVX512", True, True, False),   # MKL's AVX-512 kernels
    ("AuthenticAMD", "AVX2", True, True, False),     # Zen 3: both AVX2
    ("AuthenticAMD", "AVX512", False, True, False),  # another BLAS
    ("AuthenticAMD", "AVX512", True, False, False),  # no oneDNN
    (None, "AVX512", True, True, False),             # unknown vendor: as before
])
def test_onednn_route_only_where_mkl_lacks_the_cpus_avx512_kernels(vendor, capability, mkl, onednn, expected):
    assert blas_lacks_avx512(vendor, capability, mkl, onednn) == expected


@pytest.mark.skipif(not (sys.platform == "linux" and platform.machine() == "x86_64"), reason="reads /proc/cpuinfo")
def test_cpu_vendor_reads_the_x86_vendor_id():
    with open("/proc/cpuinfo") as cpuinfo:
        vendor_ids = {line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")}
    assert vendor_ids == {cpu_vendor()}


def test_a_compiled_linear_takes_the_blas_route(onednn):
    """oneDNN's convolution op cannot be traced (no fake kernel): under torch.compile the product is F.linear's."""
    layer = Linear(32, 16)
    x = torch.randn(4, 32, requires_grad=True)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert x.grad.shape == x.shape
