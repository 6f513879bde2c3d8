"""The checkpoint evaluator behind `ldm-eval`: every number it writes carries its protocol.

For each checkpoint x sampler x steps x guidance scale it generates `num_samples` images from a prompt set, scores
them (FID / KID against cached reference statistics, CLIP score, `shapes` adherence) and appends one row to
`<output_dir>/results.jsonl` and `results.csv`. A stage-1 (autoencoder) checkpoint is scored on reconstructions of a
shard set instead: rFID, PSNR, SSIM, LPIPS.

Under torch.distributed the samples are split across ranks (rank r takes global indices r, r + W, ...); sample i is
generated from seed `seed + i` and prompt i, so an image never depends on the split, and torchmetrics syncs the metric
states, so the numbers equal a single-process run's up to float summation order.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

import ldm
from ldm.config import ConfigError, check_choice, to_dataclass
from ldm.eval.feature_extractors import InceptionFeatures, clip_identity, clip_loader, resolve_inception_weights
from ldm.eval.metrics import (
    GENERATION_METRICS,
    INCEPTION_METRICS,
    RECONSTRUCTION_METRICS,
    GenerationMetrics,
    ReconstructionMetrics,
)
from ldm.eval.reference_stats import ReferenceStats, load_or_compute_reference_stats
from ldm.eval.results import append_results
from ldm.eval.sources import expand_shards, iter_image_batches, load_prompts
from ldm.images import to_uint8

CHECKPOINT_KINDS = {
    "autoencoder": "ldm.modules.autoencoder.AutoencoderModule",
    "latent_diffusion": "ldm.modules.latent_diffusion.LatentDiffusionModule",
}


@dataclass
class WandbConfig:
    enabled: bool = False             # log a W&B table of sample images and the results rows
    project: str = "ldm-eval"
    name: str | None = None           # run name; null lets W&B choose
    offline: bool = True              # no account or network needed; `wandb sync <dir>` uploads later
    num_images: int = 16              # sample images per row in the table (taken from rank 0's share)


@dataclass
class EvalConfig:
    """What `ldm-eval` does; conf/eval.yaml documents every key."""

    ckpt_path: Any = None                       # a checkpoint, a glob, or a list of either
    output_dir: str | None = None               # results.jsonl / results.csv are appended here
    num_samples: int = 1000                     # images per (checkpoint, sampler, steps, guidance)
    batch_size: int = 32                        # images generated / scored per forward, per process
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    num_steps: list[int] = field(default_factory=lambda: [50])
    guidance_scales: list[float] = field(default_factory=lambda: [3.0])
    seed: int = 0                               # sample i draws its noise from seed + i
    use_ema: bool = True                        # EMA weights (what a trained model is) or the raw weights
    metrics: list[str] = field(default_factory=lambda: ["fid", "clip_score"])  # for latent diffusion checkpoints
    reconstruction_metrics: list[str] = field(default_factory=lambda: ["rfid", "psnr", "ssim", "lpips"])  # stage 1
    prompts_source: str = "val_shards"          # val_shards (their captions) | file (prompts_file, one a line)
    prompts_file: str | None = None
    val_shards: Any = None                      # shard set: prompts, reference statistics, autoencoder inputs
    reference_shards: Any = None                # reference statistics from these instead of val_shards
    reference_num_samples: int | None = None    # real images in the reference statistics; null: all of the shards
    resolution: int | None = None               # autoencoder inputs; null: the autoencoder's training resolution
    cache_dir: str = "~/.cache/ldm/reference_stats"
    feature_dim: int = 2048                     # InceptionV3 layer: 64 | 192 | 768 | 2048 (standard FID: 2048)
    feature_extractor_weights_path: str | None = None  # local InceptionV3 state dict; null: torch-fidelity's weights
    fid_antialias: bool = False                 # false: TF1-compatible resize, as torch-fidelity / published FID
    clip_model: str | None = "openai/clip-vit-large-patch14"  # hub name or local directory (save_pretrained)
    kid_subsets: int = 100
    kid_subset_size: int = 1000                 # capped by the number of images on either side
    lpips_pretrained_backbone: bool = True      # false: LPIPS over a random VGG (only for offline smoke tests)
    device: str = "auto"                        # auto: cuda:<local rank> when available, else cpu
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.ckpt_path in (None, "", []):
            raise ConfigError("ckpt_path is required: a checkpoint, a glob (runs/x/checkpoints/*.ckpt) or a list")
        if not self.output_dir:
            raise ConfigError("output_dir is required: results.jsonl and results.csv are appended there")
        check_choice("prompts_source", self.prompts_source, ["val_shards", "file"])
        for name in self.metrics:
            check_choice("metrics[]", name, GENERATION_METRICS)
        for name in self.reconstruction_metrics:
            check_choice("reconstruction_metrics[]", name, RECONSTRUCTION_METRICS)
        check_choice("feature_dim", self.feature_dim, [64, 192, 768, 2048])
        if self.num_samples < 2 or self.batch_size < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 2 and batch_size={self.batch_size} >= 1")
        if not (self.samplers and self.num_steps and self.guidance_scales):
            raise ConfigError(f"samplers={self.samplers}, num_steps={self.num_steps} and "
                              f"guidance_scales={self.guidance_scales} must each hold at least one value")


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints.


def resolve_checkpoints(spec: str | Sequence[str]) -> list[str]:
    """Checkpoint paths from a path, a glob or a list of either, in the order given (globs sorted)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    paths: list[str] = []
    for item in specs:
        item = str(Path(str(item)).expanduser())
        found = sorted(glob.glob(item)) if glob.has_magic(item) else [item]
        missing = [p for p in found if not Path(p).is_file()]
        if not found or missing:
            raise FileNotFoundError(f"ckpt_path={item}: {'no such file ' + str(missing) if missing else 'no match'}")
        paths.extend(str(Path(p).absolute()) for p in found)
    return paths


def checkpoint_kind(checkpoint: dict[str, Any]) -> str:
    """`autoencoder` or `latent_diffusion`, from what each module writes into its checkpoints.

    An explicit `module_class` (or `_target_` in the saved config) wins; otherwise the AutoencoderModule's own
    checkpoint entry `autoencoder_config` with no denoiser weights marks stage 1.
    """
    hparams = checkpoint.get("hyper_parameters") or {}
    named = checkpoint.get("module_class") or (hparams.get("config") or {}).get("_target_") or hparams.get("_target_")
    if named:
        for kind, cls in CHECKPOINT_KINDS.items():
            if str(named).rsplit(".", 1)[-1] == cls.rsplit(".", 1)[-1]:
                return kind
    prefixes = {key.split(".", 1)[0] for key in checkpoint.get("state_dict", {})}
    if prefixes & {"unet", "denoiser", "model", "net"}:
        return "latent_diffusion"
    if "autoencoder" in prefixes or "autoencoder_config" in checkpoint:
        return "autoencoder"
    raise ValueError(f"cannot tell what this checkpoint holds (state dict prefixes {sorted(prefixes)[:8]}); "
                     f"expected an AutoencoderModule or LatentDiffusionModule checkpoint")


def load_module(path: str, use_ema: bool = True) -> tuple[str, Any, dict[str, Any]]:
    """(kind, model in eval mode on CPU, checkpoint info for the protocol row).

    A latent diffusion checkpoint gives its LightningModule (`generate` needs it all). An autoencoder checkpoint gives
    just the AutoencoderKL (EMA weights when kept and asked for): evaluation needs neither the loss nor its LPIPS
    backbone, nor the discriminator, which the training module would build.
    """
    import hydra.utils

    meta = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    kind = checkpoint_kind(meta)
    stat = Path(path).stat()
    info = {"checkpoint": path, "checkpoint_kind": kind, "checkpoint_step": int(meta.get("global_step", -1)),
            "checkpoint_size": stat.st_size, "checkpoint_mtime": int(stat.st_mtime)}
    if kind == "autoencoder":
        from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL

        net_config = meta.get("autoencoder_config") or meta["hyper_parameters"]["config"]["net"]
        model = AutoencoderKL(AutoencoderConfig(**net_config))
        state = meta["state_dict"]
        prefix = "ema.module." if use_ema and any(k.startswith("ema.module.") for k in state) else "autoencoder."
        model.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        info["weights"] = "ema" if prefix.startswith("ema") else "raw"
        return kind, model.eval().requires_grad_(False), info
    cls = hydra.utils.get_class(CHECKPOINT_KINDS[kind])
    module = cls.load_from_checkpoint(path, map_location="cpu")
    info["weights"] = "ema" if use_ema and getattr(module, "ema", None) is not None else "raw"
    return kind, module.eval().requires_grad_(False), info


# --------------------------------------------------------------------------------------------------------------------
# Processes.


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def rank_batches(num_samples: int, batch_size: int, rank: int, world: int) -> Iterator[list[int]]:
    """This rank's global sample indices (rank, rank + world, ...) in batches."""
    indices = list(range(rank, num_samples, world))
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def generate_images(module: Any, prompts: list[str], seeds: list[int], sampler: str, num_steps: int,
                    guidance_scale: float, use_ema: bool) -> torch.Tensor:
    """`module.generate` for a batch, in [-1, 1]; a class-conditional model gets the shape class its prompt names."""
    kwargs: dict[str, Any] = {}
    if getattr(getattr(module, "conditioner", None), "kind", None) == "class":
        from ldm.data.shapes import SHAPES
        from ldm.eval.shapes_adherence import parse_caption

        shapes = [parse_caption(p)[1] for p in prompts]
        if None in shapes:
            raise ValueError(f"a class-conditional model needs prompts naming a shape of {list(SHAPES)}; got "
                             f"{prompts[shapes.index(None)]!r}")
        kwargs["class_labels"] = [SHAPES.index(s) for s in shapes]
    with torch.no_grad():
        return module.generate(prompts, seeds, sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                               use_ema=use_ema, **kwargs)


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# The evaluator.


class Evaluator:
    """Shared state of one `ldm-eval` run: the feature network and the reference statistics, built once."""

    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg = dataclasses.replace(cfg)
        if cfg.val_shards is not None:
            cfg.val_shards = expand_shards(cfg.val_shards)
        if cfg.reference_shards is not None:
            cfg.reference_shards = expand_shards(cfg.reference_shards)
        self.rank, self.world = dist_info()
        self.device = resolve_device(cfg.device)
        self._inception: InceptionFeatures | None = None
        self._references: dict[tuple[Any, int], ReferenceStats] = {}

    @property
    def inception(self) -> InceptionFeatures:
        if self._inception is None:
            self._inception = InceptionFeatures(self.cfg.feature_dim, self.cfg.feature_extractor_weights_path,
                                                antialias=self.cfg.fid_antialias).to(self.device)
        return self._inception

    def reference(self, shards: Any, resolution: int, num_samples: int | None) -> ReferenceStats:
        if shards is None:
            raise ConfigError("FID/KID/rFID need reference images: set val_shards (or reference_shards)")
        key = (json.dumps(shards, default=str), resolution, num_samples)
        if key not in self._references:
            self._references[key] = load_or_compute_reference_stats(
                shards, resolution, num_samples, self.inception, self.cfg.cache_dir, self.cfg.batch_size, self.device)
        return self._references[key]

    def protocol(self) -> dict[str, Any]:
        """Fields every row shares."""
        return {"seed": self.cfg.seed, "seed_rule": "sample i uses seed + i", "world_size": self.world,
                "device": self.device.type, "ldm_version": ldm.__version__, "torch_version": torch.__version__,
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    # ---- latent diffusion -------------------------------------------------------------------------------------------

    def evaluate_generation(self, module: Any, info: dict[str, Any], logger: Any = None) -> list[dict[str, Any]]:
        cfg = self.cfg
        prompts = load_prompts(cfg.prompts_source, cfg.num_samples, cfg.val_shards, cfg.prompts_file)
        module.to(self.device)
        rows = []
        for sampler in cfg.samplers:
            for num_steps in cfg.num_steps:
                for guidance_scale in cfg.guidance_scales:
                    sweep = {"sampler": sampler, "num_steps": int(num_steps), "guidance_scale": float(guidance_scale)}
                    metrics, resolution, shown = self._generate_and_score(module, prompts, sweep)
                    row = {**info, **sweep, "num_samples": cfg.num_samples,
                           "resolution": resolution, **self.protocol(),
                           "prompts_source": cfg.prompts_source,
                           "prompts": cfg.prompts_file if cfg.prompts_source == "file" else cfg.val_shards,
                           "prompts_sha256": _sha256_lines(prompts), **metrics.pop("_protocol"), **metrics}
                    rows.append(row)
                    if logger is not None:
                        logger.log_samples(row, shown, prompts)
        return rows

    def _generate_and_score(self, module: Any, prompts: list[str], sweep: dict[str, Any],
                            ) -> tuple[dict[str, Any], int, torch.Tensor | None]:
        cfg = self.cfg
        scorer: GenerationMetrics | None = None
        resolution = -1
        shown: list[torch.Tensor] = []
        protocol: dict[str, Any] = {}
        for batch in rank_batches(cfg.num_samples, cfg.batch_size, self.rank, self.world):
            batch_prompts = [prompts[i] for i in batch]
            images = generate_images(module, batch_prompts, [cfg.seed + i for i in batch], use_ema=cfg.use_ema,
                                     **sweep)
            images = to_uint8(images).to(self.device)                                 # (B, 3, H, W)
            if scorer is None:  # the resolution is the model's: known from its first images
                resolution = int(images.shape[-1])
                scorer, protocol = self._generation_metrics(resolution)
            scorer.update(images, batch_prompts)
            if sum(len(s) for s in shown) < cfg.wandb.num_images:
                shown.append(images.cpu())
        if scorer is None:
            raise ValueError(f"rank {self.rank} got no samples: num_samples={cfg.num_samples} < {self.world} ranks")
        metrics = scorer.compute()
        return {**metrics, "_protocol": protocol}, resolution, torch.cat(shown) if shown else None

    def _generation_metrics(self, resolution: int) -> tuple[GenerationMetrics, dict[str, Any]]:
        cfg = self.cfg
        protocol: dict[str, Any] = {}
        inception = reference = None
        if any(m in INCEPTION_METRICS for m in cfg.metrics):
            inception = self.inception
            reference = self.reference(cfg.reference_shards or cfg.val_shards, resolution, cfg.reference_num_samples)
            protocol.update({"feature_extractor": inception.identity, **reference.protocol()})
        if "kid" in cfg.metrics:
            protocol["kid_subsets"] = cfg.kid_subsets
        if "clip_score" in cfg.metrics:
            protocol["clip_model"] = clip_identity(cfg.clip_model or "")
        if "shapes_color_accuracy" in cfg.metrics or "shapes_shape_accuracy" in cfg.metrics:
            from ldm.data.shapes import COLORS, SHAPES

            protocol["shapes_analyser"] = "ldm.eval.shapes_adherence (border-median background, nearest COLORS entry)"
            protocol["shapes_color_chance"] = 1 / len(COLORS)
            if "shapes_shape_accuracy" in cfg.metrics:
                protocol["shapes_shape_chance"] = 1 / len(SHAPES)
        scorer = GenerationMetrics(cfg.metrics, inception, reference, cfg.clip_model, cfg.kid_subsets,
                                   cfg.kid_subset_size, seed=cfg.seed).to(self.device)
        return scorer, protocol

    # ---- autoencoder ------------------------------------------------------------------------------------------------

    def evaluate_reconstruction(self, model: Any, info: dict[str, Any]) -> list[dict[str, Any]]:
        """rFID / PSNR / SSIM / LPIPS of an AutoencoderKL on the first `num_samples` images of val_shards."""
        cfg = self.cfg
        shards = cfg.val_shards
        if shards is None:
            raise ConfigError("an autoencoder checkpoint is evaluated on val_shards; set val_shards=DIR_OR_GLOB")
        resolution = cfg.resolution or int(model.config.resolution)
        model = model.to(self.device)
        protocol: dict[str, Any] = {}
        inception = reference = lpips_fn = None
        if "rfid" in cfg.reconstruction_metrics:
            inception = self.inception
            reference = self.reference(shards, resolution, cfg.num_samples)
            protocol.update({"feature_extractor": inception.identity, **reference.protocol()})
        if "lpips" in cfg.reconstruction_metrics:
            from ldm.losses.lpips import build_lpips

            lpips_net = build_lpips(cfg.lpips_pretrained_backbone, flag="lpips_pretrained_backbone").to(self.device)
            lpips_fn = lpips_net.forward
            protocol["lpips"] = {"net": "vgg", "version": "0.1", "pretrained_backbone": cfg.lpips_pretrained_backbone}
        scorer = ReconstructionMetrics(cfg.reconstruction_metrics, inception, reference, lpips_fn).to(self.device)
        seen = 0
        for index, (images, _) in enumerate(iter_image_batches(shards, resolution, cfg.num_samples, cfg.batch_size)):
            seen += len(images)
            if index % self.world != self.rank:  # whole batches round-robin over ranks
                continue
            x = images.to(self.device).float() / 127.5 - 1
            with torch.no_grad():
                reconstructions = model.decode(model.encode(x).mode())
            scorer.update(to_uint8(reconstructions), images.to(self.device))
        metrics = scorer.compute()
        return [{**info, "num_samples": seen, "resolution": resolution,
                 **self.protocol(), "data_shards": shards, **protocol, **metrics}]



# --------------------------------------------------------------------------------------------------------------------
# Entry point.


def evaluate(cfg: DictConfig | dict | EvalConfig) -> list[dict[str, Any]]:
    """Evaluate every checkpoint of `cfg.ckpt_path` and return the rows appended to `<output_dir>/results.jsonl`.

    Every rank returns the same rows; rank 0 alone writes files, prints and logs.
    """
    config = to_dataclass(EvalConfig, cfg)
    paths = resolve_checkpoints(config.ckpt_path)
    _check_weights(config, {_read_kind(p) for p in paths})
    evaluator = Evaluator(config)
    logger = _WandbTable(config) if config.wandb.enabled and evaluator.rank == 0 else None
    rows: list[dict[str, Any]] = []
    try:
        for path in paths:
            kind, module, info = load_module(path, config.use_ema)
            if kind == "autoencoder":
                new = evaluator.evaluate_reconstruction(module, info)
            else:
                new = evaluator.evaluate_generation(module, info, logger)
            del module
            if evaluator.rank == 0:
                append_results(config.output_dir, new)
                for row in new:
                    _print_row(row)
            rows.extend(new)
    finally:
        if logger is not None:
            logger.finish(rows)
    return rows


def _read_kind(path: str) -> str:
    return checkpoint_kind(torch.load(path, map_location="cpu", weights_only=False, mmap=True))


def _check_weights(cfg: EvalConfig, kinds: set[str]) -> None:
    """Fail before any model is built when the weights a metric needs cannot be had (offline, wrong path)."""
    metrics = (cfg.metrics if "latent_diffusion" in kinds else []) + \
        (cfg.reconstruction_metrics if "autoencoder" in kinds else [])
    if any(m in INCEPTION_METRICS for m in metrics):
        resolve_inception_weights(cfg.feature_extractor_weights_path)
    if "lpips" in metrics and cfg.lpips_pretrained_backbone:
        from ldm.losses.lpips import vgg16_weights_path

        if not vgg16_weights_path().is_file():
            raise FileNotFoundError(f"lpips needs the VGG16 backbone at {vgg16_weights_path()} (never downloaded); "
                                    f"copy it there, set lpips_pretrained_backbone=false (random backbone, smoke "
                                    f"tests only) or drop lpips from reconstruction_metrics")
    if "clip_score" in metrics:
        if not cfg.clip_model:
            raise ConfigError("metrics=[clip_score] needs clip_model (a hub name or a local CLIP directory)")
        clip_loader(cfg.clip_model)


def _print_row(row: dict[str, Any]) -> None:
    metric_names = [*GENERATION_METRICS, "kid_std", *RECONSTRUCTION_METRICS]
    where = ", ".join(f"{k}={row[k]}" for k in ("checkpoint", "weights", "sampler", "num_steps", "guidance_scale",
                                                 "num_samples", "resolution", "seed") if k in row)
    print(f"[ldm-eval] {where}", flush=True)
    for name in metric_names:
        if name in row:
            print(f"{name}: {row[name]:.6g}", flush=True)


class _WandbTable:
    """A W&B run holding a table of sample images per results row, and the results table itself."""

    def __init__(self, cfg: EvalConfig):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, dir=cfg.output_dir,
                              mode="offline" if cfg.wandb.offline else "online", config=dataclasses.asdict(cfg),
                              job_type="eval")
        self.num_images = cfg.wandb.num_images

    def log_samples(self, row: dict[str, Any], images: torch.Tensor | None, prompts: list[str]) -> None:
        if images is None:
            return
        table = self.wandb.Table(columns=["sample", "seed", "prompt", "image"])
        # rank 0 holds global samples 0, W, 2W, ...: its k-th image is sample k * world_size.
        for k, image in enumerate(images[: self.num_images]):
            index = k * row["world_size"]
            table.add_data(index, row["seed"] + index, prompts[index],
                           self.wandb.Image(image.permute(1, 2, 0).numpy(), caption=prompts[index]))
        tag = f"{Path(row['checkpoint']).stem}/{row['sampler']}_{row['num_steps']}_cfg{row['guidance_scale']:g}"
        self.run.log({f"samples/{tag}": table})

    def finish(self, rows: list[dict[str, Any]]) -> None:
        if rows:
            columns = sorted({k for row in rows for k in row})
            data = [[json.dumps(row.get(c)) if isinstance(row.get(c), (list, dict)) else row.get(c) for c in columns]
                    for row in rows]
            self.run.log({"results": self.wandb.Table(columns=columns, data=data)})
        self.run.finish()
