"""The denoising UNet of latent diffusion (Rombach et al. 2022; ADM's layout, Dhariwal & Nichol 2021).

Levels of ResNet blocks, each optionally followed by a spatial transformer (self-attention, cross-attention to the
text context, GEGLU MLP), downsampling between levels, a middle block, and a mirrored up path that concatenates the
skip activations. With `UNET_CONFIGS["sd15"]` the layout and parameter count (859,520,964) are those of Stable
Diffusion 1.5's UNet.

Module names read like a map: `enc["level1_block0"].res.conv1`, `enc["level1_down"]`, `mid["block0"].attn`,
`dec["level3_up"]`. Zero-initialisation is written once, in `UNet.initialize_weights`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from ldm.config import ConfigError
from ldm.nn.attention import SpatialTransformer
from ldm.nn.conv import PointwiseConv, Upsample
from ldm.nn.embeddings import LabelEmbedder, TimestepEmbedder
from ldm.nn.linear import Linear


@dataclass
class UNetConfig:
    """UNet hyperparameters; the defaults are Stable Diffusion 1.5's UNet (`UNET_CONFIGS["sd15"]`)."""

    in_channels: int = 4                     # latent channels of the autoencoder
    out_channels: int | None = None          # None: in_channels (eps, v or x0 prediction)
    model_channels: int = 320                # width of level 0; level i is model_channels * channel_mult[i] wide
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # one entry per resolution level
    num_res_blocks: int = 2                  # ResNet blocks per level on the down path (one more on the up path)
    attention_levels: list[int] = field(default_factory=lambda: [0, 1, 2])  # levels with transformers (SD's
    #                                          attention_resolutions [4, 2, 1] are downsampling factors 1, 2, 4)
    mid_attention: bool = True               # a transformer between the two middle ResNet blocks
    transformer_depth: int = 1               # transformer blocks per spatial transformer
    num_heads: int | None = 8                # attention heads per layer (SD 1); exactly one of num_heads, head_dim
    head_dim: int | None = None              # width per head instead (SD 2: 64); heads = channels // head_dim
    context_dim: int | None = 768            # width of the conditioning tokens; None: self-attention only
    use_linear_proj: bool = False            # nn.Linear instead of 1x1 convs around the transformers (SD 2)
    use_scale_shift_norm: bool = False       # AdaGN: the time embedding scales and shifts the norm (ADM); SD 1: add
    num_classes: int | None = None           # class-conditional: label table with a null class at index num_classes
    pooled_dim: int | None = None            # width of a pooled prompt vector (B, pooled_dim) added to the time
    #                                          embedding through a 2-layer MLP (SDXL's adm_in_channels, Imagen)
    norm_groups: int = 32                    # GroupNorm groups; every level's width must divide by it
    dropout: float = 0.0                     # before each ResNet block's second conv (LDM's and diffusers' UNets:
    #                                          none in the transformers)
    upcast_attention: bool = False           # fp32 attention for fp16 inputs (see ldm.nn.attention)
    gradient_checkpointing: bool = False     # recompute each block in backward (torch.utils.checkpoint)

    def __post_init__(self) -> None:
        positive = dict(in_channels=self.in_channels, out_channels=self.output_channels,
                        model_channels=self.model_channels, num_res_blocks=self.num_res_blocks,
                        transformer_depth=self.transformer_depth, norm_groups=self.norm_groups)
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}={value} must be >= 1")
        if not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"channel_mult={self.channel_mult} must be a non-empty list of positive integers")
        if (self.num_heads is None) == (self.head_dim is None):
            both = "are both set" if self.num_heads is not None else "are both null"
            raise ConfigError(f"num_heads={self.num_heads} and head_dim={self.head_dim} {both}: set exactly one "
                              f"(the other to null; a named size sets one of them)")
        for key in ("num_heads", "head_dim", "context_dim", "num_classes", "pooled_dim"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key}={value} must be >= 1 or null")
        levels = range(len(self.channel_mult))
        bad_levels = [level for level in self.attention_levels if level not in levels]
        if bad_levels:
            raise ConfigError(f"attention_levels={self.attention_levels} names levels {bad_levels} outside "
                              f"0..{len(self.channel_mult) - 1} (channel_mult={self.channel_mult})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must lie in [0, 1)")
        for level, mult in enumerate(self.channel_mult):
            channels = self.model_channels * mult
            if channels % self.norm_groups:
                raise ConfigError(f"level {level} width model_channels * channel_mult[{level}] = {self.model_channels}"
                                  f" * {mult} = {channels} is not divisible by norm_groups={self.norm_groups}")
        if self.context_dim is not None and self.pooled_dim is None and not self.attention_levels and \
                not self.mid_attention:
            raise ConfigError(f"context_dim={self.context_dim} but no transformer reads it (attention_levels=[] and "
                              f"mid_attention=false) and no pooled prompt vector (pooled_dim=null): the prompts would "
                              f"change nothing; add attention, or the pooled vector (model.conditioner.pooled=true "
                              f"and pooled_dim), or set context_dim=null for a model without text "
                              f"(model.conditioner.kind=none, or class labels through the UNet's table: "
                              f"class_embed=unet)")
        attended = [(f"level {lv}", self.model_channels * self.channel_mult[lv]) for lv in self.attention_levels]
        if self.mid_attention:
            attended.append(("the middle block", self.model_channels * self.channel_mult[-1]))
        for where, channels in attended:
            if self.num_heads is not None and channels % self.num_heads:
                raise ConfigError(f"width {channels} of {where} is not divisible by num_heads={self.num_heads}")
            if self.head_dim is not None and channels % self.head_dim:
                raise ConfigError(f"width {channels} of {where} is not divisible by head_dim={self.head_dim}")

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    def heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) of a transformer `channels` wide."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added (SD) or as scale and shift of the second norm (ADM).

    Args:
        in_channels, out_channels: widths; a 1x1 convolution maps the skip when they differ.
        embed_dim: width of the time embedding.
        norm_groups: GroupNorm groups.
        dropout: before the second convolution.
        use_scale_shift_norm: AdaGN, h = norm(h) * (1 + scale) + shift (ADM, eq. in sec. 3 "Adaptive Group
            Normalization").
    """

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, norm_groups: int = 32,
                 dropout: float = 0.0, use_scale_shift_norm: bool = False):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.norm1 = nn.GroupNorm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = Linear(embed_dim, 2 * out_channels if use_scale_shift_norm else out_channels)
        self.norm2 = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)  # zero-initialised by the UNet
        self.skip = PointwiseConv(in_channels, out_channels) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # Main branch.
        h = self.conv1(F.silu(self.norm1(x)))                                   # (B, out, H, W)
        emb = self.emb_proj(F.silu(emb))[:, :, None, None]                      # (B, out or 2*out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb.chunk(2, dim=1)                                  # (B, out, 1, 1) each
            h = F.silu(self.norm2(h) * (1 + scale) + shift)                     # (B, out, H, W)
        else:
            h = F.silu(self.norm2(h + emb))                                     # (B, out, H, W)
        h = self.conv2(self.dropout(h))                                         # (B, out, H, W)
        # Residual branch.
        return self.skip(x) + h                                                 # (B, out, H, W)


class UNetBlock(nn.Module):
    """A ResNet block followed, at attention levels, by a spatial transformer."""

    def __init__(self, res: ResBlock, attn: SpatialTransformer | None = None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.res(x, emb)                                                    # (B, C, H, W)
        return x if self.attn is None else self.attn(x, context)                # (B, C, H, W)


class Downsample(nn.Module):
    """Strided 3x3 convolution: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet(nn.Module):
    """Denoising UNet: `unet(x, t, context, class_labels, pooled)` predicts eps, v or x0 (the parameterization is the
    diffusion code's business) with the shape of x.

    Args:
        config: the hyperparameters; see `UNetConfig` and `UNET_CONFIGS`.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        # Set to a list by a FLOP count of a training step (ldm.callbacks.throughput): each checkpointed block's
        # recomputation in backward is counted into it too, for the count to leave out (it is no model FLOP).
        self.recomputation_counts: list[FlopCounterMode] | None = None
        c = config
        embed_dim = 4 * c.model_channels
        widths = [c.model_channels * mult for mult in c.channel_mult]

        def res_block(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, embed_dim, c.norm_groups, c.dropout, c.use_scale_shift_norm)

        def transformer(channels: int) -> SpatialTransformer:
            num_heads, head_dim = c.heads(channels)
            return SpatialTransformer(channels, num_heads, head_dim, c.transformer_depth, c.context_dim,
                                      c.norm_groups, c.use_linear_proj, 0.0, c.upcast_attention)  # as LDM, diffusers

        # Embeddings.
        self.time_embed = TimestepEmbedder(c.model_channels, embed_dim)
        self.label_embed = LabelEmbedder(c.num_classes, embed_dim) if c.num_classes is not None else None
        self.pooled_embed = None
        if c.pooled_dim is not None:
            self.pooled_embed = nn.Sequential(Linear(c.pooled_dim, embed_dim), nn.SiLU(),
                                              Linear(embed_dim, embed_dim))

        # Encoder: every module's output is a skip for the decoder.
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1)
        self.enc = nn.ModuleDict()
        skip_widths = [widths[0]]
        cin = widths[0]
        for level, cout in enumerate(widths):
            for i in range(c.num_res_blocks):
                attn = transformer(cout) if level in c.attention_levels else None
                self.enc[f"level{level}_block{i}"] = UNetBlock(res_block(cin, cout), attn)
                skip_widths.append(cout)
                cin = cout
            if level < len(widths) - 1:
                self.enc[f"level{level}_down"] = Downsample(cout)
                skip_widths.append(cout)

        # Middle.
        self.mid = nn.ModuleDict()
        self.mid["block0"] = UNetBlock(res_block(cin, cin), transformer(cin) if c.mid_attention else None)
        self.mid["block1"] = UNetBlock(res_block(cin, cin))

        # Decoder: every block consumes one skip, concatenated along channels.
        self.dec = nn.ModuleDict()
        for level, cout in reversed(list(enumerate(widths))):
            for i in range(c.num_res_blocks + 1):
                attn = transformer(cout) if level in c.attention_levels else None
                self.dec[f"level{level}_block{i}"] = UNetBlock(res_block(cin + skip_widths.pop(), cout), attn)
                cin = cout
            if level > 0:
                self.dec[f"level{level}_up"] = Upsample(cout)

        # Output.
        self.norm_out = nn.GroupNorm(c.norm_groups, cin)
        self.conv_out = nn.Conv2d(cin, c.output_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch's default initialisation, then zero the last layer of every residual branch and the output conv,
        so each block starts as the identity and the network's output starts at exactly zero (ADM, LDM)."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_module(module.conv2)
            elif isinstance(module, SpatialTransformer):
                zero_module(module.proj_out)
        zero_module(self.conv_out)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None, pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Denoise a batch of latents.

        Args:
            x: noisy latents (B, in_channels, H, W); H and W divisible by `downsampling_factor`.
            t: timesteps (B,), or a scalar or (1,) for all, integer or float.
            context: conditioning tokens (B, M, context_dim); required iff config.context_dim is set.
            class_labels: (B,) integer labels in [0, num_classes]; required iff config.num_classes is set.
            pooled: (B, pooled_dim) pooled prompt vectors; required iff config.pooled_dim is set.

        Returns:
            (B, out_channels, H, W).
        """
        t = torch.as_tensor(t, device=x.device)
        self._check_inputs(x, t, context, class_labels, pooled)
        B = x.shape[0]
        t = t.reshape(1).expand(B) if t.numel() == 1 else t                     # (B,)

        # Embeddings.
        emb = self.time_embed(t)                                                # (B, 4 * model_channels)
        if self.label_embed is not None:  # (torch's embedding takes int32 / int64 indices alone)
            labels = class_labels if class_labels.dtype in (torch.int32, torch.int64) else class_labels.long()
            emb = emb + self.label_embed(labels)                                # (B, 4 * model_channels)
        if self.pooled_embed is not None:
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))                # (B, 4 * model_channels)

        # Encoder.
        h = self.conv_in(x)                                                     # (B, widths[0], H, W)
        skips = [h]
        for block in self.enc.values():
            h = self._run(block, h, emb, context)                               # (B, C_l, H / 2^l, W / 2^l)
            skips.append(h)

        # Middle.
        for block in self.mid.values():
            h = self._run(block, h, emb, context)                               # (B, C_last, H / f, W / f)

        # Decoder.
        for block in self.dec.values():
            if isinstance(block, UNetBlock):
                h = torch.cat([h, skips.pop()], dim=1)                          # (B, C + C_skip, h, w)
            h = self._run(block, h, emb, context)                               # (B, C_l, H / 2^l, W / 2^l)

        # Output.
        return self.conv_out(F.silu(self.norm_out(h)))                          # (B, out_channels, H, W)

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        """Apply a block, recomputing it in backward when gradient checkpointing is on."""
        if not isinstance(block, UNetBlock):
            return block(h)
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            if self.recomputation_counts is not None and not torch.compiler.is_compiling():
                return checkpoint(block, h, emb, context, use_reentrant=False, context_fn=self._counted_recomputation)
            return checkpoint(block, h, emb, context, use_reentrant=False)
        return block(h, emb, context)

    def _counted_recomputation(self) -> tuple[contextlib.AbstractContextManager, FlopCounterMode]:
        """checkpoint's contexts (forward, recomputation): the recomputation under a counter of its own, inside
        the step's (which counts it too)."""
        counter = FlopCounterMode(display=False)
        self.recomputation_counts.append(counter)
        return contextlib.nullcontext(), counter

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None,
                      class_labels: torch.Tensor | None, pooled: torch.Tensor | None) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x must be (B, in_channels={c.in_channels}, H, W); got {tuple(x.shape)}")
        if t.shape not in ((), (1,), (x.shape[0],)):
            raise ValueError(f"t must be a scalar, (1,) or (B={x.shape[0]},): one timestep for all latents or one "
                             f"each; got {tuple(t.shape)}")
        f = self.downsampling_factor
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"latent size {tuple(x.shape[2:])} must be divisible by {f} "
                             f"(2 ** (len(channel_mult) - 1), channel_mult={c.channel_mult})")
        if c.context_dim is None and context is not None:
            raise ValueError("context given but the UNet has no cross-attention (context_dim=None)")
        if c.context_dim is not None:
            if context is None:
                raise ValueError(f"the UNet cross-attends to a context (context_dim={c.context_dim}); pass context "
                                 f"(B, M, {c.context_dim}), e.g. the empty prompt's for unconditional samples")
            if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != c.context_dim:
                raise ValueError(f"context must be (B={x.shape[0]}, M, context_dim={c.context_dim}); "
                                 f"got {tuple(context.shape)}")
        if c.num_classes is None and class_labels is not None:
            raise ValueError("class_labels given but the UNet is not class-conditional (num_classes=None)")
        if class_labels is not None and (not isinstance(class_labels, torch.Tensor) or class_labels.is_floating_point()
                                         or class_labels.is_complex() or class_labels.dtype == torch.bool):
            raise ValueError(f"class_labels must be an integer tensor (B,), e.g. torch.tensor([3, 7]); got "
                             f"{type(class_labels).__name__}"
                             f"{f' of {class_labels.dtype}' if isinstance(class_labels, torch.Tensor) else ''}")
        if c.num_classes is not None and (class_labels is None or class_labels.shape != (x.shape[0],)):
            raise ValueError(f"class_labels (B={x.shape[0]},) in [0, {c.num_classes}] are required "
                             f"(num_classes={c.num_classes}; {c.num_classes} is the null class); got "
                             f"{None if class_labels is None else tuple(class_labels.shape)}")
        if c.pooled_dim is None and pooled is not None:
            raise ValueError("pooled given but the UNet takes no pooled vector (pooled_dim=None)")
        if c.pooled_dim is not None and (pooled is None or pooled.shape != (x.shape[0], c.pooled_dim)):
            raise ValueError(f"pooled (B={x.shape[0]}, pooled_dim={c.pooled_dim}) is required (set "
                             f"model.conditioner.pooled=true); got {None if pooled is None else tuple(pooled.shape)}")


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# Named sizes. "sd15" and "sd21" reproduce Stable Diffusion's UNets; the rest are for research at small scale. This
# is their one home: ldm.config.register_schemas stores them as Hydra's `unet` group, and a model YAML starts from
# one with `- /unet@unet: tiny` in its defaults list, then lists only what it changes.
UNET_CONFIGS: dict[str, UNetConfig] = {
    # Tests and CPU smoke runs: 2 levels, attention at the lower resolution, 1.06M parameters.
    "tiny": UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                       num_heads=None, head_dim=16, context_dim=64, norm_groups=8, use_scale_shift_norm=True),
    # Quick experiments on 32x32 latents.
    "small": UNetConfig(model_channels=128, channel_mult=[1, 2, 2], num_res_blocks=2, attention_levels=[1, 2],
                        num_heads=None, head_dim=64, context_dim=512, use_scale_shift_norm=True),
    # LDM paper's text-to-image scale without SD's 4th level.
    "base": UNetConfig(model_channels=256, channel_mult=[1, 2, 4], num_res_blocks=2, attention_levels=[0, 1, 2],
                       num_heads=None, head_dim=64, context_dim=768, use_scale_shift_norm=True),
    # Stable Diffusion 1.x: 859,520,964 parameters.
    "sd15": UNetConfig(),
    # Stable Diffusion 2.1: OpenCLIP-H context, head_dim 64, linear projections, its upcast_attention flag
    # (865,910,724 parameters).
    "sd21": UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True, upcast_attention=True),
}


def unet_config(name: str, **overrides) -> UNetConfig:
    """A named size from `UNET_CONFIGS`, with fields overridden (validated again).

    Args:
        name: a key of UNET_CONFIGS.
        **overrides: UNetConfig fields to change, e.g. context_dim=None.
    """
    if name not in UNET_CONFIGS:
        raise ConfigError(f"unknown UNet size {name!r}; choose one of {sorted(UNET_CONFIGS)}")
    return dataclasses.replace(UNET_CONFIGS[name], **overrides)
