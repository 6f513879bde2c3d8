"""Stage 2: a text- (or class-) conditioned UNet trained on the latents of a frozen stage-1 autoencoder.

Wiring only: the autoencoder (`ldm.nn.autoencoder`), UNet (`ldm.nn.unet`), conditioner (`ldm.conditioning`), the
objective and samplers (`ldm.diffusion`), EMA and the optimizer. The frozen autoencoder stays in eval mode and fp32
under mixed precision. Its weights, config and the latent scale are part of every checkpoint, so a `.ckpt` alone is
enough to sample (`ldm-sample`, `LatentDiffusionModule.from_checkpoint`, or Lightning's `load_from_checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ldm.conditioning import ConditionerConfig, build_conditioner
from ldm.config import ConfigError, asdict, check_choice, to_dataclass
from ldm.diffusion import SAMPLERS, Denoiser, NoiseSchedule, guided_denoiser, run_sampler
from ldm.diffusion.objective import DiffusionConfig, diffusion_loss
from ldm.modules.ema import make_ema
from ldm.modules.optim import LR_SCHEDULES, lr_scheduler
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL, load_autoencoder
from ldm.nn.unet import UNet, UNetConfig
from ldm.seeding import StackedRandomGenerator, step_generator


@dataclass
class Config:
    autoencoder_path: str | None = None    # required: stage 1's export directory, run directory or .ckpt
    latent_scale: float | None = None      # z * latent_scale is what diffusion sees; null: 1 / std from stage 1's
    #                                        latent statistics (error if it has none)
    sample_posterior: bool = True          # encode to a posterior sample (LDM) or its mode
    image_size: int | None = None          # generation size in pixels; null: the autoencoder's training resolution
    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    seed: int = 0                          # training noise: step_generator(seed, rank, step)
    lr: float = 1e-4                       # AdamW learning rate, used as given (never rescaled)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 0                  # linear LR warmup
    lr_schedule: str = "constant"          # after warmup: constant | cosine | linear (decay to 0 at the last step)
    ema_decay: float | None = 0.9999       # EMA of the UNet (and a trainable text encoder); null: off
    image_key: str = "image"               # batch keys: images (B, 3, H, W) in [-1, 1], captions, class labels
    caption_key: str = "caption"
    label_key: str = "label"
    # Validation samples (log_images): prompt i uses seed val_seed + i, so every grid is comparable.
    val_prompts: list[str] = field(default_factory=list)  # empty: the first captions of the validation batch
    val_class_labels: list[int] | None = None  # class-conditional models
    val_num_images: int = 8                # images when val_prompts is empty
    val_seed: int = 0
    val_sampler: str = "ddim"
    val_num_steps: int = 50
    val_guidance_scale: float = 5.0
    val_use_ema: bool = True               # EMA weights for val/loss and samples

    def __post_init__(self) -> None:
        check_choice("val_sampler", self.val_sampler, SAMPLERS)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not self.autoencoder_path:
            raise ConfigError("model.autoencoder_path is required: stage 1's export directory (<vae run>/export), "
                              "run directory or checkpoint, e.g. model.autoencoder_path=runs/vae/export")
        if len(self.betas) != 2:
            raise ConfigError(f"betas={self.betas} must hold two values")
        if self.latent_scale is not None and self.latent_scale <= 0:
            raise ConfigError(f"latent_scale={self.latent_scale} must be > 0 or null")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay={self.ema_decay} must lie in (0, 1) or be null")


def resolve_latent_scale(explicit: float | None, stats: dict[str, Any] | None, source: str) -> tuple[float, str]:
    """The latent scale and where it came from: explicit value first, then stage 1's measured `scale_factor`."""
    if explicit is not None:
        return float(explicit), "model.latent_scale"
    if stats and stats.get("scale_factor"):
        return float(stats["scale_factor"]), f"1 / std of the latent statistics of {source}"
    raise ConfigError(f"no latent scale: {source} holds no latent statistics (they are measured in stage 1's "
                      f"validation) and model.latent_scale is null. Set model.latent_scale explicitly (SD's KL-f8: "
                      f"0.18215) or point model.autoencoder_path at an autoencoder that has latent_stats.json")


class LatentDiffusionModule(L.LightningModule):
    """Wires the frozen autoencoder, the UNet, the conditioner, the diffusion objective, EMA and sampling.

    Args:
        config: see `Config`; built from `model.*` by `ldm.config.instantiate`.
        frozen: what a checkpoint restores instead of reading `autoencoder_path` (autoencoder config, latent scale);
            Lightning passes it back from the saved hyperparameters in `load_from_checkpoint`. A checkpoint also
            holds a pretrained byte encoder's weights, so restoring reads no `conditioner.name_or_path` either.
    """

    Config = Config

    def __init__(self, config: Config | dict[str, Any], frozen: dict[str, Any] | None = None):
        super().__init__()
        config = to_dataclass(Config, config, "model")  # a dict when rebuilt by `load_from_checkpoint`
        self.config = config

        # Frozen autoencoder: from stage 1, or (when restoring a checkpoint) empty, filled by the state dict.
        restoring = frozen is not None
        if not restoring:
            autoencoder, stats = load_autoencoder(config.autoencoder_path)
            scale, source = resolve_latent_scale(config.latent_scale, stats, config.autoencoder_path)
            frozen = {"autoencoder_config": asdict(autoencoder.config), "latent_scale": scale,
                      "latent_scale_source": source, "autoencoder_path": str(config.autoencoder_path)}
            rank_zero_info(f"latent scale {scale:.5g} ({source})")
        else:
            autoencoder = AutoencoderKL(AutoencoderConfig(**frozen["autoencoder_config"]))
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.latent_scale = float(frozen["latent_scale"])
        self.save_hyperparameters({"config": asdict(config), "frozen": frozen})

        # Denoiser and conditioning.
        self.conditioner = build_conditioner(config.conditioner, load_pretrained=not restoring)
        self.conditioner.check_unet(config.unet)
        if config.unet.in_channels != autoencoder.config.embed_dim:
            raise ConfigError(f"model.unet.in_channels={config.unet.in_channels} does not match the autoencoder's "
                              f"latent channels embed_dim={autoencoder.config.embed_dim}")
        self.unet = UNet(config.unet)
        self.schedule = NoiseSchedule(config.diffusion.schedule)
        self.image_size = self._check_image_size(config.image_size or autoencoder.config.resolution,
                                                 "model.image_size", ConfigError)

        # EMA of everything that trains.
        decay = config.ema_decay
        self.ema = make_ema(self.unet, decay) if decay is not None else None
        self.ema_conditioner = make_ema(self.conditioner, decay) if decay and self.conditioner.trainable else None
        self.checkpoint_step = -1

    def _check_image_size(self, size: int, key: str, error: type[Exception]) -> int:
        """`size` if the autoencoder and UNet downsampling both divide it, else `error` naming `key`."""
        factor = self.autoencoder.downsample_factor * self.unet.downsampling_factor
        if size % factor:
            raise error(f"{key}={size} must be divisible by {factor} (autoencoder factor "
                        f"{self.autoencoder.downsample_factor} x UNet factor {self.unet.downsampling_factor})")
        return size

    # ------------------------------------------------------------------ autoencoder (frozen, fp32)

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.autoencoder.eval()  # note: frozen means no dropout either
        return self

    def on_fit_start(self) -> None:
        self.autoencoder.float()  # "-true" precisions cast every module; the autoencoder always runs in fp32

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H / f, W / f), fp32."""
        with torch.autocast(images.device.type, enabled=False):
            posterior = self.autoencoder.encode(images.float())
            z = posterior.sample(generator) if self.config.sample_posterior else posterior.mode()
        return z * self.latent_scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W), fp32, clamped to [-1, 1]."""
        with torch.autocast(z.device.type, enabled=False):
            return self.autoencoder.decode(z.float() / self.latent_scale).clamp(-1, 1)

    # ------------------------------------------------------------------ training

    def _conditions(self, batch: dict[str, Any]) -> Any:
        """The raw conditions the conditioner takes: captions, class labels, or None."""
        kind = self.conditioner.kind
        if kind == "class":
            return batch[self.config.label_key]
        if kind == "none":
            return None
        return list(batch[self.config.caption_key])

    def _loss(self, batch: dict[str, Any], generator: torch.Generator, unet: nn.Module,
              conditioner: nn.Module) -> torch.Tensor:
        x = batch[self.config.image_key]                                        # (B, 3, H, W)
        z0 = self.encode(x, generator)                                          # (B, C, h, w)
        cond = conditioner(self._conditions(batch), generator=generator)        # condition dropout in train mode
        return diffusion_loss(lambda x_t, t: unet(x_t, t, **cond), z0, self.schedule, self.config.diffusion,
                              generator).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        micro = self.global_step * accumulate + batch_idx % accumulate         # distinct draws per micro-batch
        generator = step_generator(self.config.seed, self.global_rank, micro, self.device)
        loss = self._loss(batch, generator, self.unet, self.conditioner)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=len(batch[self.config.image_key]))
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # note: the EMA follows each optimizer step here rather than in on_train_batch_end, which Lightning calls after
        # the callbacks' (ModelCheckpoint's) batch-end hooks: a checkpoint would miss its own step's update.
        if self.ema is not None:
            self.ema.update_parameters(self.unet)
        if self.ema_conditioner is not None:
            self.ema_conditioner.update_parameters(self.conditioner)

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.config
        params = [p for p in self.unet.parameters()] + [p for p in self.conditioner.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)
        rank_zero_info(f"AdamW lr {c.lr} (warmup {c.warmup_steps} steps, then {c.lr_schedule}), "
                       f"{sum(p.numel() for p in params):,} trainable parameters "
                       f"(UNet {sum(p.numel() for p in self.unet.parameters()):,}; "
                       f"conditioner {'trainable' if self.conditioner.trainable else 'frozen'})")
        schedule = lr_scheduler(optimizer, c.lr_schedule, c.warmup_steps, self.trainer.estimated_stepping_batches)
        scheduler = {"scheduler": schedule, "interval": "step", "name": "lr"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------ validation and sampling

    def networks(self, use_ema: bool = True) -> tuple[nn.Module, nn.Module]:
        """(UNet, conditioner) to evaluate: the EMA copies when asked for and kept, else the trained ones."""
        unet = self.ema.module if use_ema and self.ema is not None else self.unet
        conditioner = (self.ema_conditioner.module if use_ema and self.ema_conditioner is not None
                       else self.conditioner)
        return unet, conditioner

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Fixed draws per batch (negative "steps" stay apart from training's), so val/loss is comparable over time.
        generator = step_generator(self.config.seed, self.global_rank, -1 - batch_idx, self.device)
        unet, conditioner = self.networks(self.config.val_use_ema)
        loss = self._loss(batch, generator, unet, conditioner)
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=len(batch[self.config.image_key]))

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Samples for the fixed `val_prompts` (or the batch's first captions) and seeds, in [-1, 1]."""
        c = self.config
        n = min(c.val_num_images, len(batch[c.image_key]))
        prompts, labels = list(c.val_prompts), c.val_class_labels
        if self.conditioner.kind == "class":
            labels = labels if labels is not None else [int(v) for v in self._conditions(batch)[:n]]
            prompts = [""] * len(labels)
        elif not prompts:
            prompts = list(batch[c.caption_key][:n]) if self.conditioner.kind != "none" else [""] * n
        samples = self.generate(prompts, [c.val_seed + i for i in range(len(prompts))], sampler=c.val_sampler,
                                num_steps=c.val_num_steps, guidance_scale=c.val_guidance_scale,
                                use_ema=c.val_use_ema, class_labels=labels)
        return {"samples": samples}

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], sampler: str = "ddim", num_steps: int = 50,
                 guidance_scale: float = 5.0, use_ema: bool = True, class_labels: list[int] | None = None,
                 eta: float = 0.0, image_size: int | None = None) -> torch.Tensor:
        """Generate one image per (prompt, seed): (B, 3, H, W) in [-1, 1].

        Args:
            prompts: B prompts (ignored by class-conditional and unconditional models).
            seeds: B seeds; image b's noise comes from its own generator, so it never depends on the batch.
            sampler: ddpm | ddim | dpmpp_2m.
            num_steps: sampler steps, spaced by the schedule's timestep_spacing.
            guidance_scale: classifier-free guidance; 1 runs the conditional model alone.
            use_ema: sample with the EMA weights when the model keeps them.
            class_labels: B labels for class-conditional models.
            eta: DDIM's noise scale.
            image_size: output side in pixels; None: the training size.
        """
        B = len(seeds)
        if self.conditioner.kind == "class":
            if class_labels is None or len(class_labels) != B:
                raise ValueError(f"a class-conditional model needs {B} class_labels; got {class_labels}")
            conds: Any = torch.as_tensor(class_labels, dtype=torch.long, device=self.device)
        else:
            if len(prompts) != B:
                raise ValueError(f"{len(prompts)} prompts for {B} seeds; give one seed per prompt")
            conds = list(prompts) if self.conditioner.kind != "none" else None
        size = self._check_image_size(image_size or self.image_size, "image_size", ValueError)

        unet, conditioner = self.networks(use_ema)
        was_training = conditioner.training
        conditioner.eval()  # no condition dropout while sampling
        cond = conditioner(conds)
        uncond = conditioner.unconditional(B, self.device) if guidance_scale != 1.0 else None
        conditioner.train(was_training)

        rng = StackedRandomGenerator(seeds, self.device)
        f = self.autoencoder.downsample_factor
        x = rng.randn((B, self.unet.config.in_channels, size // f, size // f))  # (B, C, h, w)
        model = guided_denoiser(lambda x_t, t, c: unet(x_t, t, **c), cond, uncond, guidance_scale)
        denoiser = Denoiser(model, self.schedule, self.config.diffusion.prediction)
        z = run_sampler(sampler, denoiser, x, self.schedule.timesteps(num_steps), rng, eta=eta)
        return self.decode(z)                                                   # (B, 3, H, W)

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["module_class"] = f"{type(self).__module__}.{type(self).__qualname__}"

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.checkpoint_step = int(checkpoint.get("global_step", -1))

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> LatentDiffusionModule:
        """A module restored from a checkpoint alone (autoencoder included), in eval mode."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        module = cls.load_from_checkpoint(str(path), map_location=map_location)
        return module.eval()
