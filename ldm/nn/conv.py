"""Convolution layers shared by the autoencoder and the UNet, computed the cheaper way with the standard weights.

Both keep `nn.Conv2d`'s parameters and state-dict keys (`skip.weight`, `upsample.conv.weight`), so LDM, Stable
Diffusion and diffusers checkpoints load unchanged; only the arithmetic differs from the textbook form, by float
rounding (about 1e-6 relative in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.linear import onednn_pointwise, onednn_product


class PointwiseConv(nn.Conv2d):
    """A 1x1 convolution run as one matrix product over the pixels.

    note: oneDNN's 1x1 convolutions run forward + backward 1.1-2.8x slower than the same product through BLAS on CPU
    (fp32, 2 threads, 8x8 to 32x32 maps of 128-384 channels). The product reads the input in place in either memory
    format (NCHW: one batched weight @ x over the images; channels_last: the pixels' rows times the weight) and keeps
    that format. Where BLAS lacks the CPU's AVX-512 kernels (`ldm.nn.linear`), large products on channels_last maps
    take oneDNN's 1x1 convolution, which runs there in 0.5-0.9x of BLAS' time.

    Args:
        in_channels, out_channels: widths.
        bias: learn an additive bias.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # note: explicit 2-D and batched products; F.linear and matmul choose between folding and batching by
        # `requires_grad`, which would make a frozen copy (EMA, a loaded model) round differently from the trained one.
        B, C, H, W = x.shape
        weight = self.weight.flatten(1)                                         # (out, in)
        bias = self.bias
        if not x.is_contiguous() and x.permute(0, 2, 3, 1).is_contiguous():  # channels_last (asked so under vmap too)
            if onednn_product(x, weight):
                return onednn_pointwise(x, self.weight, bias)                   # (B, out, H, W), channels_last
            rows = x.permute(0, 2, 3, 1).reshape(B * H * W, C)                  # (B*H*W, in), a view
            y = rows @ weight.T if bias is None else torch.addmm(bias, rows, weight.T)  # (B*H*W, out)
            return y.view(B, H, W, self.out_channels).permute(0, 3, 1, 2)       # (B, out, H, W), channels_last
        weight = weight.expand(B, -1, -1)                                       # (B, out, in), no copy
        pixels = x.flatten(2)                                                   # (B, in, H*W)
        y = torch.bmm(weight, pixels) if bias is None else torch.baddbmm(bias[:, None], weight, pixels)
        return y.view(B, self.out_channels, H, W)                               # (B, out, H, W)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv, computed as one 4x4 stride-2 transposed conv.

    Upsampling repeats each pixel over a 2x2 block, so the 3x3 window of an output pixel covers only 2x2 distinct
    input pixels; summing the weights that land on the same input pixel folds the 3x3 kernel into a 4x4 transposed
    convolution: for output row 2i the taps are w[0] on input row i-1 and w[1]+w[2] on row i, for row 2i+1 w[0]+w[1]
    on row i and w[2] on row i+1 (columns alike). 16 multiply-adds per input pixel and channel pair instead of 36,
    and the 4x larger upsampled map is never built: forward + backward 1.2-2.1x faster on CPU.

    Args:
        channels: input and output width.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight                                               # (out, in, 3, 3)
        C_out, C_in = weight.shape[:2]
        exact = torch.promote_types(weight.dtype, torch.float32)                # sum half-precision taps in fp32
        with torch.autocast(weight.device.type, enabled=False):
            kernel = weight.transpose(0, 1).reshape(-1, 9).to(exact) @ _taps(weight.device, exact)  # (in * out, 16)
        kernel = kernel.view(C_in, C_out, 4, 4).to(weight.dtype)                # (in, out, 4, 4)
        return F.conv_transpose2d(x, kernel, self.conv.bias, stride=2, padding=1)  # (B, out, 2H, 2W)


_ROWS = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # (k, y)
_TAPS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {(torch.device("cpu"), torch.float32):
                                                              torch.kron(_ROWS, _ROWS).T.contiguous()}  # (9, 16)


def _taps(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`Upsample`'s fold (9, 16): taps[3y + x, 4k + l] = 1 where tap (y, x) of the 3x3 kernel adds into tap (k, l) of
    the 4x4 one. A constant made once per device and dtype, not a buffer: a model built on the meta device and
    filled by `to_empty` + `load_state_dict` (as large models are loaded) would hold an unfilled buffer. A copy made
    under `torch.inference_mode` is not kept (an inference tensor cannot be saved for a later backward)."""
    key = (device, dtype)
    if key in _TAPS:
        return _TAPS[key]
    taps = _TAPS[(torch.device("cpu"), torch.float32)].to(device=device, dtype=dtype)
    if not torch.is_inference_mode_enabled():
        _TAPS[key] = taps
    return taps
