"""`ldm.nn.linear.Linear` computes nn.Linear's values and gradients on either route (BLAS or oneDNN), and a frozen
copy rounds as the trained layer; the route is oneDNN's only where MKL lacks the CPU's AVX-512 kernels."""

import platform
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.linear import Linear, blas_lacks_avx512, cpu_vendor


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
    assert ("ConvolutionBackward0" in backward_ops(out)) == onednn  # the route taken
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    got = gradients(out, x, *ours.parameters())
    want = gradients(expected, x, *reference.parameters())
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-5, atol=1e-5)


def test_linear_reads_a_strided_input(onednn):
    """The attention's heads and the spatial transformer's tokens are transposed views."""
    layer = Linear(8, 6)
    x = torch.randn(2, 8, 5).transpose(1, 2)  # (2, 5, 8), not contiguous
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-6)


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
    assert "ConvolutionBackward0" not in backward_ops(out)
    assert torch.equal(out, expected)


def test_linear_takes_an_empty_batch(onednn):
    assert Linear(4, 6)(torch.zeros(0, 3, 4)).shape == (0, 3, 6)


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
