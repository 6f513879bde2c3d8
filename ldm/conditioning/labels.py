"""Class labels as one context token for cross-attention (the LDM paper's class-conditional ImageNet model,
`ClassEmbedder`), with a null class for guidance dropout."""

from __future__ import annotations

import torch

from ldm.nn.embeddings import LabelEmbedder


class ClassEmbedder(LabelEmbedder):
    """The UNet's label table (num_classes + 1 rows, row `num_classes` the null class) read as one context token.

    Args:
        num_classes: number of real classes.
        width: embedding width, the UNet's context_dim.
    """

    trainable = True

    def __init__(self, num_classes: int, width: int):
        super().__init__(num_classes, width)
        self.context_dim = width

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B,) in [0, num_classes] to context (B, 1, width)."""
        return super().forward(labels)[:, None]                                 # (B, 1, D)
