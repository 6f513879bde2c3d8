"""Small-N FID (and CLIP score) during training, on the EMA weights, against cached reference statistics.

Every `every_n_steps` training steps the module's pipeline (`eval_pipeline`) generates `num_samples` images from the
validation captions (and class labels, for class-conditional models; sample i: prompt i, seed `seed + i`, split
across DDP ranks) and logs `val/fid_<N>` (and `val/clip_score_<N>`). The
reference statistics are the ones `ldm-eval` caches (same key: shards, resolution, count, feature extractor), so
they are computed once per data set and shared between runs and the final evaluation.

A small-N FID is biased upward and noisy: it tracks progress within a run, it is not a number to report (use
`ldm-eval` with N >= 10k for that). conf/callbacks/fid.yaml documents the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from ldm.callbacks.checkpoint import run_halted, run_stopped
from ldm.callbacks.step_boundary import StepBoundary
from ldm.callbacks.throughput import paused
from ldm.config import ConfigError, check_choice, check_min, is_int
from ldm.data.shardlist import local_shards
from ldm.diffusion import SAMPLERS
from ldm.distributed import rank_and_world
from ldm.eval.evaluator import rank_batches, require_image_shards
from ldm.eval.feature_extractors import INCEPTION_FEATURE_DIMS, InceptionFeatures, clip_loader
from ldm.eval.metrics import GenerationMetrics
from ldm.eval.reference_stats import default_cache_dir, load_or_compute_reference_stats
from ldm.eval.sources import generation_labels, load_prompts
from ldm.images import to_uint8
from ldm.nn import eval_mode
from ldm.seeding import check_seeds


class FIDCallback(StepBoundary):
    """Logs `val/fid_<N>` (and `val/clip_score_<N>` for text-conditioned runs with `clip_model` set).

    Args:
        val_shards: shard set whose captions are the prompts and whose images are the reference.
        every_n_steps: training steps between evaluations (also run at the end of training when > 0).
        num_samples: images generated per evaluation (N in the metric's name).
        reference_num_samples: real images in the reference statistics; null: every image of val_shards.
        cache_dir: where reference statistics are cached; null: `default_cache_dir()` (shared with `ldm-eval`).
        feature_dim, feature_extractor_weights_path, fid_antialias: the Inception features (see conf/eval.yaml).
        clip_model: hub name or local CLIP directory; null: no CLIP score.
        sampler, num_steps, guidance_scale, seed: how the images are generated.
        batch_size: images per `generate` call per process.
        use_ema: the EMA weights (the model a run delivers) or the raw ones.
    """

    def __init__(self, val_shards: str | list[str], every_n_steps: int = 5000, num_samples: int = 1000,
                 reference_num_samples: int | None = None, cache_dir: str | None = None,
                 feature_dim: int = 2048, feature_extractor_weights_path: str | None = None,
                 fid_antialias: bool = False, clip_model: str | None = None, sampler: str = "ddim",
                 num_steps: int = 50, guidance_scale: float = 3.0, seed: int = 0, batch_size: int = 32,
                 use_ema: bool = True):
        super().__init__()
        if not is_int(every_n_steps) or every_n_steps < 1:
            # note: a float is Lightning's fraction of an epoch; 1.0 evaluated at every optimizer step
            raise ConfigError(f"callbacks.fid.every_n_steps={every_n_steps!r} must be a whole number of steps >= 1; "
                              f"it follows trainer.val_check_interval unless set, so set it when that is a fraction "
                              f"of an epoch")
        if num_samples < 2:
            raise ConfigError(f"callbacks.fid.num_samples={num_samples} must be >= 2")
        check_choice("callbacks.fid.sampler", sampler, SAMPLERS)
        check_choice("callbacks.fid.feature_dim", feature_dim, INCEPTION_FEATURE_DIMS)
        check_min(1, **{"callbacks.fid.batch_size": batch_size})
        check_min(2, **{"callbacks.fid.reference_num_samples": reference_num_samples})
        check_min(1, **{"callbacks.fid.num_steps": num_steps})
        check_min(0, **{"callbacks.fid.guidance_scale": guidance_scale})  # 1.0: the conditional model alone
        check_seeds("callbacks.fid.seed", seed, num_samples)
        self.val_shards = val_shards
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.reference_num_samples = reference_num_samples
        self.cache_dir = cache_dir or default_cache_dir()
        self.feature_dim = feature_dim
        self.feature_extractor_weights_path = feature_extractor_weights_path
        self.fid_antialias = fid_antialias
        self.clip_model = clip_model
        self.sampler = sampler
        self.num_steps = num_steps
        self.guidance_scale = guidance_scale
        self.seed = seed
        self.batch_size = batch_size
        self.use_ema = use_ema
        self._inception: InceptionFeatures | None = None
        self._clip: Callable[[], tuple[Any, Any]] | None = None
        self._metrics: GenerationMetrics | None = None
        self._prompts: list[str] | None = None
        self._labels: list[int] | None = None
        self._last_step = -1
        self._restored = False  # its state came from a checkpoint

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail at start, not after hours of training: a model that generates, loadable weights, readable shards.
        if not callable(getattr(pl_module, "eval_pipeline", None)):
            raise ConfigError(f"callbacks.fid: {type(pl_module).__name__} does not generate images (no eval_pipeline); "
                              f"the FID callback is for latent diffusion models: leave callbacks=[default,fid] out")
        pl_module.pipeline.schedule.check_num_steps(self.num_steps, "callbacks.fid.num_steps")
        self._shards = local_shards(self.val_shards, "callbacks.fid.val_shards")
        require_image_shards(self._shards, "callbacks.fid.val_shards are the FID's reference images",
                             "training on latents, set callbacks.fid.val_shards")
        self._prompts = load_prompts("val_shards", self.num_samples, self._shards)
        conditioner = pl_module.pipeline.conditioner
        if self.clip_model and not conditioner.uses_prompts:
            raise ConfigError(f"callbacks.fid.clip_model={self.clip_model}: CLIP score rates images against their "
                              f"prompts, and this model reads none; set callbacks.fid.clip_model=null")
        self._labels = generation_labels(conditioner, self._shards, self.num_samples, "callbacks.fid.val_shards")
        self._inception = InceptionFeatures(self.feature_dim, self.feature_extractor_weights_path,
                                            antialias=self.fid_antialias,
                                            key="callbacks.fid.feature_extractor_weights_path")
        if self.clip_model:  # loaded now, so that weights that cannot be had fail before training
            clip = clip_loader(self.clip_model, key="callbacks.fid.clip_model")()
            self._clip = lambda: clip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed from a checkpoint written on a stop signal at a step whose evaluation was due (the signal's
        # save comes before this callback's turn at that step, and the stopped run skips it): evaluate it now.
        # note: a checkpoint of older code holds no state, so whether its step was evaluated is not known: not again
        step = trainer.global_step
        if self._restored and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    @property
    def state_key(self) -> str:
        """One per curve, `val/fid_<num_samples>`: several FID callbacks (a frequent small one, a rare large one) keep
        their own states, and a run resumed with another `every_n_steps` keeps its curve's."""
        return f"{type(self).__name__}{{'num_samples': {self.num_samples}}}"

    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}  # the step of the newest evaluation

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", -1))
        self._restored = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not self.stepped(trainer) or run_halted(trainer) or run_stopped(trainer):
            return  # mid-accumulation (the step's evaluation comes at its last batch), or stopping on a signal
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # note: not after a stop signal (SLURM's warning leaves no time for it; the resumed run evaluates at its end)
        # or a NaN halt
        stopped = run_halted(trainer) or run_stopped(trainer)
        if trainer.global_step != self._last_step and trainer.global_step > 0 and not stopped:
            self.evaluate(trainer, pl_module)

    def _scorer(self, pl_module: L.LightningModule, resolution: int) -> GenerationMetrics:
        if self._metrics is None:
            device = pl_module.device
            self._inception = self._inception.to(device)
            reference = load_or_compute_reference_stats(self._shards, resolution, self.reference_num_samples,
                                                        self._inception, self.cache_dir, self.batch_size, device)
            metrics = ["fid"] + (["clip_score"] if self.clip_model else [])
            self._metrics = GenerationMetrics(metrics, self._inception, reference, self._clip,
                                              seed=self.seed).to(device)
        return self._metrics

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Generate, score and log at the current step (rank 0, to every logger; also in `trainer.callback_metrics`);
        every rank takes part (metric states sync across ranks). Its time is left out of the throughput numbers."""
        with paused(trainer):
            results = self._evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # at the step Lightning gives the validation of this step: the steps before
                logger.log_metrics(results, step=trainer.global_step - 1)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in results.items()})
        return results

    @torch.no_grad()
    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        self._last_step = trainer.global_step
        rank, world = rank_and_world(trainer)
        scorer = None
        with eval_mode(pl_module):
            pipeline = pl_module.eval_pipeline(self.use_ema)
            for batch in rank_batches(self.num_samples, self.batch_size, rank, world):
                prompts = [self._prompts[i] for i in batch]
                labels = None if self._labels is None else [self._labels[i] for i in batch]
                images = pipeline.generate(prompts, [self.seed + i for i in batch], sampler=self.sampler,
                                           num_steps=self.num_steps, guidance_scale=self.guidance_scale,
                                           class_labels=labels)
                images = to_uint8(images)                                               # (B, 3, H, W)
                if scorer is None:  # the resolution is the model's: known from its first images
                    scorer = self._scorer(pl_module, int(images.shape[-1]))
                scorer.update(images, prompts)
        if scorer is None:
            raise ValueError(f"rank {rank} got no samples: num_samples={self.num_samples} < {world} ranks")
        values = scorer.compute()
        scorer.reset()
        results = {f"val/{name}_{self.num_samples}": value for name, value in values.items()}
        rank_zero_info(f"step {trainer.global_step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        return results
