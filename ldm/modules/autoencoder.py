"""Stage 1: train the KL autoencoder (reconstruction + LPIPS + KL + patch GAN) with Lightning.

Two optimizers under manual optimization: the autoencoder's step, then the discriminator's (from `disc_start` on). The
end of each validation measures the per-channel statistics of posterior samples; they go into every checkpoint, into
`<checkpoints>/latent_stats.json` and into the export at the end of fit. Stage 2 takes its latent scale factor from
them (`scale_factor = 1 / std`, LDM's 0.18215 measured rather than copied).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torchmetrics import MeanMetric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from ldm.callbacks.checkpoint import stopped_without_export
from ldm.callbacks.step_boundary import validations_between
from ldm.checkpoints import MissingCheckpointError
from ldm.config import ConfigError, asdict, batch_entry, check_min, check_required, to_dataclass
from ldm.convert import load_autoencoder_any
from ldm.data.latents import require_images, require_resolution
from ldm.distributed import mean_over_ranks
from ldm.io import absolute_if_local, atomic_write_text
from ldm.losses.autoencoder import AutoencoderLoss, LossConfig
from ldm.losses.lpips import MIN_SIZE as LPIPS_MIN_SIZE
from ldm.modules.ema import make_ema
from ldm.modules.optim import adam, check_optimizer_config, clip_gradients, lr_scheduler, stepped
from ldm.nn.autoencoder import LATENT_STATS_NAME, AutoencoderConfig, AutoencoderKL, checkpoint_latent_stats
from ldm.seeding import step_generator


@dataclass
class Config:
    net: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    seed: int = 0                             # posterior noise: step_generator(seed, rank, step)
    lr: float = 4.5e-6                        # autoencoder learning rate, used as given (never rescaled)
    disc_lr: float | None = None              # discriminator learning rate; null: same as lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # Adam betas of both optimizers
    warmup_steps: int = 0                     # linear LR warmup of the autoencoder optimizer
    lr_schedule: str = "constant"             # after warmup: constant | cosine | linear (to 0 at the last step) | wsd
    lr_decay_steps: int = 0                   # wsd: a linear decay to 0 over the last lr_decay_steps
    grad_clip: float | None = None            # max gradient norm per optimizer; null: no clipping
    ema_decay: float | None = None            # EMA of the autoencoder; validation and export use it; null: off
    ema_warmup: bool = True                   # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (EMAModel's)
    init_posterior_logvar: float | None = None  # start quant_conv's log-variance outputs here; null: as LDM (~0)
    image_key: str = "image"                  # where a dict batch keeps its images (B, C, H, W) in [-1, 1]
    num_log_images: int = 8                   # images per grid in `log_images`
    init_from: str | None = None              # start from this autoencoder: our export / checkpoint, a diffusers vae/
    #                                           or pipeline folder, or an SD single file (a stand-alone VAE too); its
    #                                           architecture replaces model.net's (resolution, dropout stay these)
    train_encoder: bool = True                # false: the encoder (and quant_conv) stay frozen, so that latents, and
    #                                           a UNet trained on them, stay valid: SD's ft-EMA / ft-MSE VAEs tuned the
    #                                           decoder alone; needs init_from

    def __post_init__(self) -> None:
        check_optimizer_config(self)
        check_min(1, num_log_images=self.num_log_images)
        check_required(self, {"init_from": "the autoencoder to fine-tune: a diffusers vae/ or pipeline folder, a "
                                           "single file, or stage 1's export, e.g. "
                                           "model.init_from=/models/sd-vae-ft-mse"})
        if not self.train_encoder and not self.init_from:
            raise ConfigError("model.train_encoder=false keeps a pretrained encoder frozen: set model.init_from to "
                              "the autoencoder to fine-tune (e.g. model.init_from=models/sd-vae-ft-mse)")
        # (with init_from, the architecture is the pretrained one: its f is checked when it is read)
        if not self.init_from and self.net.resolution % self.net.downsample_factor:
            raise ConfigError(f"net.resolution={self.net.resolution} is not divisible by the downsampling factor "
                              f"f={self.net.downsample_factor} set by net.ch_mult={self.net.ch_mult}")
        if self.init_from and self.init_posterior_logvar is not None:
            raise ConfigError(f"model.init_posterior_logvar={self.init_posterior_logvar} would overwrite the "
                              f"pretrained posterior of model.init_from={self.init_from}: set "
                              f"model.init_posterior_logvar=null (the model config sets it for training from "
                              f"scratch)")


def adopt_pretrained(config: Config) -> tuple[Config, dict[str, torch.Tensor], float | None]:
    """`config` with the architecture of the autoencoder `config.init_from` names (its resolution and dropout kept:
    they set how it trains, not its weights), that autoencoder's weights, and its latent scale (None when it states
    none: a stand-alone VAE file)."""
    path = absolute_if_local(config.init_from)
    model, stats, source = load_autoencoder_any(path, key="model.init_from")
    net = dataclasses.replace(model.config, resolution=config.net.resolution, dropout=config.net.dropout)
    if net.resolution % net.downsample_factor:
        raise ConfigError(f"model.net.resolution={net.resolution} (data.resolution's size) is not divisible by the "
                          f"downsampling factor f={net.downsample_factor} of model.init_from={path}: train at a "
                          f"multiple of {net.downsample_factor} (data.resolution and model.net.resolution)")
    changed = {k: v for k, v in asdict(net).items() if asdict(config.net).get(k) != v}
    rank_zero_info(f"model.init_from={path} ({source}): its architecture and weights"
                   + (f" (model.net: {changed})" if changed else "")
                   + ("; the encoder stays frozen" if not config.train_encoder else ""))
    scale = (stats or {}).get("scale_factor")
    if scale is None and not config.train_encoder:
        rank_zero_warn(f"model.init_from={path} states no latent scale ({source}): the export will hold the one "
                       f"measured here, not the scale the UNets trained on its latents expect; for a published VAE "
                       f"file give its diffusers folder, which states it, or set stage 2's model.latent_scale (SD "
                       f"1/2: 0.18215, SDXL: 0.13025)")
    return dataclasses.replace(config, net=net, init_from=path), model.state_dict(), scale


class AutoencoderModule(L.LightningModule):
    """Wires the autoencoder, its loss, optimizers, EMA, metrics and latent statistics.

    Args:
        config: see `Config`; built from `model.*` by `ldm.config.instantiate`.
    """

    Config = Config
    # Each batch runs two backward passes (manual optimization): the autoencoder's leaves the discriminator without
    # gradients before disc_start, and the discriminator's always leaves the autoencoder without. DDP must look for
    # unused parameters; ldm-train sets trainer.strategy.find_unused_parameters=true for such a module.
    ddp_find_unused_parameters = True
    # What Lightning's automatic optimization would do, and this module's manual steps do their own way.
    unsupported_trainer_args = {
        "gradient_clip_val": "it optimizes manually (Lightning would stop at the first step); set model.grad_clip "
                             "(both optimizers clip inside their steps) and leave this unset",
        "accumulate_grad_batches": "it optimizes manually and every batch steps both optimizers; raise "
                                   "data.batch_size (or trainer.devices)",
    }

    def __init__(self, config: Config | dict[str, Any], initialized: bool = False):
        super().__init__()
        config = to_dataclass(Config, config, "model")  # a dict when rebuilt by `load_from_checkpoint`
        state, self.init_scale = None, None
        if config.init_from and not initialized:  # `load_from_checkpoint` (initialized) takes the checkpoint's weights
            config, state, self.init_scale = adopt_pretrained(config)
        self.config = config
        self.automatic_optimization = False
        self.save_hyperparameters({"config": asdict(config), "initialized": bool(config.init_from)}, logger=False)
        self.autoencoder = AutoencoderKL(config.net)
        if state is not None:
            self.autoencoder.load_state_dict(state)
        if not config.train_encoder:
            for network in self.frozen_networks:
                network.requires_grad_(False).eval()
        if config.init_posterior_logvar is not None:
            # note: from logvar ~ 0 (posterior std 1) the reconstruction loss lowers the log-variance by about one
            # learning rate per step, which dominates short runs; starting low skips that phase.
            with torch.no_grad():
                self.autoencoder.quant_conv.bias[config.net.embed_dim:].fill_(config.init_posterior_logvar)
        self.loss = AutoencoderLoss(config.loss)
        self.ema = make_ema(self.autoencoder, config.ema_decay, config.ema_warmup) if config.ema_decay is not None \
            else None
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0, reduction="elementwise_mean", dim=(1, 2, 3))
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_lpips = MeanMetric()
        self.latent_stats: dict[str, Any] | None = self._kept_scale()
        self._latent_moments: list[torch.Tensor] = []

    @classmethod
    def check_files(cls, config: Config) -> None:
        """Fail before anything is built when `init_from` names nothing (`ldm-train` calls it at start)."""
        if config.init_from and not Path(config.init_from).expanduser().exists():
            raise MissingCheckpointError(f"model.init_from={config.init_from} does not exist; point it at an "
                                         f"autoencoder: stage 1's export or checkpoint, a diffusers vae/ or pipeline "
                                         f"folder, or a Stable Diffusion single file")

    @property
    def frozen_networks(self) -> list[torch.nn.Module]:
        """The parts `train_encoder: false` keeps as they were: the encoder and the posterior's projection."""
        return [] if self.config.train_encoder else [self.autoencoder.encoder, self.autoencoder.quant_conv]

    def train(self, mode: bool = True) -> AutoencoderModule:
        super().train(mode)
        for network in self.frozen_networks:  # no dropout in a frozen encoder: its latents stay the pretrained ones
            network.eval()
        return self

    def compile_networks(self) -> None:
        """`compile: true` compiles the encoder, and the decoder and the discriminator unless the GAN trains (in
        place; state-dict keys unchanged). The module calls `encode` and `decode`, not the autoencoder's forward,
        which is all that compiling the autoencoder itself would have compiled.

        The GAN's adaptive weight takes two gradients through the decoder (and the discriminator) with retain_graph,
        which a compiled backward refuses (it donates its buffers): the run stopped at `disc_start`."""
        gan = self.loss.config.disc_factor > 0  # (the adaptive weight is taken then, whatever disc_weight)
        networks = {"the encoder": self.autoencoder.encoder}
        if not gan:
            networks.update({"the decoder": self.autoencoder.decoder, "the discriminator": self.loss.discriminator})
        for network in networks.values():
            network.compile()
        rank_zero_info(f"compile: torch.compile on {', '.join(networks)}"
                       + (" (the decoder and the discriminator stay eager: the GAN's adaptive weight differentiates "
                          "them twice, which a compiled backward refuses)" if gan else ""))

    @property
    def eval_model(self) -> AutoencoderKL:
        """The weights that are validated and exported: the EMA when enabled."""
        return self.ema.module if self.ema is not None else self.autoencoder

    def get_input(self, batch: Any) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] from a tensor, a (images, ...) sequence or a dict under `image_key`."""
        if isinstance(batch, dict):
            x = batch_entry(batch, self.config.image_key, "model.image_key")
        elif isinstance(batch, (list, tuple)):
            x = batch[0]
        else:
            x = batch
        return x.to(memory_format=torch.contiguous_format).float()

    def configure_optimizers(self) -> tuple[list[torch.optim.Optimizer], list[Any]]:
        c = self.config
        ae_params = [p for p in self.autoencoder.parameters() if p.requires_grad]
        if c.loss.learn_logvar:
            ae_params.append(self.loss.logvar)
        disc_params = list(self.loss.discriminator.parameters())
        precision = self.trainer.precision
        opt_ae = adam(torch.optim.Adam, ae_params, precision, lr=c.lr, betas=tuple(c.betas))
        opt_disc = adam(torch.optim.Adam, disc_params, precision, lr=c.disc_lr or c.lr, betas=tuple(c.betas))
        gan = (f"discriminator lr {c.disc_lr or c.lr}, GAN from step {c.loss.disc_start}" if c.loss.disc_factor > 0
               else "no GAN (model.loss.disc_factor=0)")
        rank_zero_info(f"autoencoder lr {c.lr}, warmup {c.warmup_steps} steps then {c.lr_schedule}, {gan}")
        schedule = lr_scheduler(opt_ae, c.lr_schedule, c.warmup_steps, self.trainer.estimated_stepping_batches,
                                c.lr_decay_steps)
        # note: the discriminator's rate is constant; its schedule, never stepped, names it for the LR monitor
        # (lr/discriminator, not Lightning's lr-Adam)
        constant = lr_scheduler(opt_disc, "constant", 0, self.trainer.estimated_stepping_batches)
        return [opt_ae, opt_disc], [{"scheduler": schedule, "interval": "step", "name": "lr/autoencoder"},
                                    {"scheduler": constant, "interval": "step", "name": "lr/discriminator"}]

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """`model.grad_clip` for either optimizer, inside its step: after Lightning unscaled fp16 gradients."""
        if self.config.grad_clip is not None:
            clip_gradients(self, optimizer, self.config.grad_clip)

    def _step_uncounted(self, optimizer: LightningOptimizer) -> None:
        """Step `optimizer` through the strategy (precision plugin, AMP scaler, `on_before_optimizer_step` hooks such
        as the NaN guard), as `LightningOptimizer.step` does, but without advancing `trainer.global_step`.

        note: under manual optimization Lightning counts every `LightningOptimizer.step` toward global_step, so two
        stepping optimizers would make max_steps, disc_start and checkpoint intervals count half-batches. The
        discriminator step goes through `Strategy.optimizer_step` (public) instead, so global_step counts batches.
        """
        self.trainer.strategy.optimizer_step(optimizer.optimizer, closure=lambda: None, model=self)

    def on_fit_start(self) -> None:
        trainer = self.trainer
        require_images(trainer.datamodule, "the autoencoder")
        self.check_data(trainer.datamodule)
        # The loader gives RGB images (every decoded file becomes 8-bit RGB): said now, not at the first step (the
        # autoencoder) or when the GAN starts (the discriminator).
        for key, channels in (("model.net.in_channels", self.config.net.in_channels),
                              ("model.net.out_channels", self.config.net.out_channels),
                              ("model.loss.disc.in_channels", self.config.loss.disc.in_channels)):
            if channels != 3:
                raise ConfigError(f"{key}={channels}: the training images are RGB (3 channels); set {key}=3")
        if self.config.loss.lpips_weight > 0 and self.config.net.resolution < LPIPS_MIN_SIZE:
            raise ConfigError(f"model.loss.lpips_weight={self.config.loss.lpips_weight}: LPIPS-VGG needs images of at "
                              f"least {LPIPS_MIN_SIZE} px, these are {self.config.net.resolution} px; set "
                              f"model.loss.lpips_weight=0 or train at data.resolution>={LPIPS_MIN_SIZE}")
        # Said now, not when the GAN starts (step disc_start, perhaps days in): the discriminator's stride-2
        # convolutions halve the image n_layers times, and its last two 4x4 convolutions need 3 pixels left.
        loss, resolution = self.config.loss, self.config.net.resolution
        layers = loss.disc.n_layers
        # (it runs from disc_start on, the validation at step max_steps included, unless disc_factor is 0)
        runs = loss.disc_factor > 0 and (trainer.max_steps < 0 or loss.disc_start <= trainer.max_steps)
        if resolution >> layers < 3 and runs:
            most = max((n for n in range(1, layers) if resolution >> n >= 3), default=0)
            raise ConfigError(f"model.loss.disc.n_layers={layers} halves the {resolution} px images to "
                              f"{resolution >> layers} px, fewer than the 3 its last convolutions need: at most "
                              f"{most} at model.net.resolution={resolution}")

    def on_train_start(self) -> None:
        # The export's latent statistics (stage 2's scale) are measured at validations: said now (Lightning knows the
        # validation schedule once the loader is set up), not after the run, when the final weights go out with an
        # earlier step's statistics, or none.
        trainer = self.trainer
        start, end = trainer.global_step, trainer.estimated_stepping_batches  # (a batch is a step in stage 1)
        if trainer.fast_dev_run or self._kept_scale() is not None or start >= end:
            return  # (the scale is the source's, whatever validations run; or a resumed run that is over trains none)
        no_data = getattr(getattr(trainer.datamodule, "config", None), "val_shards", "") is None
        measured = (self.latent_stats or {}).get("step")  # before a resume
        schedule = validations_between(trainer, start, end) if math.isfinite(end) else None
        if no_data or not trainer.limit_val_batches:
            why = "data.val_shards=null" if no_data else "trainer.limit_val_batches=0"
        elif schedule and schedule[1] is None:
            steps, which = (f"the run's {end} steps", "first") if not start else \
                (f"steps {start + 1}-{end} of this resumed run", "next")
            why = f"{steps} end before its {which} validation, at step {schedule[0]} (trainer.val_check_interval, " \
                  f"trainer.check_val_every_n_epoch)"
        else:
            if schedule and schedule[1] < end:
                rank_zero_warn(f"the run's last validation is at step {schedule[1]}, before its last step {end} "
                               f"(trainer.max_steps or max_epochs, trainer.val_check_interval, "
                               f"trainer.check_val_every_n_epoch), so the export's latent statistics (stage 2's scale) "
                               f"will be of step {schedule[1]}'s weights; end the run on a validation step")
            return
        held = "no latent statistics, and stage 2 will need model.latent_scale" if measured is None else \
            f"the latent statistics of step {measured} (measured before this resume) with the weights of step " \
            f"{end}, the scale of older weights; set model.latent_scale in stage 2, or validate at the end"
        rank_zero_warn(f"no validation runs ({why}): the export will hold {held}")

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        step = self.global_step
        x = self.get_input(batch)                                                   # (B, C, H, W)
        generator = step_generator(self.config.seed, self.global_rank, step, device=x.device)
        posterior = self.autoencoder.encode(x)                                      # (B, z, H / f, W / f)
        x_rec = self.autoencoder.decode(posterior.sample(generator))                # (B, C, H, W)

        # Autoencoder step: reconstruction + LPIPS + KL (+ adaptive-weighted GAN generator loss).
        ae_loss, log = self.loss.generator_step(x, x_rec, posterior, step, last_layer=self.autoencoder.last_layer)
        opt_ae.zero_grad(set_to_none=True)
        self.manual_backward(ae_loss)
        opt_ae.step()
        self.lr_schedulers()[0].step()
        if self.ema is not None and stepped(opt_ae):  # not after a step the NaN guard skipped
            self.ema.update_parameters(self.autoencoder)

        # Discriminator step, on the same reconstructions (detached); off before disc_start.
        d_loss, d_log = self.loss.discriminator_step(x, x_rec, step)
        if self.loss.disc_active(step):
            opt_disc.zero_grad(set_to_none=True)  # note: also drops the generator loss's gradients on D
            self.manual_backward(d_loss)
            self._step_uncounted(opt_disc)

        logged = mean_over_ranks(self.trainer, {f"train/{k}": v for k, v in {**log, **d_log}.items()})
        self.log_dict(logged, on_step=True, on_epoch=False, batch_size=x.shape[0])
        self.log("train/loss", logged["train/rec_loss"], prog_bar=True, on_step=True, on_epoch=False, logger=False,
                 batch_size=x.shape[0])

    def on_validation_epoch_start(self) -> None:
        self._latent_moments = []

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        model = self.eval_model
        x = self.get_input(batch)
        posterior = model.encode(x)
        x_rec = model.decode(posterior.mode())
        _, log = self.loss.generator_step(x, x_rec, posterior, self.global_step)
        B = x.shape[0]
        self.log_dict({f"val/{k}": log[k] for k in ("rec_loss", "nll_loss", "kl_loss")}, on_epoch=True,
                      sync_dist=True, batch_size=B)

        x01, rec01 = (x + 1) / 2, ((x_rec + 1) / 2).clamp(0, 1)
        self.val_psnr(rec01, x01)
        self.val_ssim(rec01.double(), x01.double())  # as ldm-eval: float32 cancels on flat images (1e-4 low)
        self.log("val/psnr", self.val_psnr, on_epoch=True, prog_bar=True, batch_size=B)
        self.log("val/ssim", self.val_ssim, on_epoch=True, batch_size=B)
        if self.loss.perceptual is not None:
            self.val_lpips(self.loss.perceptual(x, x_rec.clamp(-1, 1)).flatten())
            self.log("val/lpips", self.val_lpips, on_epoch=True, batch_size=B)

        # Latent statistics of posterior samples; negative "steps" keep these draws apart from training noise.
        generator = step_generator(self.config.seed, self.global_rank, -1 - batch_idx, device=x.device)
        z = posterior.sample(generator).double()                                    # (B, z, h, w)
        self._latent_moments.append(torch.stack([
            torch.full_like(z[0, :, 0, 0], z[:, 0].numel()), z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))]))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._latent_moments:
            return
        moments = self.trainer.strategy.reduce(torch.stack(self._latent_moments).sum(0), reduce_op="sum")  # (3, z)
        count, total, squares = moments
        mean = total / count
        std = (squares / count - mean.pow(2)).clamp_min(0).sqrt()
        global_mean = total.sum() / count.sum()
        global_std = (squares.sum() / count.sum() - global_mean.pow(2)).clamp_min(0).sqrt()
        self.latent_stats = {
            "mean": mean.tolist(), "std": std.tolist(),
            "global_mean": global_mean.item(), "global_std": global_std.item(),
            "scale_factor": 1.0 / max(global_std.item(), 1e-12),  # stage 2 trains on z * scale_factor
            "num_values_per_channel": int(count[0].item()), "step": int(self.global_step),
            "source": "posterior samples over the validation batches",
        }
        self.latent_stats.update(self._kept_scale() or {})
        self.log("val/latent_std", global_std.float(), rank_zero_only=True)
        if not self.trainer.fast_dev_run:  # a wiring check writes nothing into the run's checkpoints
            self._write_latent_stats()

    def _kept_scale(self) -> dict[str, Any] | None:
        """A decoder-only fine-tune's latent scale: the pretrained encoder's latents stay, and so does its scale, as
        the UNets trained on them expect; known from the start, whatever validations run. None otherwise."""
        if self.config.train_encoder or not self.init_scale:
            return None
        return {"scale_factor": float(self.init_scale), "scale_factor_from": self.config.init_from}

    def _checkpoint_dir(self) -> Path:
        callback = self.trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return Path(self.trainer.default_root_dir) / "checkpoints"

    @rank_zero_only
    def _write_latent_stats(self) -> None:
        atomic_write_text(json.dumps(self.latent_stats, indent=2), self._checkpoint_dir() / LATENT_STATS_NAME)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["autoencoder_config"] = asdict(self.config.net)
        checkpoint["latent_stats"] = self.latent_stats

    def check_data(self, datamodule: Any) -> None:
        """Refuse images of another size than the autoencoder trains at (`ldm-train` calls it before anything is
        written; `on_fit_start` for any fit)."""
        require_resolution(datamodule, "model.net.resolution", self.config.net.resolution,
                           "the export records the size the autoencoder trains at (what ldm-encode and stage 2 use); "
                           "set model.net.resolution={data}")

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose run learnt the log-variance when this one does not, or the reverse: its weights
        fit either way (`loss.logvar` is a parameter or a buffer), but its first optimizer holds one parameter more or
        less, where Lightning's restore stops with a message that names no key. (`ldm-train` calls it before anything
        is written; `on_load_checkpoint` for any other fit.)"""
        saved = (checkpoint.get("hyper_parameters") or {}).get("config") or {}
        for key, was, now, what in (
                ("loss.learn_logvar", (saved.get("loss") or {}).get("learn_logvar"), self.config.loss.learn_logvar,
                 "the log-variance or not"),
                ("train_encoder", saved.get("train_encoder"), self.config.train_encoder,
                 "the encoder's weights or not")):
            if was is not None and was != now:
                raise ConfigError(f"the checkpoint was trained with model.{key}={str(was).lower()}, this run has "
                                  f"{str(now).lower()} (its optimizer state holds {what}): resume with "
                                  f"model.{key}={str(was).lower()}, or start afresh in another paths.output_dir")
        # a decoder-only fine-tune keeps its source's latent scale, read again from model.init_from at every start:
        # another source's (or none) would replace the scale of the checkpoint's latents in its export
        stats = checkpoint.get("latent_stats") or {}  # (none: a checkpoint of older ldm before its first validation)
        kept = stats.get("scale_factor") if stats.get("scale_factor_from") else None
        now = (self._kept_scale() or {}).get("scale_factor")
        measured = kept is None and stats.get("scale_factor") is not None
        if (kept is not None and (now is None or abs(kept - now) > 1e-6 * kept)) or (measured and now is not None):
            was = f"keeps the latent scale {kept} of {stats['scale_factor_from']}" if kept is not None else \
                "measured its latent scale"
            source = f"model.init_from={self.config.init_from} states {now}" if now is not None else \
                "this run keeps no source's scale"
            raise ConfigError(f"the checkpoint {was} (its encoder's latents), {source}: resume with model.init_from "
                              f"naming the autoencoder the run started from (and the same model.train_encoder), or "
                              f"start afresh in another paths.output_dir")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_resume(checkpoint)
        try:
            ckpt_path = self.trainer.ckpt_path
        except RuntimeError:  # note: `load_from_checkpoint` calls this hook too, without a trainer
            ckpt_path = None
        self.latent_stats = (checkpoint_latent_stats(checkpoint, ckpt_path) if ckpt_path else
                             checkpoint.get("latent_stats")) or self._kept_scale()

    @rank_zero_only
    def on_fit_end(self) -> None:
        if stopped_without_export(self.trainer):
            return
        export_dir = Path(self.trainer.default_root_dir) / "export"
        stats_step = (self.latent_stats or {}).get("step")
        if stats_step != self.global_step and self._kept_scale() is None:
            stats = f"the latent statistics of step {stats_step}, from which stage 2 takes its scale" \
                if stats_step is not None else "no latent statistics: stage 2 will need model.latent_scale"
            rank_zero_warn(f"the export holds the weights of step {self.global_step} with {stats} (they are "
                           f"measured at validations)")
        self.eval_model.save_pretrained(export_dir, latent_stats=self.latent_stats)
        rank_zero_info(f"autoencoder exported to {export_dir} (load with ldm.nn.autoencoder.load_autoencoder)")

    @torch.no_grad()
    def log_images(self, batch: Any) -> dict[str, torch.Tensor]:
        """Inputs, reconstructions (posterior mode) and decoded prior samples z ~ N(0, I), each in [-1, 1]."""
        model = self.eval_model
        x = self.get_input(batch)[: self.config.num_log_images]
        posterior = model.encode(x)
        generator = torch.Generator(device=x.device).manual_seed(self.config.seed)  # same prior draws every time
        z = torch.randn(posterior.mean.shape, generator=generator, device=x.device, dtype=posterior.mean.dtype)
        return {"inputs": x, "reconstructions": model.decode(posterior.mode()).clamp(-1, 1),
                "samples": model.decode(z).clamp(-1, 1)}
