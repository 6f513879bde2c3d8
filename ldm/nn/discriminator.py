"""PatchGAN discriminator (Isola et al. 2017), laid out as taming-transformers' NLayerDiscriminator."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ldm.config import check_choice, check_min

NORMS = ("batch", "group", "none")


@dataclass
class DiscriminatorConfig:
    in_channels: int = 3        # image channels
    ndf: int = 64               # channels of the first conv; doubles per layer up to 8x
    n_layers: int = 3           # stride-2 convs; the receptive field grows with depth (3 -> 70x70 patches)
    norm: str = "batch"         # batch (taming), group or none

    def __post_init__(self) -> None:
        check_choice("norm", self.norm, NORMS)
        check_min(1, in_channels=self.in_channels, ndf=self.ndf, n_layers=self.n_layers)


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    return nn.Identity()


class NLayerDiscriminator(nn.Module):
    """Images (B, C, H, W) -> patch logits (B, 1, h, w), one real/fake score per receptive field.

    Args:
        config: depth, width and normalization; see `DiscriminatorConfig`.
    """

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        ndf, bias = config.ndf, config.norm != "batch"  # a conv followed by BatchNorm needs no bias
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, config.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < config.n_layers else 1  # the last hidden conv keeps the resolution
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                       _norm(config.norm, ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    """DCGAN initialization, as taming: conv weights N(0, 0.02), norm scales N(1, 0.02)."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)
