"""The KL-regularized autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

Parameter names follow the original LDM / Stable Diffusion layout (`encoder.down.{i}.block.{j}.conv1`,
`encoder.mid.attn_1.q`, `quant_conv`, ...), so a state dict of SD's KL-f8 autoencoder maps onto `AutoencoderKL`
key for key. Networks only: no Lightning here (training lives in `ldm.modules.autoencoder`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.config import ConfigError, check_min
from ldm.io import (
    CONFIG_NAME,
    PIPELINE_FORMAT,
    WEIGHTS_NAME,
    atomic_write_text,
    check_export_destination,
    export_config,
    export_dir,
    load_export_weights,
    read_export,
    read_json_object,
    save_export,
    trained_model_path,
)
from ldm.nn.conv import PointwiseConv, Upsample
from ldm.seeding import keeps_global_rng

LATENT_STATS_NAME = "latent_stats.json"


@dataclass
class AutoencoderConfig:
    """Architecture of the encoder / decoder pair; the defaults are SD's KL-f8."""

    in_channels: int = 3                      # image channels in
    out_channels: int = 3                     # image channels out
    resolution: int = 256                     # training resolution; must be divisible by the downsampling factor
    ch: int = 128                             # base channel count
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])  # per level; f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 2                   # ResNet blocks per encoder level (decoder: one more)
    z_channels: int = 4                       # channels at the encoder output / decoder input
    embed_dim: int = 4                        # latent channels after quant_conv (what diffusion sees)
    double_z: bool = True                     # encoder outputs mean and log-variance (SD) or z_channels only
    dropout: float = 0.0                      # dropout inside the ResNet blocks
    norm_groups: int = 32                     # GroupNorm groups; every channel count must be divisible by it

    def __post_init__(self) -> None:
        check_min(1, in_channels=self.in_channels, out_channels=self.out_channels, resolution=self.resolution,
                  ch=self.ch, num_res_blocks=self.num_res_blocks, z_channels=self.z_channels, embed_dim=self.embed_dim,
                  norm_groups=self.norm_groups)
        if len(self.ch_mult) < 1 or min(self.ch_mult) < 1:
            raise ConfigError(f"ch_mult={self.ch_mult} must be a non-empty list of positive integers")
        for width in [self.ch] + [self.ch * m for m in self.ch_mult]:
            if width % self.norm_groups != 0:
                raise ConfigError(f"channel count {width} (ch={self.ch}, ch_mult={self.ch_mult}) is not divisible "
                                  f"by norm_groups={self.norm_groups}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must lie in [0, 1)")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_resolution(self) -> int:
        return self.resolution // self.downsample_factor


def normalize(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus a (1x1-projected) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = PointwiseConv(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Residual branch.
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        # Main branch.
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions; q, k, v and proj_out are 1x1 convs as in LDM."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = PointwiseConv(channels, channels)
        self.k = PointwiseConv(channels, channels)
        self.v = PointwiseConv(channels, channels)
        self.proj_out = PointwiseConv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, 1, HW, C) with stride 1 along C (a copy in NCHW, a view in channels_last): the fused SDPA kernels
        # (flash, memory-efficient) need it and fall back to materialising the HW x HW attention matrix without it
        q, k, v = (m(h).flatten(2).transpose(1, 2).contiguous().unsqueeze(1) for m in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)                                                 # (B, 1, HW, C)
        h = h.squeeze(1).transpose(1, 2).reshape(B, C, H, W)                                        # (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with LDM's asymmetric (0, 1, 0, 1) padding, so pretrained weights line up exactly."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class MidBlock(nn.Module):
    """ResNet block, self-attention, ResNet block at the lowest resolution."""

    def __init__(self, channels: int, dropout: float, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, dropout, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments (B, 2 * z_channels or z_channels, H / f, W / f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        widths = [c.ch * m for m in [1, *c.ch_mult]]  # widths[i] -> widths[i + 1] at level i
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        for i in range(len(c.ch_mult)):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(widths[i] if j == 0 else widths[i + 1], widths[i + 1],
                                                     c.dropout, groups) for j in range(c.num_res_blocks)])
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(widths[i + 1])
            self.down.append(level)
        self.mid = MidBlock(widths[-1], c.dropout, groups)
        self.norm_out = normalize(widths[-1], groups)
        self.conv_out = nn.Conv2d(widths[-1], c.z_channels * (2 if c.double_z else 1), 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)                          # (B, ch, H, W)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)              # (B, C_i, H / 2^(i+1), W / 2^(i+1))
        h = self.mid(h)                              # (B, C, H / f, W / f)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_channels, h * f, w * f)."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        c, groups = config, config.norm_groups
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], c.dropout, groups)
        # note: up[i] is built from the lowest resolution upwards but indexed by level, like LDM's `up.insert(0, ...)`.
        up: list[nn.Module] = []
        width = widths[-1]
        for i in reversed(range(len(c.ch_mult))):
            level = nn.Module()
            level.block = nn.ModuleList([ResnetBlock(width if j == 0 else widths[i], widths[i], c.dropout, groups)
                                         for j in range(c.num_res_blocks + 1)])
            width = widths[i]
            if i != 0:
                level.upsample = Upsample(width)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = normalize(widths[0], groups)
        self.conv_out = nn.Conv2d(widths[0], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))                # (B, C, h, w)
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)                # (B, C_i, 2h, 2w)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, out_channels, h * f, w * f)


class DiagonalGaussianDistribution:
    """The posterior q(z | x) = N(mean, diag(exp(logvar))), from moments (B, 2 * C, h, w) split on channels."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)     # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)          # as LDM: keeps exp() finite early in training
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps; eps from `generator` (per step and rank in training) or the global RNG."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, summed over latent dimensions: 0.5 * sum(mu^2 + var - 1 - logvar). (B,)

        In fp32 whatever the moments' dtype: under bf16 autocast they are bf16, whose spacing at a KL of 656 is 4
        (the logged kl_loss stood still)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of `sample` under the posterior, summed over latent dimensions, in fp32 as `kl`.
        (B,)"""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + logvar + (sample.float() - mean).pow(2) / logvar.exp(),
                               dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """Encoder -> quant_conv -> Gaussian posterior -> post_quant_conv -> decoder.

    Args:
        config: the architecture; see `AutoencoderConfig`.
    """

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        moments = config.z_channels * (2 if config.double_z else 1)
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = PointwiseConv(moments, 2 * config.embed_dim)
        self.post_quant_conv = PointwiseConv(config.embed_dim, config.z_channels)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's output weight: the adaptive GAN weight compares gradient norms here."""
        return self.decoder.conv_out.weight

    def check_images(self, x: torch.Tensor) -> None:
        """Raise ValueError unless `x` is what `encode` takes: floating point (B, in_channels, H, W)."""
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c or not x.is_floating_point():
            hints = [hint for hint, applies in (
                ("(B, H, W, C) images: x.permute(0, 3, 1, 2)", x.ndim == 4 and x.shape[1] != c and x.shape[-1] == c),
                ("images of 0..255: x.float() / 127.5 - 1", not x.is_floating_point() and x.dtype != torch.bool),
                ("images of 0 and 1: x.float() * 2 - 1", not x.is_floating_point() and x.dtype != torch.uint8))
                if applies]
            raise ValueError(f"images must be a floating-point (B, {c}, H, W) tensor in [-1, 1]; got {x.dtype} of "
                             f"shape {tuple(x.shape)}" + (f" ({'; '.join(hints)})" if hints else ""))

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, C, H, W) in [-1, 1], H and W multiples of f -> posterior over latents (B, embed_dim, H / f,
        W / f)."""
        self.check_images(x)
        f = self.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:  # the padded stride-2 convolutions would drop the last rows unsaid
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the autoencoder's downsampling "
                             f"factor f={f}: crop or resize the images to multiples of {f}")
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, C, h * f, w * f), roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.config.embed_dim:
            raise ValueError(f"latents must be (B, embed_dim={self.config.embed_dim}, h, w); got shape "
                             f"{tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `x`; returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def save_pretrained(self, directory: str | Path, latent_stats: dict[str, Any] | None = None) -> Path:
        """Write config.json, model.safetensors and (when given) latent_stats.json into `directory`, replacing what an
        earlier export left there (its latent_stats.json too, when `latent_stats` is None); a folder that holds a
        model of another kind is refused (`ldm.io.check_export_destination`).

        Args:
            directory: created if missing.
            latent_stats: the latent statistics measured in validation (see `ldm.modules.autoencoder`).
        """
        check_export_destination(directory, dataclasses.asdict(self.config))
        # an earlier export's statistics are not these weights': removed first, so that no state of the folder pairs
        # them with the new weights (without statistics, stage 2 asks for model.latent_scale)
        # (written before save_export's config.json, which it writes last: a folder with config.json is whole)
        Path(directory, LATENT_STATS_NAME).unlink(missing_ok=True)
        Path(directory, CONFIG_NAME).unlink(missing_ok=True)
        if latent_stats is not None:
            atomic_write_text(json.dumps(latent_stats, indent=2), Path(directory) / LATENT_STATS_NAME)
        return save_export(directory, dataclasses.asdict(self.config), self)

    @classmethod
    @keeps_global_rng
    def from_pretrained(cls, directory: str | Path, key: str = "autoencoder_path") -> AutoencoderKL:
        """Load an autoencoder written by `save_pretrained`, or the frozen autoencoder of a latent diffusion pipeline
        export. `key` is the config key that named `directory`, for errors (another kind of export among them)."""
        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{key}={directory}: {name} is missing, so this is no export of "
                                        f"`save_pretrained`")
        config, state = read_export(directory, key)
        if config.get("format") == PIPELINE_FORMAT:
            config = config["autoencoder"]
            state = {k.removeprefix("autoencoder."): v for k, v in state.items() if k.startswith("autoencoder.")}
        model = cls(export_config(directory, config, AutoencoderConfig, key))
        load_export_weights(model, state, directory, key)
        return model


@keeps_global_rng
def load_autoencoder(path: str | Path, key: str = "path", use_ema: bool = True,
                     ) -> tuple[AutoencoderKL, dict[str, Any] | None]:
    """An autoencoder, frozen (eval mode: dropout off; no gradients), and its latent statistics from an export
    directory or an `AutoencoderModule` checkpoint.

    A checkpoint gives its EMA weights when it has them (and `use_ema`). Latent statistics are None when neither the
    export nor the checkpoint holds any; a pipeline's export or checkpoint gives its latent scale alone.

    Args:
        path: an export directory (`save_pretrained`), a `.ckpt` of `ldm.modules.autoencoder.AutoencoderModule`, a
            latent diffusion pipeline export or checkpoint (its frozen autoencoder and latent scale), or a run
            directory whose `export/` holds one of these.
        key: the config key that set `path`, named in errors (from Python: `path`).
        use_ema: a checkpoint's EMA weights (when it has them); false: its raw ones. An export holds one set.
    """
    model, stats = _read_autoencoder(Path(path).expanduser(), key, use_ema)
    return model.eval().requires_grad_(False), stats


def _read_autoencoder(path: Path, key: str, use_ema: bool) -> tuple[AutoencoderKL, dict[str, Any] | None]:
    if not path.exists():
        raise FileNotFoundError(f"{key}={path} does not exist; point it at an autoencoder export directory "
                                f"(<run>/export with {CONFIG_NAME} and {WEIGHTS_NAME}) or an autoencoder .ckpt")
    path = trained_model_path(path, key, reader="load_autoencoder")  # an export's weights file: its folder
    if path.is_dir():
        path = export_dir(path, key)
        model = AutoencoderKL.from_pretrained(path, key)
        config = read_json_object(path / CONFIG_NAME, key)
        if config.get("format") == PIPELINE_FORMAT:  # its scale, not a stage-1 export's file left in the folder
            return model, {"scale_factor": config["latent_scale"]}
        stats_file = path / LATENT_STATS_NAME
        if stats_file.exists():
            stats = read_json_object(stats_file, key)
            scale = stats.get("scale_factor")
            if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                                      or not math.isfinite(scale) or scale <= 0):
                raise ConfigError(f"{key}: {stats_file} has scale_factor={scale!r}, not a positive finite number: "
                                  f"the file is damaged (delete it to measure the scale again, or set "
                                  f"model.latent_scale)")
            return model, stats
        return model, None

    from ldm.checkpoints import checkpoint_kind, load_checkpoint, submodule_state

    checkpoint = load_checkpoint(path, key)  # never executes code the file carries
    # (a latent diffusion checkpoint: the frozen autoencoder it trained on)
    if checkpoint_kind(checkpoint, path, key, reader="load_autoencoder") == "latent_diffusion":
        frozen = checkpoint["hyper_parameters"]["frozen"]
        model = AutoencoderKL(AutoencoderConfig(**frozen["autoencoder_config"]))
        model.load_state_dict(submodule_state(checkpoint["state_dict"], "pipeline.autoencoder.")[0])
        return model, {"scale_factor": frozen["latent_scale"]}
    model = AutoencoderKL(AutoencoderConfig(**checkpoint["autoencoder_config"]))
    state, _ = submodule_state(checkpoint["state_dict"], "autoencoder.", "ema.module." if use_ema else None)
    model.load_state_dict(state)
    stats = checkpoint_latent_stats(checkpoint, path)
    # (a decoder-only fine-tune's scale is its source's, `scale_factor_from`: of no step)
    if stats is not None and stats.get("step") != checkpoint.get("global_step") and "scale_factor_from" not in stats:
        warnings.warn(f"{key}={path}: its latent statistics were measured at step {stats.get('step')}, its weights "
                      f"are of step {checkpoint.get('global_step')} (no {LATENT_STATS_NAME} of that step beside it), "
                      f"so the latent scale is of older weights: give the run's export, or set model.latent_scale",
                      stacklevel=2)
    if stats is not None and not use_ema and "scale_factor_from" not in stats and \
            any(name.startswith("ema.module.") for name in checkpoint["state_dict"]):
        warnings.warn(f"{key}={path}: use_ema=false takes the raw weights, but its latent statistics were measured on "
                      f"the EMA weights (validations evaluate the EMA), whose latents' spread differs: the latent "
                      f"scale {stats.get('scale_factor')} is not theirs (ldm-export writes it as the export's "
                      f"scaling_factor; stage 2 takes it unless model.latent_scale is set); use the EMA weights, or "
                      f"measure the raw weights' scale", stacklevel=2)
    return model, stats


def checkpoint_latent_stats(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any] | None:
    """The latent statistics of a stage-1 checkpoint's weights: its own when they are of its step, else those of the
    latent_stats.json beside it when that file records the checkpoint's step (a checkpoint written at the end of its
    step's batch, before that step's validation measured them); else its own, of an earlier step (or None)."""
    stats, step = checkpoint.get("latent_stats"), checkpoint.get("global_step")
    if (stats or {}).get("step") == step:
        return stats
    beside = Path(path).parent / LATENT_STATS_NAME
    try:
        found = read_json_object(beside, "latent statistics") if beside.is_file() else {}
    except ConfigError as err:  # damaged from outside: the checkpoint's own statistics stand
        warnings.warn(f"{err}; ignored (the next validation writes it again)", stacklevel=2)
        found = {}
    return found if found.get("step") == step else stats
