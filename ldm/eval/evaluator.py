"""The checkpoint evaluator behind `ldm-eval`: the run loop. Every number it writes carries its protocol.

For each checkpoint (or exported pipeline) x sampler x steps x guidance scale it generates `num_samples` images from a
prompt set, scores them (FID / KID against cached reference statistics, CLIP score, `shapes` adherence) and appends
one row to `<output_dir>/results.jsonl` and `results.csv`. An autoencoder is scored on reconstructions of a shard set
instead: rFID, PSNR, SSIM, LPIPS. `ldm.eval.loading` reads the models, `ldm.eval.results` writes and shows the rows.

Under torch.distributed the samples are split across ranks (rank r takes global indices r, r + W, ...); sample i is
generated from seed `seed + i` and prompt i, so an image never depends on the split, and torchmetrics syncs the metric
states, so the numbers equal a single-process run's up to float summation order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

import ldm
from ldm.config import ConfigError, check_choice, check_min, check_output_dir, expand_home, to_dataclass
from ldm.data.latents import find_manifest
from ldm.data.shardlist import local_shards
from ldm.distributed import choose_device, rank_and_world
from ldm.eval.feature_extractors import (
    INCEPTION_FEATURE_DIMS,
    InceptionFeatures,
    clip_identity,
    clip_loader,
    resolve_inception_weights,
)
from ldm.eval.loading import load_model, resolve_checkpoints
from ldm.eval.metrics import (
    GENERATION_METRICS,
    INCEPTION_METRICS,
    RECONSTRUCTION_METRICS,
    GenerationMetrics,
    ReconstructionMetrics,
)
from ldm.eval.reference_stats import ReferenceStats, default_cache_dir, load_or_compute_reference_stats
from ldm.eval.results import WandbTable, append_results, print_row, read_results, rewrite_csv
from ldm.eval.sources import (
    READER_VERSION,
    fingerprint_digest,
    generation_labels,
    iter_image_batches,
    load_prompts,
    row_shards,
    shard_digest,
)
from ldm.images import to_uint8
from ldm.io import check_export_weights
from ldm.seeding import check_seeds


@dataclass
class WandbConfig:
    enabled: bool = False             # log a W&B table of sample images and the results rows
    project: str = "ldm-eval"
    name: str | None = None           # run name; null lets W&B choose
    offline: bool = True              # no account or network needed; `wandb sync <dir>` uploads later
    num_images: int = 16              # sample images per row in the table (taken from rank 0's share)


# What names the model of a row for `skip_done`: the file (path, size, modification time) and which weights.
CHECKPOINT_IDENTITY = ("checkpoint", "checkpoint_size", "checkpoint_mtime", "checkpoint_kind", "checkpoint_step",
                       "weights")
# What a user picks for a run of ldm-eval (another value is another point, not the same one scored otherwise).
CHOSEN = ("resolution", "num_samples", "num_samples_asked", "seed", "data_shards", "prompts_source", "prompts_sha256",
          "labels_sha256")


@dataclass
class EvalConfig:
    """What `ldm-eval` does; conf/eval.yaml documents every key."""

    ckpt_path: Any = None                       # a checkpoint, an export (or run) directory, a glob, or a list
    output_dir: str | None = None               # results.jsonl / results.csv are appended here
    num_samples: int = 1000                     # images per (checkpoint, sampler, steps, guidance)
    batch_size: int = 32                        # images generated / scored per forward, per process
    samplers: list[str] = field(default_factory=lambda: ["ddim"])
    num_steps: list[int] = field(default_factory=lambda: [50])
    guidance_scales: list[float] = field(default_factory=lambda: [3.0])
    seed: int = 0                               # sample i draws its noise from seed + i
    use_ema: bool = True                        # a .ckpt's EMA weights (what a trained model is) or the raw ones
    metrics: list[str] = field(default_factory=lambda: ["fid", "clip_score"])  # for latent diffusion checkpoints
    reconstruction_metrics: list[str] = field(default_factory=lambda: ["rfid", "psnr", "ssim", "lpips"])  # stage 1
    prompts_source: str = "val_shards"          # val_shards (their captions) | file (prompts_file, one a line)
    prompts_file: str | None = None
    val_shards: Any = None                      # shard set: prompts, reference statistics, autoencoder inputs;
    #                                             null: the validation shards each latent diffusion model was
    #                                             trained with (an autoencoder needs them given)
    reference_shards: Any = None                # reference statistics from these instead of val_shards
    reference_num_samples: int | None = None    # real images in the reference statistics; null: all of the shards
    resolution: int | None = None               # autoencoder inputs; null: the autoencoder's training resolution
    cache_dir: str = field(default_factory=default_cache_dir)  # $LDM_CACHE_DIR/reference_stats, else ~/.cache/ldm/...
    feature_dim: int = 2048                     # InceptionV3 layer: 64 | 192 | 768 | 2048 (standard FID: 2048)
    feature_extractor_weights_path: str | None = None  # local InceptionV3 state dict; null: torch-fidelity's weights
    fid_antialias: bool = False                 # false: TF1-compatible resize, as torch-fidelity / published FID
    clip_model: str | None = "openai/clip-vit-large-patch14"  # hub name or local directory (save_pretrained)
    kid_subsets: int = 100
    kid_subset_size: int = 1000                 # capped by the number of images on either side
    lpips_pretrained_backbone: bool = True      # false: LPIPS over a random VGG (only for offline smoke tests)
    device: str = "auto"                        # auto: cuda:<local rank> when available, else cpu
    skip_done: bool = True                      # keep a generation sweep point whose row results.jsonl holds already
    #                                             (same checkpoint file, weights, point, N, seed, prompts, protocol)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.ckpt_path in (None, "", []):
            raise ConfigError("ckpt_path is required: a checkpoint, a glob (runs/x/checkpoints/*.ckpt) or a list")
        if not self.output_dir:
            raise ConfigError("output_dir is required: results.jsonl and results.csv are appended there")
        self.output_dir = check_output_dir("output_dir", self.output_dir)
        self.prompts_file = expand_home(self.prompts_file)
        check_choice("prompts_source", self.prompts_source, ["val_shards", "file"])
        if self.prompts_file and self.prompts_source != "file":
            raise ConfigError(f"prompts_file={self.prompts_file} is read only with prompts_source=file (now "
                              f"{self.prompts_source}); add prompts_source=file")
        for name in self.metrics:
            if name in RECONSTRUCTION_METRICS:
                raise ConfigError(f"metrics[]={name!r} is an autoencoder metric: autoencoder checkpoints take "
                                  f"reconstruction_metrics={list(RECONSTRUCTION_METRICS)} (or a part of it); metrics "
                                  f"are for latent diffusion checkpoints, one of {list(GENERATION_METRICS)}")
            check_choice("metrics[]", name, GENERATION_METRICS)
        for name in self.reconstruction_metrics:
            check_choice("reconstruction_metrics[]", name, RECONSTRUCTION_METRICS)
        check_choice("feature_dim", self.feature_dim, INCEPTION_FEATURE_DIMS)
        if self.num_samples < 2 or self.batch_size < 1:
            raise ConfigError(f"num_samples={self.num_samples} must be >= 2 and batch_size={self.batch_size} >= 1")
        check_seeds("seed", self.seed, self.num_samples)  # sample i uses seed + i
        check_min(1, kid_subsets=self.kid_subsets, resolution=self.resolution)
        check_min(2, kid_subset_size=self.kid_subset_size)  # (the unbiased MMD estimate compares pairs)
        check_min(2, reference_num_samples=self.reference_num_samples)
        if not (self.samplers and self.num_steps and self.guidance_scales):
            raise ConfigError(f"samplers={self.samplers}, num_steps={self.num_steps} and "
                              f"guidance_scales={self.guidance_scales} must each hold at least one value")
        from ldm.diffusion.sampling import SAMPLERS  # note: checked here, before any model is loaded

        for name in self.samplers:
            check_choice("samplers[]", name, SAMPLERS)
        if any(steps < 1 for steps in self.num_steps):
            raise ConfigError(f"num_steps={self.num_steps}: every value must be >= 1")
        if not all(0 <= scale < math.inf for scale in self.guidance_scales):  # NaN too
            raise ConfigError(f"guidance_scales={self.guidance_scales}: every value must be a finite number >= 0 "
                              f"(1.0: the conditional model alone)")
        # each point once: a value given twice ([3.0, 3]) scored the same images again, as another row
        self.samplers = list(dict.fromkeys(self.samplers))
        self.num_steps = list(dict.fromkeys(int(steps) for steps in self.num_steps))
        self.guidance_scales = list(dict.fromkeys(float(scale) for scale in self.guidance_scales))


# --------------------------------------------------------------------------------------------------------------------
# Processes.


def rank_batches(num_samples: int, batch_size: int, rank: int, world: int) -> Iterator[list[int]]:
    """This rank's global sample indices (rank, rank + world, ...) in batches."""
    indices = list(range(rank, num_samples, world))
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]


def _sha256_lines(lines: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------------
# The evaluator.


def _short(value: Any, width: int = 80) -> str:
    """`repr(value)`, its middle cut to fit `width` characters (a row's paths and dicts are long)."""
    text = repr(value)
    return text if len(text) <= width else f"{text[:width // 2 - 2]}...{text[-(width // 2 - 2):]}"


_ABSENT = object()


def _differences(key: str, there: Any, here: Any) -> list[str]:
    """`key: <there> there, <here> here`; for two dicts, one such line per entry that differs (`feature_extractor.
    antialias`), where the shortened reprs of the whole dicts could read the same."""
    if isinstance(there, dict) and isinstance(here, dict):
        return [line for sub in {**there, **here} if there.get(sub, _ABSENT) != here.get(sub, _ABSENT)
                for line in _differences(f"{key}.{sub}", there.get(sub, _ABSENT), here.get(sub, _ABSENT))]
    return [f"{key}: {'absent' if there is _ABSENT else _short(there)} there, "
            f"{'absent' if here is _ABSENT else _short(here)} here"]


def _in_todays_form(row: dict[str, Any]) -> dict[str, Any]:
    """An earlier row with the fields whose form (not meaning) changed as this version writes them: older ldm named
    every shard in `data_shards` (cut here as `row_shards` cuts it) and held the `shard_fingerprint` list itself."""
    if isinstance(row.get("data_shards"), list):
        row = {**row, "data_shards": row_shards(row["data_shards"])}
    if isinstance(row.get("data_fingerprint"), list):
        row = {**row, "data_fingerprint": fingerprint_digest(row["data_fingerprint"])}
    return row


def _compared(row: dict[str, Any]) -> dict[str, Any]:
    """A row's fields as `skip_done` compares them: where a file was found is no protocol (the reference statistics'
    cache file, whose contents `reference_hash` names; a local CLIP folder, whose weights `weights_sha256` names), so
    that a moved cache or a copied CLIP folder keeps the rows scored."""
    row = {k: v for k, v in row.items() if k != "reference_stats"}
    clip = row.get("clip_model")
    if isinstance(clip, dict) and "weights_sha256" in clip:
        row["clip_model"] = {k: v for k, v in clip.items() if k != "weights"}
    return row


class Evaluator:
    """Shared state of one `ldm-eval` run: the feature network and the reference statistics, built once."""

    def __init__(self, cfg: EvalConfig, done: Sequence[dict[str, Any]] = ()):
        self.cfg = cfg = dataclasses.replace(cfg)
        self.done = [_in_todays_form(row) for row in done]  # rows of earlier runs in output_dir, for `skip_done`
        if cfg.val_shards is not None:
            cfg.val_shards = local_shards(cfg.val_shards, "val_shards")
        if cfg.reference_shards is not None:
            cfg.reference_shards = local_shards(cfg.reference_shards, "reference_shards")
        self.rank, self.world = rank_and_world()
        self.device = choose_device(cfg.device)
        self.clip_model: str | Callable[[], tuple[Any, Any]] | None = cfg.clip_model  # (loaded once checked)
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
        require_image_shards(shards, "FID/KID/rFID need reference images")
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

    def evaluate_generation(self, pipeline: Any, info: dict[str, Any], logger: WandbTable | None = None,
                            on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """One row per sampler x steps x guidance scale for a `LatentDiffusionPipeline` (anything with its
        `generate`), each handed to `on_row` as soon as it is scored (so an interrupted sweep keeps the rows done);
        without val_shards, the prompts come from the validation shards the model was trained with."""
        cfg = self.cfg
        if cfg.resolution is not None and cfg.resolution != pipeline.image_size and self.rank == 0:
            print(f"[ldm-eval] resolution={cfg.resolution} applies to autoencoder checkpoints; "
                  f"{info.get('checkpoint')} generates at its own image_size, {pipeline.image_size} px", flush=True)
        schedule = getattr(pipeline, "schedule", None)
        if schedule is not None:  # before any statistics are computed
            for num_steps in cfg.num_steps:
                schedule.check_num_steps(num_steps, "num_steps")
        needs_shards = cfg.prompts_source == "val_shards" or (
            cfg.reference_shards is None and any(m in INCEPTION_METRICS for m in cfg.metrics))
        shards = self.shards_for(pipeline) if needs_shards else cfg.val_shards
        prompts = load_prompts(cfg.prompts_source, cfg.num_samples, shards, cfg.prompts_file)
        conditioner = getattr(pipeline, "conditioner", None)
        check_conditioning_metrics(cfg.metrics, conditioner, info.get("checkpoint"))
        check_shapes_prompts(cfg.metrics, prompts)
        if getattr(conditioner, "reads_labels", False) and cfg.prompts_source != "val_shards":
            raise ConfigError(f"{info.get('checkpoint')} is class-conditional: it generates from the integer 'label' "
                              f"of each validation sample's metadata, so it needs prompts_source=val_shards (got "
                              f"{cfg.prompts_source})")
        labels = generation_labels(conditioner, shards, cfg.num_samples, "val_shards")
        guidance_scales = cfg.guidance_scales
        if not getattr(conditioner, "conditional", True) and guidance_scales != [1.0]:
            guidance_scales = [1.0]  # every scale would give the same images, and a row per scale would repeat them
            if self.rank == 0:
                print(f"[ldm-eval] {info.get('checkpoint')} is unconditional: guidance has nothing to steer by, so it "
                      f"is scored once, at guidance_scale 1.0 (guidance_scales={cfg.guidance_scales})", flush=True)
        pipeline.to(self.device)
        rows = []
        prompts_sha256 = _sha256_lines(prompts)  # one prompt list for every point
        # a class-conditional model generates from labels: they are part of what a row scored
        conditions = {"prompts_sha256": prompts_sha256}
        if labels is not None:
            conditions["labels_sha256"] = _sha256_lines([str(label) for label in labels])
        for sampler in cfg.samplers:
            for num_steps in cfg.num_steps:
                for guidance_scale in guidance_scales:
                    sweep = {"sampler": sampler, "num_steps": int(num_steps), "guidance_scale": float(guidance_scale)}
                    scorer, protocol = self._generation_metrics(int(pipeline.image_size), shards)
                    point = {**{k: v for k, v in info.items() if k in CHECKPOINT_IDENTITY}, **sweep,
                             "num_samples": cfg.num_samples, "resolution": pipeline.image_size, "seed": cfg.seed,
                             "prompts_source": cfg.prompts_source, **conditions, **protocol}
                    earlier = self._done_row(point, cfg.metrics, f"{sampler} {num_steps} steps guidance "
                                                                     f"{float(guidance_scale):g}", tuple(sweep))
                    if earlier is not None:
                        rows.append(earlier)
                        continue
                    metrics, shown = self._generate_and_score(pipeline, prompts, labels, scorer, sweep)
                    row = {**info, **sweep, "num_samples": cfg.num_samples,
                           "resolution": pipeline.image_size, **self.protocol(),
                           "prompts_source": cfg.prompts_source,
                           "prompts": (str(Path(cfg.prompts_file).expanduser().resolve())
                                       if cfg.prompts_source == "file" else row_shards(shards)),
                           **conditions, **protocol, **metrics}
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
                    if logger is not None:
                        logger.log_samples(row, shown, prompts)
        return rows

    def shards_for(self, model: Any) -> list[str] | None:
        """`val_shards`, or else the validation shards `model` was trained with (recorded in its checkpoint or
        export), said once; None when neither is known."""
        if self.cfg.val_shards is not None:
            return self.cfg.val_shards
        recorded = getattr(model, "provenance", {}).get("val_shards")
        if not recorded:
            return None
        if self.rank == 0:
            print(f"[ldm-eval] val_shards not set: using the validation shards {model.provenance['source']} was "
                  f"trained with: {recorded}", flush=True)
        try:
            return local_shards(recorded)
        except FileNotFoundError as err:
            raise ConfigError(f"val_shards is not set and the validation shards the model was trained with are not "
                              f"here ({err}); set val_shards to image shards") from None

    def _done_row(self, point: dict[str, Any], metrics: list[str], what: str, varied: tuple[str, ...] = (),
                  ) -> dict[str, Any] | None:
        """An earlier row of this sweep point (`skip_done`): every field of `point` equal and every asked-for metric
        there; said on rank 0, naming the point as `what`. None when the point is to be scored; where a row of the
        same checkpoint, the same values of the sweep's `varied` keys and of what the user `CHOSEN` lacks a metric or
        differs in other fields (a protocol setting changed, data rewritten, a row of older ldm), the closest row's
        missing metrics or differing fields are named."""
        if not self.cfg.skip_done:
            return None
        point = _compared(json.loads(json.dumps(point)))  # as a row read back from results.jsonl (tuples as lists)
        rows = [(_compared(row), row) for row in self.done]
        found = next((row for seen, row in rows if all(seen.get(k) == v for k, v in point.items())
                      and all(m in row for m in metrics)), None)
        if found is None and self.rank == 0:  # a row of the same point as the user sees it, scored otherwise
            same = (*CHECKPOINT_IDENTITY, *varied, *CHOSEN)
            near = [seen for seen, _ in rows if all(seen.get(k) == point[k] for k in same if k in point)]
            if near:
                def lacking(row: dict[str, Any]) -> list[str]:
                    return [m for m in metrics if m not in row]

                def differing(row: dict[str, Any]) -> list[str]:  # a field absent from a row that lacks a metric
                    return [k for k, v in point.items()  # came with such a metric (shapes_shape_chance), no setting
                            if row.get(k) != v and (k in row or not lacking(row))]

                row = min(near, key=lambda r: len(lacking(r)) + len(differing(r)))
                told = "; ".join([*([f"without {', '.join(lacking(row))}"] if lacking(row) else []),
                                  *[line for k in differing(row) for line in
                                    _differences(k, row.get(k, _ABSENT), point[k])][:4]])
                print(f"[ldm-eval] {point['checkpoint']} {what}: results.jsonl holds a row of it scored otherwise "
                      f"({told}): scored again", flush=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            box = [found]  # rank 0 decides for all: a rank that scored alone would wait in its collectives forever
            torch.distributed.broadcast_object_list(box, src=0)
            found = box[0]
        if found is not None and self.rank == 0:
            print(f"[ldm-eval] {point['checkpoint']} {what}: in results.jsonl already (skip_done=false scores it "
                  f"again)", flush=True)
            print_row(found)  # its numbers, as a new row's: a sweep's log shows every point
        return found

    def _generate_and_score(self, pipeline: Any, prompts: list[str], labels: list[int] | None,
                            scorer: GenerationMetrics, sweep: dict[str, Any],
                            ) -> tuple[dict[str, Any], torch.Tensor | None]:
        # note: the metrics' models (Inception, CLIP) and reference statistics were loaded before the first sample
        # is made (`_generation_metrics`), so that weights that cannot be had fail at once.
        cfg = self.cfg
        generated = 0
        non_finite = torch.zeros((), dtype=torch.long, device=self.device)
        shown: list[torch.Tensor] = []
        for batch in rank_batches(cfg.num_samples, cfg.batch_size, self.rank, self.world):
            batch_prompts = [prompts[i] for i in batch]
            with torch.no_grad():
                images = pipeline.generate(batch_prompts, [cfg.seed + i for i in batch],
                                           class_labels=None if labels is None else [labels[i] for i in batch],
                                           **sweep)
            non_finite += (~torch.isfinite(images).flatten(1).all(1)).sum().to(self.device)
            images = to_uint8(images).to(self.device)                                 # (B, 3, H, W)
            scorer.update(images, batch_prompts)
            generated += len(images)
            if sum(len(s) for s in shown) < cfg.wandb.num_images:
                shown.append(images.cpu())
        if not generated:
            raise ValueError(f"rank {self.rank} got no samples: num_samples={cfg.num_samples} < {self.world} ranks")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(non_finite)
        if non_finite and self.rank == 0:  # scored as the black or clipped pixels they quantise to
            print(f"[ldm-eval] warning: {int(non_finite)} of {cfg.num_samples} images hold NaN or infinite values "
                  f"(scored as black or clipped pixels): the model or its precision diverged", flush=True)
        return {**scorer.compute(), "non_finite_samples": int(non_finite)}, torch.cat(shown) if shown else None

    def _generation_metrics(self, resolution: int, shards: list[str] | None,
                            ) -> tuple[GenerationMetrics, dict[str, Any]]:
        cfg = self.cfg
        protocol: dict[str, Any] = {}
        inception = reference = None
        if any(m in INCEPTION_METRICS for m in cfg.metrics):
            inception = self.inception
            reference = self.reference(cfg.reference_shards or shards, resolution, cfg.reference_num_samples)
            protocol.update({"feature_extractor": inception.identity, **reference.protocol()})
        if "kid" in cfg.metrics:  # the subset size asked for (the row's kid_subset_size: after capping by N)
            protocol.update(kid_subsets=cfg.kid_subsets, kid_subset_size_asked=cfg.kid_subset_size)
        if "clip_score" in cfg.metrics:
            protocol["clip_model"] = clip_identity(cfg.clip_model or "")
        if "shapes_color_accuracy" in cfg.metrics or "shapes_shape_accuracy" in cfg.metrics:
            from ldm.eval.shapes_adherence import adherence_protocol

            protocol.update(adherence_protocol(read_shapes="shapes_shape_accuracy" in cfg.metrics))
        scorer = GenerationMetrics(cfg.metrics, inception, reference, self.clip_model, cfg.kid_subsets,
                                   cfg.kid_subset_size, seed=cfg.seed).to(self.device)
        return scorer, protocol

    # ---- autoencoder ------------------------------------------------------------------------------------------------

    def evaluate_reconstruction(self, model: Any, info: dict[str, Any],
                                on_row: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
        """rFID / PSNR / SSIM / LPIPS of an AutoencoderKL on the first `num_samples` images of val_shards (or the row
        results.jsonl holds already for the same protocol: `skip_done`); `on_row` is called with a new row."""
        cfg = self.cfg
        shards = cfg.val_shards
        if shards is None:
            raise ConfigError("an autoencoder checkpoint is evaluated on val_shards; set val_shards=DIR_OR_GLOB")
        require_image_shards(shards, "an autoencoder is evaluated on images")
        resolution = int(model.config.resolution) if cfg.resolution is None else cfg.resolution
        if resolution % model.downsample_factor:
            raise ConfigError(f"resolution={resolution} is not divisible by the autoencoder's downsampling factor "
                              f"{model.downsample_factor}; choose a multiple of it (its training resolution: "
                              f"{model.config.resolution})")
        from ldm.losses.lpips import MIN_SIZE as LPIPS_MIN_SIZE
        from ldm.losses.lpips import build_lpips

        if "lpips" in cfg.reconstruction_metrics and resolution < LPIPS_MIN_SIZE:
            raise ConfigError(f"reconstruction_metrics holds lpips, which needs images of at least {LPIPS_MIN_SIZE} "
                              f"px (LPIPS-VGG); resolution is {resolution}: drop lpips or set "
                              f"resolution>={LPIPS_MIN_SIZE}")
        model = model.to(self.device)
        protocol: dict[str, Any] = {}
        inception = reference = lpips_fn = None
        if "rfid" in cfg.reconstruction_metrics:
            inception = self.inception
            reference = self.reference(shards, resolution, cfg.num_samples)
            protocol.update({"feature_extractor": inception.identity, **reference.protocol()})
        if "lpips" in cfg.reconstruction_metrics:
            with torch.random.fork_rng(devices=[]):  # a random backbone (smoke tests) is the same on every run
                torch.manual_seed(cfg.seed)
                lpips_net = build_lpips(cfg.lpips_pretrained_backbone, flag="lpips_pretrained_backbone")
            lpips_fn = lpips_net.to(self.device).forward
            protocol["lpips_model"] = {  # not "lpips": the metric's value takes that key
                "net": "vgg", "version": "0.1", "pretrained_backbone": cfg.lpips_pretrained_backbone,
                **({} if cfg.lpips_pretrained_backbone else {"backbone_seed": cfg.seed})}
        point = {**{k: v for k, v in info.items() if k in CHECKPOINT_IDENTITY}, "num_samples_asked": cfg.num_samples,
                 "resolution": resolution, "seed": cfg.seed, "data_shards": row_shards(shards),
                 "data_fingerprint": shard_digest(shards), "image_reader": READER_VERSION, **protocol}
        earlier = self._done_row(point, cfg.reconstruction_metrics, f"at {resolution} px")
        if earlier is not None:
            return [earlier]
        scorer = ReconstructionMetrics(cfg.reconstruction_metrics, inception, reference, lpips_fn).to(self.device)
        seen = scored = 0
        for batch, _ in iter_image_batches(shards, resolution, cfg.num_samples, cfg.batch_size):
            # image i of the shards to rank i % world (whole batches left a rank with none when there were fewer
            # batches than ranks, and torchmetrics' FID cannot compute without an update)
            images = batch[(self.rank - seen) % self.world::self.world]
            seen += len(batch)
            if not len(images):
                continue
            x = images.to(self.device).float() / 127.5 - 1
            with torch.no_grad():
                reconstructions = model.decode(model.encode(x).mode())
            scorer.update(to_uint8(reconstructions), images.to(self.device))
            scored += len(images)
        if not scored:
            raise ValueError(f"rank {self.rank} got no images: the {seen} images scored are fewer than the "
                             f"{self.world} processes")
        if seen < cfg.num_samples and self.rank == 0:
            print(f"[ldm-eval] num_samples={cfg.num_samples}, but val_shards hold {seen} images: the row scores "
                  f"{seen}", flush=True)
        row = {**info, "num_samples": seen, "num_samples_asked": cfg.num_samples, "resolution": resolution,
               **self.protocol(), "data_shards": point["data_shards"], "data_fingerprint": point["data_fingerprint"],
               "image_reader": READER_VERSION, **protocol, **scorer.compute()}
        if on_row is not None:
            on_row(row)
        return [row]


def require_image_shards(shards: Any, why: str,
                         fix: str = "set reference_shards (for FID/KID) or val_shards") -> None:
    """Raise ConfigError, saying `why` images are needed, when `shards` are latent shards (a manifest beside them);
    `fix` names the keys to set."""
    manifest = find_manifest(local_shards(shards), "val_shards", to_read=False)
    if manifest is not None:
        raise ConfigError(f"{why}, but the shards {shards[:2] if isinstance(shards, list) else shards} are latent "
                          f"shards (written by ldm-encode: {manifest.path}); {fix} to the image shards they were "
                          f"encoded from")


# --------------------------------------------------------------------------------------------------------------------
# Entry point.


def evaluate(cfg: DictConfig | dict | EvalConfig) -> list[dict[str, Any]]:
    """Evaluate every checkpoint or export of `cfg.ckpt_path` (each read once) and return the rows of the sweep: those
    appended to `<output_dir>/results.jsonl`, and those it held already (`skip_done`). Every rank returns the same
    rows; rank 0 alone writes files, prints and logs."""
    config = to_dataclass(EvalConfig, cfg)
    paths = resolve_checkpoints(config.ckpt_path)
    for path in paths:  # before any model is read
        check_export_weights(path, config.use_ema)
    evaluator = Evaluator(config, done_rows(config))
    if evaluator.rank == 0:
        rewrite_csv(config.output_dir)
    logger = WandbTable(config) if config.wandb.enabled and evaluator.rank == 0 else None
    rows: list[dict[str, Any]] = []
    pending: list[dict[str, Any]] = []  # the new rows of the checkpoint being evaluated
    checked: set[str] = set()

    def record(row: dict[str, Any]) -> None:  # each new row on disk as soon as it is scored
        pending.append(row)
        if evaluator.rank == 0:
            append_results(config.output_dir, [row])
            print_row(row)

    failed = True
    try:
        for path in paths:
            loaded = load_model(path, config.use_ema)
            if loaded.kind == "latent_diffusion":  # before the metrics' weights are sought (CLIP-L, 1.7 GB)
                check_conditioning_metrics(config.metrics, loaded.model.conditioner, path)
            if loaded.kind not in checked:  # before any image is generated, once per kind of model
                evaluator.clip_model = _check_weights(config, loaded.kind) or evaluator.clip_model
                checked.add(loaded.kind)
            if loaded.kind == "autoencoder":  # earlier rows (skip_done) included, as below
                new = evaluator.evaluate_reconstruction(loaded.model, loaded.info, on_row=record)
            else:
                new = evaluator.evaluate_generation(loaded.model, loaded.info, logger, on_row=record)
            del loaded
            rows.extend(new)
            pending.clear()
        failed = False
    finally:
        if logger is not None:  # an interrupted sweep's W&B run holds the rows scored before it stopped too
            logger.finish([*rows, *pending], exit_code=int(failed))
    return rows


def done_rows(cfg: EvalConfig) -> list[dict[str, Any]]:
    """The rows results.jsonl holds already (for `skip_done`), on rank 0, which decides for every rank
    (`Evaluator._done_row`): the other ranks need not see output_dir."""
    return read_results(cfg.output_dir) if cfg.skip_done and rank_and_world()[0] == 0 else []


TEXT_METRICS = ("clip_score", "shapes_color_accuracy")  # score the image against its caption's words
CONDITIONED_METRICS = ("shapes_shape_accuracy",)  # also a class model's, whose shapes labels name the caption's shape


def check_conditioning_metrics(metrics: Sequence[str], conditioner: object, checkpoint: Any) -> None:
    """Refuse metrics that score adherence to a condition the model does not read: caption metrics for a model
    without text, every adherence metric for an unconditional one."""
    uses_prompts = getattr(conditioner, "uses_prompts", True)
    reads_labels = getattr(conditioner, "reads_labels", False)
    refused = [m for m in metrics if m in TEXT_METRICS and not uses_prompts
               or m in CONDITIONED_METRICS and not (uses_prompts or reads_labels)]
    if refused:
        reads = "class labels only" if reads_labels else "no condition"
        kept = [m for m in metrics if m not in refused] or ["fid"]
        raise ConfigError(f"metrics {refused} score the images against their captions, but {checkpoint} reads "
                          f"{reads}: leave them out of metrics (metrics=[{','.join(kept)}])")


def check_shapes_prompts(metrics: Sequence[str], prompts: Sequence[str]) -> None:
    """Refuse a shapes metric when no prompt names what it reads (a colour, a shape of ldm-data's shapes vocabulary):
    the captions of other data scored 0, as if the model had missed every one."""
    reads = {"shapes_color_accuracy": (0, "colour"), "shapes_shape_accuracy": (1, "shape")}
    asked = [m for m in metrics if m in reads]
    if not asked:
        return
    from ldm.eval.shapes_adherence import parse_caption

    parsed = [parse_caption(prompt) for prompt in prompts]
    refused = [m for m in asked if all(words[reads[m][0]] is None for words in parsed)]
    if refused:
        named = " or ".join(dict.fromkeys(reads[m][1] for m in refused))
        raise ConfigError(f"metrics {refused} read the images of shapes captions (ldm-data source=shapes), but none "
                          f"of the {len(prompts)} prompts names a {named} of that vocabulary (the first: "
                          f"{_short(prompts[0] if prompts else '', 60)}): leave them out of metrics")


def _check_weights(cfg: EvalConfig, kind: str) -> Callable[[], tuple[Any, Any]] | None:
    """Fail before any image is made when the weights a metric needs cannot be had (offline, wrong path); returns
    the CLIP model, loaded to that end, for the CLIP score (None where no metric needs it)."""
    metrics = cfg.metrics if kind == "latent_diffusion" else cfg.reconstruction_metrics
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
        clip = clip_loader(cfg.clip_model)()  # loaded: a folder missing a part (a processor, a shard) fails now
        return lambda: clip
    return None
