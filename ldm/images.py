"""Model images live in [-1, 1]; these turn them into what files, loggers and metrics take (uint8 in [0, 255])."""

from __future__ import annotations

import torch
import torchvision


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 in [0, 255], rounded as an image file stores them; stays on its device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def make_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> one uint8 grid (3, H', W') on the CPU, `nrow` images a row, white padding."""
    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return to_uint8(torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0))  # (3, H', W')
