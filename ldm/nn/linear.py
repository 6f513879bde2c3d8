"""`Linear`: nn.Linear whose fp32 product runs through oneDNN on CPUs where torch's BLAS lacks the wide kernels.

torch's x86 wheels send fp32 matrix products (`F.linear`, `mm`, `bmm`) to Intel's MKL, which runs its AVX-512
kernels on Intel CPUs only: on an AMD CPU with AVX-512 (Zen 4, Zen 5) it takes its AVX2 path. oneDNN, which runs
the convolutions, picks its kernels by instruction set, so there the same product as a 1x1 convolution over the
rows ran forward + backward in 0.48-0.59x of `F.linear`'s time at the UNet's shapes (Zen 5, 2 threads; 2048-8192 rows
of 128-1024 features) and the benchmark UNet's step in 0.84x of diffusers' (1.0x through BLAS). Elsewhere, and
under autocast (where bf16 products already go to oneDNN), `F.linear` runs as before. The choice is fixed per
machine, so a run and its resumption round alike; between machines the products round differently (about 1e-6
relative in fp32), as oneDNN's and MKL's kernels already do from one CPU to another.
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


def onednn_product(x: torch.Tensor) -> bool:
    """Whether fp32 products with `x` go through oneDNN (see the module's docstring)."""
    return (ONEDNN_PRODUCTS and x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and torch.backends.mkldnn.enabled and not torch.is_autocast_enabled("cpu"))


def rows_as_pixels(rows: torch.Tensor) -> torch.Tensor:
    """(M, C) rows -> a (1, C, M, 1) channels_last view of the same memory, for a 1x1 convolution."""
    M, C = rows.shape
    return rows.view(1, M, 1, C).permute(0, 3, 1, 2)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and state-dict keys), through oneDNN where that is faster (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (onednn_product(x) and self.weight.dtype == torch.float32):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, self.in_features)                                  # (M, in)
        y = F.conv2d(rows_as_pixels(rows), self.weight[:, :, None, None], self.bias)  # (1, out, M, 1)
        return y.permute(0, 2, 3, 1).reshape(*x.shape[:-1], self.out_features)  # (..., out)
