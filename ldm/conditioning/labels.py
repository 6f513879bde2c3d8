"""Class labels as one context token for cross-attention (the LDM paper's class-conditional ImageNet model,
`ClassEmbedder`), with a null class for guidance dropout."""

from __future__ import annotations

import torch
from torch import nn


class ClassEmbedder(nn.Module):
    """An embedding table of num_classes + 1 rows; row `num_classes` is the null class.

    Args:
        num_classes: number of real classes.
        width: embedding width, the UNet's context_dim.
    """

    trainable = True

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.num_classes = num_classes
        self.context_dim = width
        self.embedding = nn.Embedding(num_classes + 1, width)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B,) in [0, num_classes] to context (B, 1, width)."""
        return self.embedding(labels)[:, None]                                  # (B, 1, D)
