"""`Linear`: nn.Linear whose large fp32 products run through oneDNN on CPUs where torch's BLAS lacks the wide kernels.

torch's x86 wheels send fp32 matrix products (`F.linear`, `mm`, `bmm`) to Intel's MKL, which runs its AVX-512
kernels on Intel CPUs only: on an AMD CPU with AVX-512 (Zen 4, Zen 5) it takes its AVX2 path. oneDNN, which runs
the convolutions, picks its kernels by instruction set, so there the same product as oneDNN's 1x1 convolution over
the rows (`torch.mkldnn_convolution`: `F.conv2d` would choose torch's slower fallback kernel for one image on one
thread) ran forward + backward in 0.54-0.75x of the BLAS time at 2 threads and 0.86-0.96x at 1 thread for products
of at least 2**24 multiply-adds (but for 64 rows: even), and slower below (Zen 5; `benchmarks/RESULTS.md`): the
benchmark UNet's step took 0.83x of diffusers' (1.0x through BLAS). Elsewhere, for smaller products, and under
autocast (where bf16 products already go to oneDNN), `F.linear` runs as before. The route depends on the machine
and the shapes only, so a run and its resumption round alike; between machines the products round differently
(about 1e-6 relative in fp32), as oneDNN's and MKL's kernels already do from one CPU to another.
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn


def cpu_vendor() -> str | None:
    """The x86 vendor id (`GenuineIntel`, `AuthenticAMD`, ...) from /proc/cpuinfo, or Windows' processor string;
    None where neither tells."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    processor = platform.processor()  # Windows: "AMD64 Family 26 Model 2 Stepping 0, AuthenticAMD"
    return processor.rsplit(", ", 1)[1] if ", " in processor else None


def blas_lacks_avx512(vendor: str | None, capability: str, mkl: bool, onednn: bool) -> bool:
    """Whether MKL runs fp32 products on narrower kernels than oneDNN: an AVX-512 CPU not made by Intel, with both
    libraries in torch's build. Unknown vendors keep BLAS."""
    return mkl and onednn and capability == "AVX512" and vendor is not None and vendor != "GenuineIntel"


ONEDNN_PRODUCTS = blas_lacks_avx512(cpu_vendor(), torch.backends.cpu.get_cpu_capability(),
                                    torch.backends.mkl.is_available(), torch.backends.mkldnn.is_available())


MIN_MACS = 1 << 24  # smaller products ran slower through oneDNN (its call costs more than the wider kernels save)


def onednn_product(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the product of `x`'s rows (its last dimension) with `weight` (out, in, ...) goes to oneDNN (see the
    module's docstring)."""
    return (ONEDNN_PRODUCTS and x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= MIN_MACS  # rows * in * out multiply-adds
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling())  # (the op has no fake kernel; inductor picks its own products)


def onednn_pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """oneDNN's 1x1 convolution of a channels_last (B, in, H, W) map with an (out, in, 1, 1) weight; channels_last
    (B, out, H, W) out."""
    return torch.mkldnn_convolution(x, weight, bias, (0, 0), (1, 1), (1, 1), 1)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys), through oneDNN where that is faster (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not onednn_product(x, self.weight):
            if x.dim() > 2 and not x.is_contiguous():  # one product of the rows whether or not a gradient is wanted
                return F.linear(x.reshape(-1, self.in_features), self.weight, self.bias).view(*x.shape[:-1], -1)
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features).contiguous()                     # (M, in)
        pixels = rows.view(1, -1, 1, self.in_features).permute(0, 3, 1, 2)      # (1, in, M, 1), channels_last
        y = onednn_pointwise(pixels, self.weight[:, :, None, None], self.bias)  # (1, out, M, 1), channels_last
        return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)  # (..., out), contiguous
