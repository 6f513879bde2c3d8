"""Timestep and class-label embeddings for the UNet (DiT's `TimestepEmbedder` / `LabelEmbedder`, ADM's layout)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.nn.linear import Linear


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, cosines first (ADM / Stable Diffusion order).

    Args:
        t: timesteps of shape (B,), integer or float.
        dim: embedding width; an odd width gets one zero column appended.
        max_period: the longest wavelength, in timesteps ("Attention Is All You Need", section 3.5).

    Returns:
        A float32 tensor of shape (B, dim).
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half                # (half,)
    freqs = torch.exp(-math.log(max_period) * exponents)                                        # (half,)
    args = t.float()[:, None] * freqs[None]                                                     # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)                                 # (B, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)                            # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the timestep followed by a two-layer SiLU MLP.

    Args:
        frequency_dim: width of the sinusoidal features (SD: model_channels).
        embed_dim: width of the embedding the ResNet blocks receive (SD: 4 * model_channels).
    """

    def __init__(self, frequency_dim: int, embed_dim: int):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(Linear(frequency_dim, embed_dim), nn.SiLU(), Linear(embed_dim, embed_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freqs = timestep_embedding(t, self.frequency_dim)                   # (B, frequency_dim), float32
        return self.mlp(freqs.to(self.mlp[0].weight.dtype))                 # (B, embed_dim)


class LabelEmbedder(nn.Module):
    """A class-label table with one extra row, index `num_classes`, for the null class of classifier-free guidance.

    Args:
        num_classes: number of real classes; labels are in [0, num_classes], num_classes meaning "no class".
        embed_dim: embedding width.
    """

    def __init__(self, num_classes: int, embed_dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding = nn.Embedding(num_classes + 1, embed_dim)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class); "
                             f"got min {int(labels.min())}, max {int(labels.max())}")
        return self.embedding(labels)                                       # (B, embed_dim)
