"""The latent diffusion pipeline: what a user loads to generate, and what training optimises. No Lightning here.

    pipeline = LatentDiffusionPipeline.from_pretrained("runs/ldm/export")     # or a .ckpt, or a run directory
    images = pipeline.generate(["a red circle"], seeds=[0], sampler="dpmpp_2m", num_steps=20, guidance_scale=5.0)
    pipeline.save_pretrained("my_model")                                    # config.json + model.safetensors

One object holds the frozen autoencoder and its latent scale, the denoising UNet, the conditioner, the noise schedule
and the prediction type, and owns both directions of the model, as k-diffusion's `VDenoiser` owns `loss()` and
`forward()`: `loss` (images, or the posterior moments of precomputed latents, in; the training objective out) and
`generate` (conditions and seeds in; images out). `ldm.modules.latent_diffusion.LatentDiffusionModule` trains it
(optimizer, EMA, logging, checkpoints); `ldm-sample`, `ldm-eval`, the FID callback and the notebook load it directly.

An export directory holds `config.json` (every architecture, the diffusion settings, the latent scale and where it came
from, and what training recorded: step, validation shards) and `model.safetensors`; a pretrained transformers text
encoder is written beside them with its tokenizer (`text_encoder/`). Nothing in it is pickled.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoints import (
    CheckpointError,
    MissingCheckpointError,
    checkpoint_in_folder,
    load_checkpoint,
    submodule_state,
)
from ldm.conditioning import Conditioner, ConditionerConfig, build_conditioner
from ldm.conditioning.conditioner import UNetKwargs
from ldm.config import ConfigError, is_int, to_dataclass
from ldm.diffusion import Denoiser, NoiseSchedule, guided_denoiser, run_sampler
from ldm.diffusion.objective import DiffusionConfig, diffusion_loss
from ldm.io import (
    CONFIG_NAME,
    PIPELINE_FORMAT,
    WEIGHTS_NAME,
    check_export_destination,
    check_export_weights,
    export_dir,
    export_kind,
    load_export_weights,
    read_export,
    save_export,
    trained_model_path,
)
from ldm.nn import eval_mode
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution
from ldm.nn.unet import UNet, UNetConfig
from ldm.seeding import StackedRandomGenerator, keeps_global_rng


class LatentDiffusionPipeline(nn.Module):
    """Frozen autoencoder + latent scale, UNet, conditioner and noise schedule.

    Args:
        autoencoder: the frozen stage-1 model; kept in eval mode and fp32.
        latent_scale: z * latent_scale is what diffusion sees.
        unet: the denoiser.
        conditioner: prompts or labels -> the UNet's keyword arguments.
        conditioner_config: the conditioner's config (saved with the pipeline, to rebuild it).
        diffusion: schedule, prediction type and loss settings.
        image_size: generation size in pixels; None: the autoencoder's training resolution.
        sample_posterior: train on posterior samples (LDM) or the posterior mode.
        prefix: where these settings sit in the training config, for error messages.
    """

    def __init__(self, autoencoder: AutoencoderKL, latent_scale: float, unet: UNet, conditioner: Conditioner,
                 conditioner_config: ConditionerConfig, diffusion: DiffusionConfig, image_size: int | None = None,
                 sample_posterior: bool = True, prefix: str = "model"):
        super().__init__()
        conditioner.check_unet(unet.config, prefix)
        if unet.config.in_channels != autoencoder.config.embed_dim:
            raise ConfigError(f"{prefix}.unet.in_channels={unet.config.in_channels} does not match the autoencoder's "
                              f"latent channels embed_dim={autoencoder.config.embed_dim}")
        if unet.config.output_channels != unet.config.in_channels:
            raise ConfigError(f"{prefix}.unet.out_channels={unet.config.out_channels}: the model predicts eps, v or "
                              f"x0 of the latent, {unet.config.in_channels} channels (learned variances are not "
                              f"supported); set {prefix}.unet.out_channels=null")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.latent_scale = float(latent_scale)
        self.unet = unet
        self.conditioner = conditioner
        self.conditioner_config = conditioner_config
        self.diffusion = diffusion
        self.schedule = NoiseSchedule(diffusion.schedule)
        self.sample_posterior = sample_posterior
        self.image_size = self.check_image_size(image_size or autoencoder.config.resolution, f"{prefix}.image_size")
        self.provenance: dict[str, Any] = {}   # where the weights came from: source, step, weights, val_shards

    @classmethod
    @keeps_global_rng
    def from_config(cls, config: dict[str, Any], base_dir: Path | None = None,
                    text_encoder_config: dict[str, Any] | None = None) -> LatentDiffusionPipeline:
        """A pipeline with the architecture `config` (what `config()` returns) and untrained weights, for a state dict
        to fill (a pretrained byte encoder is built empty too, and a CLIP / hf encoder when `text_encoder_config`, a
        checkpoint's record of its transformers config, is given; else it loads from name_or_path, an export's
        `text_encoder/`, which `base_dir` resolves when relative)."""
        conditioner_config = to_dataclass(ConditionerConfig, config["conditioner"], "conditioner")
        if base_dir is not None and conditioner_config.name_or_path and \
                (base_dir / conditioner_config.name_or_path).is_dir():
            conditioner_config = dataclasses.replace(conditioner_config,
                                                     name_or_path=str(base_dir / conditioner_config.name_or_path))
        return cls(autoencoder=AutoencoderKL(to_dataclass(AutoencoderConfig, config["autoencoder"], "autoencoder")),
                   latent_scale=config["latent_scale"],
                   unet=UNet(to_dataclass(UNetConfig, config["unet"], "unet")),
                   conditioner=build_conditioner(conditioner_config, "pipeline.conditioner", load_pretrained=False,
                                                 text_encoder_config=text_encoder_config),
                   conditioner_config=conditioner_config,
                   diffusion=to_dataclass(DiffusionConfig, config["diffusion"], "diffusion"),
                   image_size=config.get("image_size"), sample_posterior=config.get("sample_posterior", True),
                   prefix="pipeline")

    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the pipeline's architecture (JSON-serialisable)."""
        return {"format": PIPELINE_FORMAT, "autoencoder": dataclasses.asdict(self.autoencoder.config),
                "unet": dataclasses.asdict(self.unet.config),
                "conditioner": dataclasses.asdict(self.conditioner_config),
                "diffusion": dataclasses.asdict(self.diffusion), "latent_scale": self.latent_scale,
                "image_size": self.image_size, "sample_posterior": self.sample_posterior}

    def replace(self, unet: UNet | None = None, conditioner: Conditioner | None = None) -> LatentDiffusionPipeline:
        """The same pipeline with other UNet / conditioner weights (the EMA copies), sharing everything else."""
        pipeline = type(self)(self.autoencoder, self.latent_scale, unet or self.unet, conditioner or self.conditioner,
                              self.conditioner_config, self.diffusion, self.image_size, self.sample_posterior)
        pipeline.provenance = dict(self.provenance)
        return pipeline

    def train(self, mode: bool = True) -> LatentDiffusionPipeline:
        super().train(mode)
        self.autoencoder.eval()  # note: frozen means no dropout either
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def check_image_size(self, size: int, key: str = "image_size") -> int:
        """`size` if the autoencoder and UNet downsampling both divide it, else a ConfigError naming `key`."""
        factor = self.autoencoder.downsample_factor * self.unet.downsampling_factor
        if size < factor or size % factor:
            raise ConfigError(f"{key}={size} must be a positive multiple of {factor} (autoencoder factor "
                              f"{self.autoencoder.downsample_factor} x UNet factor {self.unet.downsampling_factor})")
        return size

    # ------------------------------------------------------------------ latents (frozen autoencoder, fp32)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H / f, W / f), fp32."""
        self.autoencoder.check_images(images)  # before the cast, which would take uint8 images of 0..255 unsaid
        with torch.autocast(images.device.type, enabled=False):
            posterior = self.autoencoder.encode(images.to(_dtype(self.autoencoder)))
            if posterior.mean.dtype != torch.float32:  # a half-precision autoencoder: its moments in fp32
                posterior = DiagonalGaussianDistribution(torch.cat([posterior.mean, posterior.logvar], 1).float())
            return self.latents(posterior, generator)

    def latents(self, posterior: DiagonalGaussianDistribution, generator: torch.Generator | None = None,
                ) -> torch.Tensor:
        """Scaled latents from a posterior: a sample drawn with `generator` (LDM) or its mode."""
        z = posterior.sample(generator) if self.sample_posterior else posterior.mode()
        return z * self.latent_scale

    def scaled_latents(self, inputs: torch.Tensor | DiagonalGaussianDistribution,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (B, C, h, w), fp32, without gradient, of images (B, 3, H, W) in [-1, 1], encoded here, or of
        the posterior of precomputed latents (`DiagonalGaussianDistribution(moments)`)."""
        if isinstance(inputs, DiagonalGaussianDistribution):
            with torch.no_grad(), torch.autocast(inputs.mean.device.type, enabled=False):
                return self.latents(inputs, generator)
        return self.encode(inputs, generator)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (B, 3, H, W), fp32, clamped to [-1, 1]."""
        with torch.autocast(z.device.type, enabled=False):
            z = (z.float() / self.latent_scale).to(_dtype(self.autoencoder))
            return self.autoencoder.decode(z).float().clamp(-1, 1)

    # ------------------------------------------------------------------ training objective

    def loss(self, inputs: torch.Tensor | DiagonalGaussianDistribution, conditions: Any,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """The mean diffusion loss of a batch.

        Args:
            inputs: images (B, 3, H, W) in [-1, 1], encoded here, or the posterior of precomputed latents
                (`DiagonalGaussianDistribution(moments)`); with the same generator both give the same loss.
            conditions: what the conditioner takes (`conditioner.batch_conditions(batch)`).
            generator: the posterior sample, condition dropout, timesteps and noise are drawn from it, in that order.
        """
        return self.latent_loss(self.scaled_latents(inputs, generator), conditions, generator)

    def latent_loss(self, z0: torch.Tensor, conditions: Any, generator: torch.Generator | None = None,
                    ) -> torch.Tensor:
        """`loss` from the batch's scaled latents (B, C, h, w) (`scaled_latents`, drawn with the same generator)."""
        cond = self.conditioner(conditions, generator=generator)                    # dropout in train mode
        return diffusion_loss(lambda x_t, t: self.unet(x_t, t, **cond), z0, self.schedule, self.diffusion,
                              generator).mean()

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def generate(self, prompts: Sequence[str] | None, seeds: Sequence[int], sampler: str = "ddim",
                 num_steps: int = 50, guidance_scale: float = 5.0, class_labels: Sequence[int] | None = None,
                 eta: float = 0.0, image_size: int | None = None,
                 negative_prompts: Sequence[str] | None = None) -> torch.Tensor:
        """Generate one image per seed: (B, 3, H, W) in [-1, 1].

        Args:
            prompts: B prompts for text-conditioned models (others ignore them).
            seeds: B seeds; image b's noise comes from its own generator, so it never depends on the batch.
            sampler: ddpm | ddim | dpmpp_2m.
            num_steps: sampler steps, spaced by the schedule's timestep_spacing.
            guidance_scale: classifier-free guidance, uncond + scale * (cond - uncond); 1 runs the conditional model
                alone, 0 the unconditional one (diffusers takes any scale <= 1 for no guidance: a scale < 1 warns).
                An unconditional model has nothing to guide by (every scale gives the same images): it runs once,
                as at 1.
            class_labels: B labels for class-conditional models (refused for any other).
            eta: DDIM's noise scale.
            image_size: output side in pixels; None: `self.image_size`.
            negative_prompts: B prompts that guidance steers away from, in place of the empty prompt (text-conditioned
                models; as diffusers' `negative_prompt`); None: the empty prompt.
        """
        prompts, negative_prompts, class_labels = (_per_seed(name, value) for name, value in (
            ("prompts", prompts), ("negative_prompts", negative_prompts), ("class_labels", class_labels)))
        for name, texts in (("prompts", prompts), ("negative_prompts", negative_prompts)):
            if texts is not None and not all(isinstance(t, str) for t in texts):
                raise TypeError(f"{name} must be strings, got {[type(t).__name__ for t in texts]}")
        seeds = _seed_list(seeds)
        B = len(seeds)
        if B == 0:
            raise ValueError("seeds is empty: give one seed per image")
        if negative_prompts is not None and len(negative_prompts) != B:
            raise ValueError(f"{len(negative_prompts)} negative_prompts for {B} seeds: give one per seed")
        for name, value in (("guidance_scale", guidance_scale), ("eta", eta)):
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
                raise TypeError(f"{name}={value!r} must be a finite number")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale={guidance_scale} must be >= 0 (1: no guidance)")
        if eta < 0:
            raise ValueError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM's noise)")
        if negative_prompts is not None and not self.conditioner.uses_prompts:
            raise ValueError("negative_prompts apply to text-conditioned models; this one reads no prompts")
        if image_size is not None and not is_int(image_size):
            raise TypeError(f"image_size={image_size!r} must be an integer number of pixels (None: {self.image_size})")
        size = self.check_image_size(self.image_size if image_size is None else image_size)
        if not self.conditioner.conditional:
            guidance_scale = 1.0  # the conditional and unconditional passes would be the same: one pass
        elif guidance_scale < 1:  # the formula's, not diffusers' (which takes any scale <= 1 for no guidance)
            away = "the negative prompts" if negative_prompts is not None else "the unconditional model"
            warnings.warn(f"guidance_scale={guidance_scale} < 1 pulls the images away from the prompts toward {away} "
                          f"(at 0 they are {away}'s alone); for the conditional model alone, as diffusers' "
                          f"guidance_scale <= 1, use 1", stacklevel=3)  # 3: past torch.no_grad's wrapper
        elif guidance_scale == 1 and negative_prompts is not None:
            warnings.warn("negative_prompts do nothing at guidance_scale=1 (the conditional model alone, no "
                          "unconditional pass): guide with a scale > 1", stacklevel=3)
        timesteps = self.schedule.timesteps(num_steps)
        if timesteps[0] < self.schedule.num_train_timesteps // 2:  # (leading / linspace spacing at one step)
            warnings.warn(f"num_steps={num_steps} with timestep_spacing={self.schedule.config.timestep_spacing} "
                          f"visits t={timesteps}: the sampler takes its starting noise for nearly clean latents and "
                          f"leaves it about as it is; take more steps, or timestep_spacing=trailing (which starts at "
                          f"t={self.schedule.num_train_timesteps - 1})", stacklevel=3)
        cond, negative = self.sampling_conditions(prompts, class_labels, negative_prompts, B)
        device = self.device
        rng = StackedRandomGenerator(seeds, device)
        f = self.autoencoder.downsample_factor
        x = rng.randn((B, self.unet.config.in_channels, size // f, size // f))      # (B, C, h, w)
        dtype = _dtype(self.unet)  # sampler arithmetic in fp32; the UNet in its own dtype (after `.to(torch.float16)`)

        def unet(x_t: torch.Tensor, t: torch.Tensor, c: UNetKwargs) -> torch.Tensor:
            c = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in c.items()}
            return self.unet(x_t.to(dtype), t, **c).float()

        def unconditional() -> UNetKwargs:  # encoded as the prompts are: in eval mode
            with eval_mode(self.conditioner):
                return self.conditioner.unconditional(B, device)

        model = guided_denoiser(unet, cond, unconditional if negative is None else negative, guidance_scale)
        denoiser = Denoiser(model, self.schedule, self.diffusion.prediction)
        with eval_mode(self.unet):  # no dropout: image b depends on seed b alone (a module in training too)
            z = run_sampler(sampler, denoiser, x, timesteps, rng, eta=eta)
        return self.decode(z)                                                       # (B, 3, H, W)

    def sampling_conditions(self, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                            negative_prompts: Sequence[str] | None, batch_size: int,
                            ) -> tuple[UNetKwargs, UNetKwargs | None]:
        """The UNet's conditioning for `generate`, and the negative prompts' (None: none given), encoded without
        condition dropout and on the UNet's device (labels that go to the UNet's own class table come from a
        conditioner without parameters, which `.to(device)` does not move)."""
        conditioner, device = self.conditioner, self.device

        def encode(conds: Any, labels: Sequence[int] | None) -> UNetKwargs:
            kwargs = conditioner(conditioner.sampling_conditions(conds, labels, batch_size))
            return {k: v if v is None else v.to(device) for k, v in kwargs.items()}

        with eval_mode(conditioner):
            cond = encode(prompts, class_labels)
            negative = None if negative_prompts is None else encode(negative_prompts, None)
        return cond, negative

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, directory: str | Path, training: dict[str, Any] | None = None) -> Path:
        """Write config.json and model.safetensors (and `text_encoder/` for a transformers encoder), atomically; a
        folder that holds a model of another kind is refused (`ldm.io.check_export_destination`).

        Args:
            directory: created if missing.
            training: what training records beside the config (step, validation shards; default: this pipeline's
                provenance's), read back as provenance. Which weights it holds ("ema" for an EMA copy, else "raw")
                is always this pipeline's own record.
        """
        directory = Path(directory)
        config = self.config()
        check_export_destination(directory, config)
        config["conditioner"].update(self.conditioner.save_external(directory))
        recorded = training or {k: v for k, v in self.provenance.items() if k in ("step", "val_shards")}
        config["training"] = {**recorded, "weights": self.provenance.get("weights", "raw")}
        return save_export(directory, config, {k: v.float() if v.is_floating_point() else v  # fp32 on disk
                                               for k, v in self.state_dict().items()
                                               if not k.startswith(self._external_weights())})

    def _external_weights(self) -> tuple[str, ...]:
        """Pipeline state-dict prefixes an export keeps outside model.safetensors (a transformers text encoder)."""
        return tuple(f"conditioner.{prefix}" for prefix in self.conditioner.external_weights())

    @classmethod
    def from_pretrained(cls, path: str | Path, use_ema: bool = True, key: str = "ckpt_path",
                        ) -> LatentDiffusionPipeline:
        """A pipeline in eval mode on the CPU from an export directory, a run directory holding `export/`, or a
        LatentDiffusionModule checkpoint (`.ckpt`; the EMA weights when kept and `use_ema`).

        Args:
            path: where the pipeline is.
            use_ema: for a checkpoint, its EMA weights rather than the raw ones (an export holds the weights it was
                exported with: false is refused for an export of EMA weights, naming the checkpoint to give instead).
            key: the config key that named `path`, for errors.
        """
        if not isinstance(use_ema, bool):  # "false" would be true
            raise TypeError(f"use_ema={use_ema!r} must be True or False")
        path = trained_model_path(path, key)
        if path.is_dir():
            pipeline = cls._from_export(export_dir(path, key), key, use_ema)
        elif path.is_file():
            pipeline = cls.from_checkpoint(load_checkpoint(path, key), str(path), use_ema, key)
        else:
            raise MissingCheckpointError(f"{key}={path} does not exist; point it at a latent diffusion export "
                                         f"directory (<run>/export), a run directory or a checkpoint "
                                         f"(<run>/checkpoints/last.ckpt)")
        return pipeline.eval().requires_grad_(False)

    @classmethod
    def _from_export(cls, directory: Path, key: str, use_ema: bool = True) -> LatentDiffusionPipeline:
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            example = checkpoint_in_folder(directory)  # a run's checkpoints/ folder, say
            raise CheckpointError(f"{key}={directory} holds no pipeline export ({CONFIG_NAME} and {WEIGHTS_NAME}); "
                                  f"give an export directory (<run>/export) or a checkpoint"
                                  + (f", e.g. {key}={example}" if example else ""))
        config, state = read_export(directory, key)
        if config.get("format") != PIPELINE_FORMAT:
            raise CheckpointError(f"{key}={directory} is not a latent diffusion pipeline export: its {CONFIG_NAME} "
                                  f"describes {export_kind(config)}")
        check_export_weights(directory, use_ema, key)
        pipeline = cls.from_config(config, base_dir=directory)
        load_export_weights(pipeline, state, directory, key, pipeline._external_weights())
        training = config.get("training") or {}
        pipeline.provenance = {"source": str(directory), "step": training.get("step", -1),
                               "weights": training.get("weights", "ema"), "val_shards": training.get("val_shards")}
        return pipeline

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], path: str, use_ema: bool = True, key: str = "ckpt_path",
                        ) -> LatentDiffusionPipeline:
        """A pipeline in eval mode from a LatentDiffusionModule checkpoint already read
        (`ldm.checkpoints.load_checkpoint`)."""
        hparams = checkpoint.get("hyper_parameters") or {}
        model, frozen = hparams.get("config"), hparams.get("frozen")
        if not isinstance(model, dict) or not isinstance(frozen, dict) or "unet" not in model:
            weights = checkpoint.get("state_dict") or {}
            what = ("an autoencoder checkpoint goes to model.autoencoder_path" if "autoencoder_config" in checkpoint
                    else "a text-image pretraining checkpoint: its run's export (<run>/export) goes to "
                         "model.conditioner.name_or_path" if any(k.startswith("text_encoder.") for k in weights)
                    else "expected a checkpoint of ldm-train's latent diffusion model")
            raise CheckpointError(f"{key}={path} is not a latent diffusion checkpoint (no UNet config in its "
                                  f"hyper_parameters); {what}")
        try:
            pipeline = cls.from_config({"autoencoder": frozen["autoencoder_config"],
                                        "latent_scale": frozen["latent_scale"],
                                        **{k: model[k] for k in ("unet", "conditioner", "diffusion")},
                                        "image_size": model.get("image_size"),
                                        "sample_posterior": model.get("sample_posterior", True)},
                                       text_encoder_config=frozen.get("text_encoder_config"))
        except ConfigError as err:
            if frozen.get("text_encoder_config") is None:
                raise
            # the checkpoint holds the text encoder's weights, not its tokenizer, which it reads where the run did
            conditioner = model["conditioner"]
            where = conditioner.get("tokenizer") or conditioner.get("name_or_path")
            raise ConfigError(f"{key}={path}: its text encoder's tokenizer is read from {where}, where the run found "
                              f"it, and cannot be loaded now ({str(err).split('. ')[0]}); give the run's export "
                              f"(<run>/export, whose text_encoder/ holds the encoder and its tokenizer), or restore "
                              f"that folder") from None
        state = checkpoint["state_dict"]
        autoencoder, _ = submodule_state(state, "pipeline.autoencoder.")
        unet, ema = submodule_state(state, "pipeline.unet.", "ema.module." if use_ema else None)
        pipeline.autoencoder.load_state_dict(autoencoder)
        pipeline.unet.load_state_dict(unet)
        if pipeline.conditioner.state_dict():  # none for unconditional models and labels embedded by the UNet
            conditioner, _ = submodule_state(state, "pipeline.conditioner.",
                                             "ema_conditioner.module." if use_ema else None)
            pipeline.conditioner.load_state_dict(conditioner)
        run = checkpoint.get("ldm") or {}
        val_shards = run.get("val_shards") or ((run.get("config") or {}).get("data") or {}).get("val_shards")
        pipeline.provenance = {"source": path, "step": int(checkpoint.get("global_step", -1)),
                               "weights": "ema" if ema else "raw", "val_shards": val_shards}
        return pipeline.eval().requires_grad_(False)  # dropout off: sampling in train mode was noisy



def _per_seed(name: str, values: Any) -> Any:
    """`values` (prompts, negative prompts or class labels: one per seed) as a list (a 1-D tensor as it is), or None;
    a lone string or number is refused."""
    if values is None or (torch.is_tensor(values) and values.ndim == 1):
        return values
    if isinstance(values, (str, bytes)) or torch.is_tensor(values) or not isinstance(values, Iterable):
        raise TypeError(f"{name}={values!r} must be a sequence, one per seed: [x] * len(seeds) for one")
    return list(values)  # once: a generator is read here, not emptied by the checks


def _seed_list(seeds: Any) -> list[int]:
    """`seeds` as ints: integers of any kind (numpy's, integer tensors) in [0, 2**63) (`StackedRandomGenerator`
    takes them modulo 2**63: a negative one would repeat another seed's images); not floats (truncated), bools or a
    lone integer."""
    try:
        items = list(seeds)
        ints = [operator.index(s) for s in items]
    except TypeError:
        ints = None
    if ints is None or any(isinstance(s, bool) or str(getattr(s, "dtype", "")) in ("bool", "torch.bool")
                           for s in items) or not all(0 <= s < 1 << 63 for s in ints):
        raise TypeError(f"seeds={seeds!r} must be a sequence of integers in [0, 2**63), one per image")
    return ints


def _dtype(module: nn.Module) -> torch.dtype:
    """The dtype of `module`'s weights (fp32 for one without parameters)."""
    return next((p.dtype for p in module.parameters()), torch.float32)
