"""Stage 2: trains a `LatentDiffusionPipeline` (frozen autoencoder, UNet, conditioner) with Lightning.

Training glue only: the pipeline (`ldm.pipeline`) owns the loss and sampling; this module adds the training step and
its generator, the optimizer and LR schedule, the EMA, logging, validation samples, and the export of the EMA
pipeline to `<run>/export` at the end of fit. The frozen autoencoder's weights, config and latent scale are part of
every checkpoint, so a `.ckpt` alone is enough to sample (`LatentDiffusionPipeline.from_pretrained(ckpt)`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import wrap

from ldm.callbacks.checkpoint import stopped_without_export
from ldm.checkpoints import MissingCheckpointError, upgrade_layout
from ldm.conditioning import ConditionerConfig, TextConditioner, build_conditioner, class_settings, text_encoder_config
from ldm.config import ConfigError, asdict, batch_entry, check_choice, check_min, check_required, to_dataclass
from ldm.convert import load_autoencoder_any
from ldm.data.shardlist import absolute_spec
from ldm.diffusion import SAMPLERS
from ldm.diffusion.objective import DiffusionConfig, check_ignored_settings
from ldm.diffusion.parameterization import PREDICTIONS
from ldm.io import absolute_if_local
from ldm.modules.ema import make_ema, whole
from ldm.modules.optim import adam, check_optimizer_config, clip_gradients, lr_scheduler, stepped
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution
from ldm.nn.unet import UNet, UNetConfig
from ldm.pipeline import LatentDiffusionPipeline
from ldm.seeding import check_seeds, step_generator

REQUIRED_HINTS = {
    "init_from": "a Stable Diffusion diffusers pipeline folder or single file, e.g. "
                 "model.init_from=/models/stable-diffusion-v1-5",
    "autoencoder_path": "stage 1's export, or a Stable Diffusion VAE (diffusers vae/ or pipeline folder, or a single "
                        "file), e.g. model.autoencoder_path=/models/sd-vae-ft-mse",
}


@dataclass
class Config:
    autoencoder_path: str | None = None    # stage 1's export directory, run directory or .ckpt, a stage-2 export or
    #                                        .ckpt (its autoencoder), or a Stable Diffusion VAE: diffusers vae/ or
    #                                        pipeline folder, or single file; null: init_from's
    init_from: str | None = None           # a Stable Diffusion diffusers pipeline folder or single file: its UNet
    #                                        (layout and weights), schedule, prediction and CLIP text encoder replace
    #                                        unet.*, diffusion.schedule / prediction and conditioner.* (printed)
    init_prediction: str | None = None     # what init_from's UNet predicts (eps | v | x0), for an SD 2.x single file
    #                                        that does not record it (768-px models: v; 512-px base: eps); null: the
    #                                        file's metadata, its .yaml, or eps for SD 1.x
    init_ema: bool = False                 # init_from a single file: its UNet's EMA weights (model_ema.*, as in
    #                                        v1-5-pruned.ckpt) instead of the training weights diffusers takes
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
    lr_schedule: str = "constant"          # after warmup: constant | cosine | linear (to 0 at the last step) | wsd
    lr_decay_steps: int = 0                # wsd: a linear decay to 0 over the last lr_decay_steps
    ema_decay: float | None = 0.9999       # EMA of the UNet (and a trainable text encoder); null: off
    ema_warmup: bool = True                # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (EMAModel's)
    image_key: str = "image"               # batch keys: images (B, 3, H, W) in [-1, 1], captions, class labels
    caption_key: str = "caption"
    label_key: str = "label"
    # Validation samples (log_images): prompt i uses seed val_seed + i, so every grid is comparable.
    val_prompts: list[str] = field(default_factory=list)  # text models; empty: the first captions of the val batch
    val_class_labels: list[int] | None = None  # class models, in [0, num_classes]; null: the val batch's first labels
    val_num_images: int = 8                # images when neither is given (and of an unconditional model)
    val_seed: int = 0
    val_sampler: str = "ddim"
    val_num_steps: int = 50
    val_guidance_scale: float = 5.0
    val_use_ema: bool = True               # EMA weights for val/loss and samples

    def __post_init__(self) -> None:
        check_choice("val_sampler", self.val_sampler, SAMPLERS)
        check_min(0, val_guidance_scale=self.val_guidance_scale)  # 1.0: the conditional model alone
        check_optimizer_config(self)
        if self.init_prediction is not None:
            check_choice("init_prediction", self.init_prediction, PREDICTIONS)
        check_required(self, REQUIRED_HINTS)
        check_seeds("model.val_seed", self.val_seed,
                    max(len(self.val_prompts), len(self.val_class_labels or []), self.val_num_images))
        if not self.autoencoder_path and not self.init_from:
            raise ConfigError("model.autoencoder_path is required: stage 1's export directory (<vae run>/export), "
                              "run directory or checkpoint, or a Stable Diffusion VAE, e.g. "
                              "model.autoencoder_path=runs/vae/export (or set model.init_from to a Stable Diffusion "
                              "model, whose VAE is then used)")
        if self.latent_scale is not None and self.latent_scale <= 0:
            raise ConfigError(f"latent_scale={self.latent_scale} must be > 0 or null")
        check_min(1, val_num_images=self.val_num_images)
        if self.val_class_labels is not None:
            kind, n = self.conditioner.kind, self.conditioner.num_classes
            if kind != "class":
                raise ConfigError(f"model.val_class_labels={self.val_class_labels} is for class-conditional models; "
                                  f"this one is model.conditioner.kind={kind}: leave it null")
            bad = [label for label in self.val_class_labels if not 0 <= label <= n]
            if bad or not self.val_class_labels:
                raise ConfigError(f"model.val_class_labels={self.val_class_labels}: give at least one label, each in "
                                  f"[0, {n}] (model.conditioner.num_classes={n}; {n}: the null class)")


# The spread of the first batch's scaled latents outside which a run is warned of its latent scale (1 is the aim).
LATENT_STD_RANGE = (1 / 3, 3.0)


def resolve_latent_scale(explicit: float | None, stats: dict[str, Any] | None, source: str) -> tuple[float, str]:
    """The latent scale and where it came from: explicit value first, then stage 1's measured `scale_factor`."""
    if explicit is not None:
        return float(explicit), "model.latent_scale"
    if stats and stats.get("scale_factor"):
        # stage 1's statistics, or the scale a Stable Diffusion VAE states (kept by a stage 1 that froze its encoder)
        measured = "global_std" in stats and not stats.get("scale_factor_from")
        scale = float(stats["scale_factor"])
        if not math.isfinite(scale) or scale <= 0:  # a stage 1 whose latents collapsed or blew up, or a damaged file
            raise ConfigError(f"the latent scale of {source} is {scale}, not a positive finite number: set "
                              f"model.latent_scale, or retrain stage 1")
        return scale, (f"1 / std of the latent statistics of {source}" if measured else
                       f"the scaling factor of {stats.get('scale_factor_from') or source}")
    raise ConfigError(f"no latent scale: {source} holds no latent statistics (they are measured in stage 1's "
                      f"validation) and model.latent_scale is null. Set model.latent_scale explicitly (SD's KL-f8: "
                      f"0.18215) or point model.autoencoder_path at an autoencoder that has latent_stats.json")


def with_absolute_paths(config: Config) -> Config:
    """`config` with the local files and folders it names (autoencoder_path, init_from, the text encoder's and its
    tokenizer's) as absolute paths, as the run's hyperparameters record them: a checkpoint re-reads a CLIP tokenizer
    from where the run found it, and ldm-sample, ldm-eval or ldm-export may run from another directory. Hub names
    (and paths that do not exist) stay as given."""
    c = config
    conditioner = dataclasses.replace(c.conditioner, name_or_path=absolute_if_local(c.conditioner.name_or_path),
                                      tokenizer=absolute_if_local(c.conditioner.tokenizer))
    return dataclasses.replace(c, autoencoder_path=absolute_if_local(c.autoencoder_path),
                               init_from=absolute_if_local(c.init_from), conditioner=conditioner)


def conditioner_for(unet: UNetConfig) -> str:
    """What to set so that model.conditioner gives an imported UNet without its text encoder what it takes."""
    if unet.context_dim is None and unet.pooled_dim is not None:  # a pooled vector comes with a text context
        return (f"no kind of model.conditioner gives a pooled vector {unet.pooled_dim} wide without a context: train "
                f"it anew instead")
    if unet.context_dim is None:
        return (f"set model.conditioner.kind=class model.conditioner.class_embed=unet "
                f"model.conditioner.num_classes={unet.num_classes}" if unet.num_classes is not None else
                "set model.conditioner.kind=none")
    width = unet.context_dim
    if unet.num_classes is not None or unet.pooled_dim not in (None, width):
        also = "class labels" if unet.num_classes is not None else f"a pooled vector {unet.pooled_dim} wide"
        return f"no kind of model.conditioner gives both a context {width} wide and {also}: train it anew instead"
    text = (f"a text encoder {width} wide (kind=byte with model.conditioner.width={width} and name_or_path its export, "
            f"or kind=clip with a CLIP of hidden size {width} as name_or_path)")
    if unet.pooled_dim is not None:
        return f"set {text} with model.conditioner.pooled=true"
    return (f"set model.conditioner.kind=class model.conditioner.width={width} (class labels as one context token), "
            f"or {text}")


def adopt_pretrained(config: Config) -> tuple[Any, Config]:
    """Read the Stable Diffusion model `config.init_from` names and return it with the config its layout implies:
    its UNet config, schedule and prediction type, and a frozen (unless `conditioner.trainable`) CLIP text encoder
    with the layer it was trained on replace what the composed config held; every replaced key is printed."""
    from ldm.convert import load_components

    c = config
    folder = Path(c.init_from).expanduser().is_dir()
    pipeline = Path(c.init_from).expanduser().resolve().parent
    if folder and (pipeline / "model_index.json").is_file():  # its unet/, text_encoder/...: one part, no scheduler
        raise ConfigError(f"model.init_from={c.init_from} is the {Path(c.init_from).name}/ folder of the diffusers "
                          f"pipeline {pipeline}: set model.init_from={pipeline}")
    if folder and (c.init_ema or c.init_prediction is not None):
        raise ConfigError(f"model.init_from={c.init_from} is a folder, whose scheduler/ says what its UNet predicts "
                          f"and whose UNet holds one set of weights: model.init_prediction and model.init_ema are for "
                          f"single files; leave them unset")
    parts = load_components(c.init_from, tokenizer_path=c.conditioner.tokenizer, prediction=c.init_prediction,
                            use_ema=c.init_ema, key="model.init_from", tokenizer_key="model.conditioner.tokenizer")
    if parts.unet_state is None:
        raise ConfigError(f"model.init_from={c.init_from} holds no UNet ({parts.source}); give a diffusers pipeline "
                          f"folder or a Stable Diffusion single file (a VAE alone goes to model.autoencoder_path)")
    if parts.prediction is None and folder:
        raise ConfigError(f"model.init_from={c.init_from} has no scheduler/scheduler_config.json, which says what its "
                          f"UNet predicts and its noise schedule: restore it from the model's release")
    if parts.prediction is None:
        raise ConfigError(f"model.init_from={c.init_from} is an SD 2.x file that does not record what its UNet "
                          f"predicts: set model.init_prediction=v for 768-px models (e.g. v2-1_768-ema-pruned) or eps "
                          f"for 512-px base models, or put the model's LDM config beside it as "
                          f"{Path(c.init_from).stem}.yaml")
    if "text_encoder" in parts.lost:
        raise ConfigError(f"model.init_from={c.init_from}: its model_index.json lists a text encoder, but the folder "
                          f"has no text_encoder/: restore it from the model's release")
    if parts.autoencoder_state is None and not c.autoencoder_path:
        raise ConfigError(f"model.init_from={c.init_from} holds no autoencoder; set model.autoencoder_path")
    conditioner = c.conditioner
    if parts.text_encoder is not None and parts.unet_config.num_classes is not None:
        raise ConfigError(f"model.init_from={c.init_from}: its UNet takes class labels (a class embedding "
                          f"table) beside the CLIP text encoder's tokens, and a conditioner gives one or the other: "
                          f"start from a model without class embeddings")
    pooled_dim = parts.unet_config.pooled_dim
    if parts.text_encoder is not None and pooled_dim not in (None, parts.text_encoder.config.hidden_size):
        raise ConfigError(f"model.init_from={c.init_from}: its UNet's class embedding projects a vector of width "
                          f"{pooled_dim} (class_embed_type: projection), and its CLIP text encoder's pooled prompt "
                          f"vector is {parts.text_encoder.config.hidden_size} wide: it takes other inputs than "
                          f"prompts, which a conditioner cannot give; start from another model")
    new_conditioner = ((conditioner.kind == "class" and parts.unet_config.num_classes is None)  # (else the UNet's)
                       or (conditioner.kind == "byte" and not conditioner.name_or_path))
    if parts.text_encoder is None and new_conditioner and parts.unet_config.context_dim is not None:
        what = "class embeddings" if conditioner.kind == "class" else "byte text encoder (name_or_path null)"
        rank_zero_warn(f"model.init_from={c.init_from} holds the UNet but no conditioner (ldm-export's diffusers "
                       f"and single-file layouts keep a CLIP text encoder only): model.conditioner starts as new "
                       f"{what}, random, and the UNet learns its context anew; for a byte encoder pretrained apart, "
                       f"set model.conditioner.name_or_path to its export")
    settings = class_settings(conditioner)
    if parts.text_encoder is not None and (conditioner.kind in ("class", "none") or settings):
        given = f"kind={conditioner.kind}" if conditioner.kind in ("class", "none") else \
            ", ".join(f"{k}={v}" for k, v in settings.items())
        raise ConfigError(f"model.init_from={c.init_from} holds a text-to-image model, whose CLIP text encoder becomes "
                          f"model.conditioner: model.conditioner.{given} cannot apply; leave model.conditioner.kind "
                          f"(and num_classes, class_embed) out")
    if parts.text_encoder is not None:  # prompts as long as the model's (SD: 77, the encoder's positions)
        # a UNet with a pooled-vector projection (class_embed_type: projection, as ldm-export writes
        # model.unet.pooled_dim) takes the CLIP's pooled prompt vector, as it was trained on. The layer stays the
        # config's: the import ends on the layer its UNet was trained on, so that penultimate is "CLIP skip", as
        # with the model as model.conditioner.name_or_path
        conditioner = dataclasses.replace(conditioner, kind="clip", name_or_path=str(c.init_from),
                                          max_length=parts.prompt_length, pooled=pooled_dim is not None)
    if c.init_prediction == "eps" and parts.schedule is not None and parts.schedule.zero_terminal_snr:
        raise ConfigError(f"model.init_prediction=eps: model.init_from={c.init_from} has a zero-terminal-SNR "
                          f"schedule, at whose last step the noise says nothing of the image, so that no UNet can "
                          f"predict eps there; set model.init_prediction=v, or leave it unset")
    diffusion = dataclasses.replace(c.diffusion, schedule=parts.schedule or c.diffusion.schedule,
                                    prediction=parts.prediction or c.diffusion.prediction)
    # the layout is the checkpoint's; how it trains (checkpointing, dropout) stays the config's
    unet = dataclasses.replace(parts.unet_config, gradient_checkpointing=c.unet.gradient_checkpointing,
                               dropout=c.unet.dropout)
    new = dataclasses.replace(c, unet=unet, conditioner=conditioner, diffusion=diffusion)

    def keys(old: Any, value: Any) -> str:  # a node's keys that differ: ` (model_channels, channel_mult)`
        if not dataclasses.is_dataclass(old):
            return ""
        differ = [f.name for f in dataclasses.fields(old) if getattr(old, f.name) != getattr(value, f.name)]
        return f" ({', '.join(differ)})"

    replaced = [f"model.{name}{keys(old, value)}" for name, old, value in (
        ("unet", c.unet, new.unet), ("conditioner", c.conditioner, new.conditioner),
        ("diffusion.schedule", c.diffusion.schedule, new.diffusion.schedule),
        ("diffusion.prediction", c.diffusion.prediction, new.diffusion.prediction)) if old != value]
    encoder = f", CLIP text encoder ({conditioner.layer} layer)" if parts.text_encoder is not None else ""
    rank_zero_info(f"model.init_from={c.init_from} ({parts.source}): UNet "
                   f"{sum(v.numel() for v in parts.unet_state.values()):,} parameters{encoder}"
                   f"; replaced {', '.join(replaced) or 'nothing (the config already matched)'}")
    return parts, new


class LatentDiffusionModule(L.LightningModule):
    """Trains `self.pipeline`: the training step and its generator, AdamW and the LR schedule, the EMA, logging and
    validation samples; the export of the EMA pipeline at the end of fit.

    Args:
        config: see `Config`; built from `model.*` by `ldm.config.instantiate`.
        frozen: what a checkpoint restores instead of reading `autoencoder_path` (autoencoder config, latent scale);
            Lightning passes it back from the saved hyperparameters in `load_from_checkpoint`. A checkpoint also
            holds a pretrained byte encoder's weights, so restoring reads no `conditioner.name_or_path` either.
    """

    Config = Config
    fsdp_shards = True  # trainer=fsdp may run over several processes: `configure_model` shards the UNet

    def __init__(self, config: Config | dict[str, Any], frozen: dict[str, Any] | None = None):
        super().__init__()
        config = to_dataclass(Config, config, "model")  # a dict when rebuilt by `load_from_checkpoint`

        # Frozen autoencoder: from stage 1 (or a Stable Diffusion VAE), or (when restoring a checkpoint) empty,
        # filled by the state dict. A Stable Diffusion model in init_from replaces the UNet, schedule and conditioner.
        restoring = frozen is not None
        self.autoencoder_loaded = not restoring  # read from its path (not rebuilt empty for a checkpoint's weights)
        pretrained = None
        if not restoring:
            check_ignored_settings(config.diffusion)
            config = with_absolute_paths(config)
            if config.init_from:
                pretrained, config = adopt_pretrained(config)
            if config.autoencoder_path:
                autoencoder, stats, where = load_autoencoder_any(config.autoencoder_path)
            else:
                autoencoder = pretrained.build_autoencoder()
                stats, where = {"scale_factor": pretrained.latent_scale}, pretrained.source
            scale, source = resolve_latent_scale(config.latent_scale, stats, where)
            frozen = {"autoencoder_config": asdict(autoencoder.config), "latent_scale": scale,
                      "latent_scale_source": source, "autoencoder_path": str(config.autoencoder_path or where)}
            rank_zero_info(f"latent scale {scale:.5g} ({source})")
        else:
            autoencoder = AutoencoderKL(AutoencoderConfig(**frozen["autoencoder_config"]))
        if pretrained is not None and pretrained.text_encoder is not None:
            conditioner = TextConditioner(pretrained.build_text_encoder(config.conditioner.max_length,
                                                                        config.conditioner.trainable,
                                                                        config.conditioner.layer),
                                          "clip", config.conditioner.cond_drop_prob, config.conditioner.pooled)
        else:
            conditioner = build_conditioner(config.conditioner, load_pretrained=not restoring,
                                            text_encoder_config=frozen.get("text_encoder_config"))
            keys = ("context_dim", "num_classes", "pooled_dim")
            if pretrained is not None and any(getattr(conditioner, k) != getattr(config.unet, k) for k in keys):
                takes = ", ".join(f"{k}={getattr(config.unet, k)}" for k in keys)
                gives = ", ".join(f"{k}={getattr(conditioner, k)}" for k in keys)
                raise ConfigError(f"model.init_from={config.init_from} holds no text encoder, and its UNet ({takes}) "
                                  f"does not take what model.conditioner (kind={config.conditioner.kind}) gives "
                                  f"({gives}): {conditioner_for(config.unet)}")
        if not restoring:  # a checkpoint rebuilds a CLIP / hf encoder from this config, its weights from the state
            frozen["text_encoder_config"] = text_encoder_config(conditioner)  # dict, not from name_or_path
            if config.val_prompts and not conditioner.uses_prompts:
                instead = "model.val_class_labels" if conditioner.reads_labels else "model.val_num_images"
                rank_zero_warn(f"model.val_prompts is ignored: this model (model.conditioner.kind="
                               f"{config.conditioner.kind}) reads no prompts; its validation grids take {instead}")
        self.config = config
        self.save_hyperparameters({"config": asdict(config), "frozen": frozen}, logger=False)
        unet = UNet(config.unet)
        if pretrained is not None:
            unet.load_state_dict(pretrained.unet_state)
        self.pipeline = LatentDiffusionPipeline(autoencoder, frozen["latent_scale"], unet, conditioner,
                                                config.conditioner, config.diffusion, config.image_size,
                                                config.sample_posterior)
        self.pipeline.schedule.check_num_steps(config.val_num_steps, "model.val_num_steps")  # the final schedule

        # EMA of everything that trains.
        decay = config.ema_decay
        self.ema = make_ema(self.pipeline.unet, decay, config.ema_warmup) if decay is not None else None
        self.ema_conditioner = make_ema(conditioner, decay, config.ema_warmup) if decay and conditioner.trainable \
            else None
        self._micro_losses: list[torch.Tensor] = []  # the losses of the current optimizer step's micro-batches

    @classmethod
    def check_files(cls, config: Config) -> None:
        """Fail before anything is built or printed when a path the model reads does not exist (`ldm-train` calls
        it at start)."""
        expected = {"autoencoder_path": "stage 1's export (<vae run>/export) or checkpoint, a diffusers vae/ or "
                                        "pipeline folder, or a Stable Diffusion single file",
                    "init_from": "a Stable Diffusion diffusers pipeline folder or single file"}
        for key, what in expected.items():
            path = getattr(config, key)
            if path and not Path(path).expanduser().exists():
                raise MissingCheckpointError(f"model.{key}={path} does not exist; point it at {what}")

    def eval_pipeline(self, use_ema: bool = True) -> LatentDiffusionPipeline:
        """The pipeline to evaluate: with the EMA UNet (and conditioner) when asked for and kept."""
        if not use_ema or self.ema is None:
            return self.pipeline
        conditioner = self.ema_conditioner.module if self.ema_conditioner is not None else None
        pipeline = self.pipeline.replace(unet=self.ema.module, conditioner=conditioner)
        pipeline.provenance["weights"] = "ema"  # what its save_pretrained records
        return pipeline

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if self.pipeline.conditioner.reads_labels and hasattr(datamodule, "num_classes"):
            # before its loaders: unlabelled samples, and labels outside the model's classes, are skipped and counted
            datamodule.num_classes = self.pipeline.conditioner.null_class

    def check_data(self, datamodule: Any) -> None:
        """Refuse shards of class folders without captions for a model conditioned on prompts, and a data.resolution
        that the networks cannot divide, or that differs from the size the model generates at while model.image_size
        leaves that size implied (`ldm-train` calls it before anything is written; `on_fit_start` for any fit)."""
        conditioner = self.pipeline.conditioner
        classes = datamodule.uncaptioned_classes() if hasattr(datamodule, "uncaptioned_classes") else None
        if conditioner.uses_prompts and classes:
            c = self.config  # what a model without text also changes: the pooled prompt vector's switches
            pooled = " model.conditioner.pooled=false" * bool(c.conditioner.pooled) + \
                " model.unet.pooled_dim=null" * (c.unet.pooled_dim is not None)
            raise ConfigError(f"data.train_shards hold class-labelled images without any caption (ldm-data "
                              f"labels=folders, {len(classes)} classes), but this model is conditioned on prompts "
                              f"(model.conditioner.kind={conditioner.kind}) and would learn from empty ones "
                              f"alone: train a class-conditional model, model.conditioner.kind=class "
                              f"model.conditioner.num_classes={len(classes)}{pooled}, or an unconditional one, "
                              f"model.conditioner.kind=none{pooled}"
                              f"{' model.unet.context_dim=null' * (c.unet.context_dim is not None)}")
        resolution = getattr(getattr(datamodule, "config", None), "resolution", None)
        if resolution is None:
            return
        if hasattr(datamodule, "latent_manifest"):  # latent shards fix the size: their error names data.resolution
            datamodule.setup("fit")
        self.pipeline.check_image_size(resolution, "data.resolution")  # the training images' size
        if resolution != self.pipeline.image_size and self.config.image_size is None:  # the autoencoder's: a mistake
            raise ConfigError(f"{self._other_size(resolution)}; set 'model.image_size=${{data.resolution}}' (quoted "
                              f"for the shell)")

    def _other_size(self, resolution: int) -> str:
        return (f"data.resolution={resolution} but the model generates at {self.pipeline.image_size} px "
                f"(model.image_size={self.config.image_size}): its validation grids, export and ldm-sample use "
                f"another size than it trains on")

    def on_fit_start(self) -> None:
        self.check_data(self.trainer.datamodule)
        resolution = getattr(getattr(self.trainer.datamodule, "config", None), "resolution", None)
        if resolution is not None and resolution != self.pipeline.image_size:  # model.image_size sets it apart
            rank_zero_warn(f"{self._other_size(resolution)} (fine for training on crops of the generation size)")
        manifest = getattr(self.trainer.datamodule, "latent_manifest", None)
        if manifest is not None:  # latent shards: encoded by this autoencoder (and frozen text encoder), or refused
            from ldm.data.latents import check_manifest, tokens_hash, weights_hash

            conditioner, c = self.pipeline.conditioner, self.config.conditioner
            encoder = getattr(conditioner, "encoder", None)
            text_hash = weights_hash(encoder) if encoder is not None and not conditioner.trainable else None
            trains = None if not (conditioner.uses_prompts and conditioner.trainable) else \
                "model.conditioner.name_or_path is null, so a new byte encoder trains" \
                if c.kind == "byte" and not c.name_or_path else "model.conditioner.trainable=true fine-tunes it"
            settings = None if encoder is None else {
                "kind": c.kind, "name_or_path": c.name_or_path, "tokenizer": c.tokenizer,
                "layer": getattr(encoder, "layer", "last"),
                "tokens_sha256": tokens_hash(encoder) if manifest.text_encoder is not None else None,
                "max_length": encoder.max_length,  # set by model.init_from when it supplied the encoder:
                "init_from": self.config.init_from if c.name_or_path == str(self.config.init_from) else None}
            check_manifest(manifest, weights_hash(self.pipeline.autoencoder),
                           self.hparams["frozen"]["autoencoder_path"], text_encoder_hash=text_hash,
                           text_encoder_trains=trains, text_encoder=settings)

    def configure_model(self) -> None:
        """Under `trainer=fsdp`, shard the UNet (one FSDP unit: its parameters, gradients and AdamW states split over
        the processes). The frozen autoencoder and text encoder and the EMA stay whole on every rank, so the EMA
        update (from the UNet gathered after each step), the sample grids and the export read them as under DDP.

        note: Lightning's FSDP strategy moves only what FSDP wraps to the GPU (its `model_to_device` is a no-op), so
        everything else goes to the process's device here."""
        try:
            strategy = self.trainer.strategy
        except RuntimeError:  # note: `load_from_checkpoint` calls this hook too, without a trainer
            return
        if not isinstance(strategy, FSDPStrategy) or isinstance(self.pipeline.unet, FSDP):
            return
        if self.pipeline.conditioner.trainable and self.trainer.world_size > 1:
            raise ConfigError(f"trainer=fsdp over {self.trainer.world_size} processes shards the UNet alone, and a "
                              f"trainable text encoder would drift apart on each process: set "
                              f"model.conditioner.trainable=false (with a pretrained name_or_path), or use trainer=ddp")
        self.to(strategy.root_device)
        self.pipeline.unet = wrap(self.pipeline.unet)

    def compile_networks(self) -> None:
        """`compile: true` compiles the UNet (in place; state-dict keys unchanged)."""
        self.pipeline.unet.compile()
        rank_zero_info("compile: torch.compile on the UNet")

    # ------------------------------------------------------------------ training

    def _loss(self, batch: dict[str, Any], generator: torch.Generator, pipeline: LatentDiffusionPipeline,
              check_spread: bool = False) -> torch.Tensor:
        """The pipeline's loss on a batch of images, or of precomputed latents (`moments` from latent shards);
        `check_spread`: warn when the latents it trains on spread far from 1 (`_check_latent_spread`)."""
        c = self.config
        conditions = pipeline.conditioner.batch_conditions(batch, c.caption_key, c.label_key)
        z0 = pipeline.scaled_latents(self._inputs(batch), generator)
        if check_spread:
            self._check_latent_spread(z0)
        return pipeline.latent_loss(z0, conditions, generator)

    def _inputs(self, batch: dict[str, Any]) -> torch.Tensor | DiagonalGaussianDistribution:
        """A batch's images, or the posterior of its precomputed latents (`moments` from latent shards)."""
        if "moments" in batch:
            return DiagonalGaussianDistribution(batch["moments"])
        return batch_entry(batch, self.config.image_key, "model.image_key")

    def batch_size(self, batch: dict[str, Any]) -> int:
        """Samples in a batch of images or of precomputed latents."""
        return len(batch["moments"] if "moments" in batch else batch_entry(batch, self.config.image_key,
                                                                            "model.image_key"))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        accumulate = self.trainer.accumulate_grad_batches
        generator = step_generator(self.config.seed, self.global_rank, self.global_step, self.device,
                                   micro=batch_idx % accumulate)  # distinct draws per micro-batch
        loss = self._loss(batch, generator, self.pipeline, check_spread=self.global_step == 0 and batch_idx == 0)
        # The step's loss over its whole global batch: the mean of its micro-batches' on every rank (the last
        # micro-batch's alone would cover 1/accumulate of the batch).
        if batch_idx % accumulate == 0:
            self._micro_losses = []
        self._micro_losses.append(loss.detach())
        if (batch_idx + 1) % accumulate == 0 or self.trainer.is_last_batch:  # the step's last micro-batch
            # over every rank's micro-batches, as diffusers' train_text_to_image logs it (one scalar all-reduce)
            self.log("train/loss", torch.stack(self._micro_losses).mean(), prog_bar=True, on_step=True,
                     on_epoch=False, sync_dist=True, batch_size=self.batch_size(batch))
        return loss

    def _check_latent_spread(self, z: torch.Tensor) -> None:
        """Warn when the first batch's scaled latents `z` are far from unit spread: the noise schedule assumes about
        1, which the latent scale is there to give, and a wrong one (SD's 0.18215 for another autoencoder, a stand-in
        that an export of older ldm carries unmarked) trains the run at another signal-to-noise ratio unsaid. (Taken
        from the step's own latents: encoding the batch again was counted in the run's FLOPs.)"""
        std, (low, high) = float(z.std()), LATENT_STD_RANGE
        if not low <= std <= high:
            frozen = self.hparams["frozen"]
            rank_zero_warn(f"the first batch's latents, scaled by {frozen['latent_scale']:.5g} (from "
                           f"{frozen['latent_scale_source']}), have std {std:.3g} where diffusion expects about 1: "
                           f"the run trains at another signal-to-noise ratio than its schedule is made for. If that "
                           f"scale is wrong, set model.latent_scale={frozen['latent_scale'] / std:.5g} (1 / the std "
                           f"of these latents unscaled) and start again")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # note: the EMA follows each optimizer step here rather than in on_train_batch_end, which Lightning calls after
        # the callbacks' (ModelCheckpoint's) batch-end hooks: a checkpoint would miss its own step's update.
        if not stepped(optimizer):  # the NaN guard skipped it: the step changes nothing, the EMA included
            return
        if self.ema is not None:
            with whole(self.pipeline.unet) as unet:  # under FSDP: gathered from the ranks' shards
                self.ema.update_parameters(unet)
        if self.ema_conditioner is not None:  # never sharded: configure_model wraps the UNet alone
            self.ema_conditioner.update_parameters(self.pipeline.conditioner)

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint that trained with another latent scale than this run's (the autoencoder's statistics
        changed since, or `model.latent_scale` did): its UNet learnt latents of that scale. (`ldm-train` calls it
        before anything is written; `on_load_checkpoint` for any other fit.)"""
        saved = (checkpoint.get("hyper_parameters") or {}).get("frozen") or {}
        now = self.hparams["frozen"]
        state = checkpoint.get("state_dict") or {}
        prefix = "pipeline.autoencoder."
        theirs = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        ours = self.pipeline.autoencoder.state_dict()
        if theirs and self.autoencoder_loaded and (theirs.keys() != ours.keys() or
                       any(not torch.equal(theirs[k].to(v.device, v.dtype), v) for k, v in ours.items())):
            # note: a resume restores the checkpoint's autoencoder over the one model.autoencoder_path named
            from ldm.data.latents import weights_hash

            path = self.config.autoencoder_path or self.config.init_from
            raise ConfigError(f"the checkpoint's frozen autoencoder (sha256 {weights_hash(theirs)}; its run took "
                              f"the latent scale from {saved.get('latent_scale_source')}) is not the one this run "
                              f"loads from {path} (sha256 {weights_hash(ours)}): its UNet learnt the latents of the "
                              f"checkpoint's. Resume with model.autoencoder_path set to the autoencoder the run "
                              f"started with (its config.yaml records it), or start afresh in another "
                              f"paths.output_dir")
        if "latent_scale" in saved and saved["latent_scale"] != now["latent_scale"]:
            raise ConfigError(f"the checkpoint trained with latent scale {saved['latent_scale']!r} "
                              f"({saved.get('latent_scale_source')}), this run's is {now['latent_scale']!r} "
                              f"({now.get('latent_scale_source')}): resume with "
                              f"model.latent_scale={saved['latent_scale']!r}, or start afresh in another "
                              f"paths.output_dir")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """`check_resume`; the state dict of older ldm moved to today's keys (`upgrade_layout`); and a checkpoint of
        older code whose optimizer holds every parameter of a trainable text encoder, some of which are frozen now
        (`freeze_unused`: a block the conditioning leaves without gradient): their entries are dropped, the other
        parameters keep their AdamW moments."""
        upgrade_layout(checkpoint)
        self.check_resume(checkpoint)
        states = checkpoint.get("optimizer_states") or []
        if len(states) != 1 or len(states[0]["param_groups"]) != 1:
            return
        group, unet = states[0]["param_groups"][0], list(self.pipeline.unet.parameters())
        conditioner = list(self.pipeline.conditioner.parameters())
        if len(group["params"]) != len(unet) + len(conditioner) or all(p.requires_grad for p in conditioner):
            return
        saved = group["params"]
        frozen = {i for i, p in zip(saved[len(unet):], conditioner) if not p.requires_grad}
        group["params"] = [i for i in saved if i not in frozen]
        states[0]["state"] = {i: v for i, v in states[0]["state"].items() if i not in frozen}

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.config
        unet, conditioner = self.pipeline.unet, self.pipeline.conditioner
        params = list(unet.parameters()) + [p for p in conditioner.parameters() if p.requires_grad]
        optimizer = adam(torch.optim.AdamW, params, self.trainer.precision, lr=c.lr, betas=tuple(c.betas),
                         weight_decay=c.weight_decay)
        with whole(unet) as whole_unet:  # under FSDP each rank holds a shard: count the gathered UNet
            unet_size = sum(p.numel() for p in whole_unet.parameters())
        trained = unet_size + sum(p.numel() for p in conditioner.parameters() if p.requires_grad)
        rank_zero_info(f"AdamW lr {c.lr} (warmup {c.warmup_steps} steps, then {c.lr_schedule}), "
                       f"{trained:,} trainable parameters (UNet {unet_size:,}; "
                       f"conditioner {'trainable' if conditioner.trainable else 'frozen'})")
        schedule = lr_scheduler(optimizer, c.lr_schedule, c.warmup_steps, self.trainer.estimated_stepping_batches,
                                c.lr_decay_steps)
        scheduler = {"scheduler": schedule, "interval": "step", "name": "lr"}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """`trainer.gradient_clip_val` (and `_algorithm`) in every strategy and precision (`clip_gradients`)."""
        if gradient_clip_val:
            clip_gradients(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ------------------------------------------------------------------ validation and samples

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        # Fixed draws per batch (negative "steps" stay apart from training's), so val/loss is comparable over time.
        generator = step_generator(self.config.seed, self.global_rank, -1 - batch_idx, self.device)
        loss = self._loss(batch, generator, self.eval_pipeline(self.config.val_use_ema))
        self.log("val/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=self.batch_size(batch))

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Samples for the fixed `val_prompts` (text models) / `val_class_labels` (class models), or else the batch's
        first captions / labels (`val_num_images` of them; as many samples of an unconditional model), with seeds
        val_seed + i, in [-1, 1]."""
        c = self.config
        n = min(c.val_num_images, self.batch_size(batch))
        conditioner = self.pipeline.conditioner
        prompts = labels = None
        if conditioner.reads_labels:
            labels = c.val_class_labels or [int(v) for v in batch_entry(batch, c.label_key, "model.label_key")[:n]]
        elif conditioner.uses_prompts:
            prompts = list(c.val_prompts) or [str(p) for p in
                                              batch_entry(batch, c.caption_key, "model.caption_key")[:n]]
        count = len(labels if labels is not None else prompts if prompts is not None else range(n))
        samples = self.eval_pipeline(c.val_use_ema).generate(
            prompts, [c.val_seed + i for i in range(count)], sampler=c.val_sampler, num_steps=c.val_num_steps,
            guidance_scale=c.val_guidance_scale, class_labels=labels)
        return {"samples": samples}

    # ------------------------------------------------------------------ export

    def on_fit_end(self) -> None:
        """Write the EMA pipeline to `<run>/export` (what ldm-sample, ldm-eval and ldm-export take)."""
        if stopped_without_export(self.trainer):
            return
        pipeline = self.eval_pipeline(use_ema=True)
        # note: without an EMA under FSDP the UNet is sharded: every rank takes part in gathering it.
        with whole(pipeline.unet) as unet:
            if not self.trainer.is_global_zero:
                return
            datamodule_config = getattr(getattr(self.trainer, "datamodule", None), "config", None)
            val_shards = getattr(datamodule_config, "val_shards", None)  # absolute: ldm-eval may run elsewhere
            training = {"step": self.global_step, "val_shards": val_shards and absolute_spec(val_shards)}
            directory = pipeline.replace(unet=unet).save_pretrained(
                Path(self.trainer.default_root_dir) / "export", training=training)
        rank_zero_info(f"pipeline exported to {directory} (load with "
                       f"ldm.pipeline.LatentDiffusionPipeline.from_pretrained)")
