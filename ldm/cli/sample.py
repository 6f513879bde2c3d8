"""ldm-sample: generate images from a latent diffusion pipeline; one PNG per image, a grid and a run record.

    ldm-sample ckpt_path=runs/ldm/export prompts='[a red circle, a blue square]' output_dir=samples
    ldm-sample ckpt_path=runs/ldm/checkpoints/last.ckpt prompts='[a red circle, a blue square]' output_dir=samples
    ldm-sample ckpt_path=C prompts_file=prompts.txt sampler=dpmpp_2m num_steps=25 guidance_scale=4 \
               num_images_per_prompt=4 seed=100 batch_size=16 device=cuda

Image j of prompt i uses seed `seed + i * num_images_per_prompt + j`, so every image depends on its own seed only,
never on the batch size or device count. `ckpt_path` is an exported pipeline (`<run>/export`, written at the end of
training), a run directory, or a checkpoint: each alone is enough, the frozen autoencoder is inside.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ldm.cli.common import CONF_DIR, cli_entry, run_cli
from ldm.config import (
    ConfigError,
    asdict,
    check_choice,
    check_output_dir,
    expand_home,
    is_int,
    register_schemas,
    to_dataclass,
)
from ldm.diffusion.sampling import SAMPLERS, check_eta
from ldm.distributed import choose_device
from ldm.images import make_grid, to_uint8, write_png
from ldm.io import atomic_write_text, read_lines
from ldm.pipeline import LatentDiffusionPipeline
from ldm.seeding import check_seeds

log = logging.getLogger(__name__)

GRID_NAME, RECORD_NAME = "grid.png", "sample.json"
GRID_PROMPTS = 32  # grid.png shows the first prompts' images, one row each (a run of 10k prompts would be 10k rows)


@dataclass
class SampleConfig:
    """What `ldm-sample` runs (conf/sample.yaml documents every key)."""

    ckpt_path: str = ""                        # required: a pipeline export (<run>/export), run dir or .ckpt
    prompts: Any = field(default_factory=list)  # text-conditioned models: a list of prompts (or one); or prompts_file
    prompts_file: str | None = None            # one prompt per line (blank lines skipped)
    class_labels: Any = None                   # class-conditional models: the labels (prompts, if given, name them)
    negative_prompt: str | None = None         # what guidance steers every image away from; null: the empty prompt
    sampler: str = "ddim"                      # ddpm | ddim | dpmpp_2m
    num_steps: int = 50
    guidance_scale: float = 5.0                # classifier-free guidance; 1.0 is the plain conditional model
    eta: float = 0.0                           # DDIM's noise (0: deterministic)
    seed: int = 0                              # image k of the run uses seed + k
    num_images_per_prompt: int = 1
    batch_size: int = 8                        # images per forward pass; images do not depend on it (to +-1 of 255)
    output_dir: str = ""                       # required: PNGs, grid.png and sample.json go here
    overwrite: bool = False                    # replace the samples an earlier run left in output_dir
    device: str = "auto"                       # auto | cpu | cuda | cuda:N
    use_ema: bool = True                       # a .ckpt's EMA weights (false: the raw ones); an export its own
    image_size: int | None = None              # pixels; null: the resolution the model was trained at

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        if not self.ckpt_path:
            raise ConfigError("ckpt_path is required: a latent diffusion checkpoint, e.g. "
                              "ckpt_path=runs/ldm/checkpoints/last.ckpt")
        if not self.output_dir:
            raise ConfigError("output_dir is required: where the images go, e.g. output_dir=runs/samples")
        self.output_dir = check_output_dir("output_dir", self.output_dir)
        self.ckpt_path, self.prompts_file = expand_home(self.ckpt_path), expand_home(self.prompts_file)
        if isinstance(self.prompts, str):  # prompts=a red circle: one prompt (a list needs brackets); an empty
            self.prompts = [self.prompts] if self.prompts.strip() else []  # one (a shell variable unset): none
        if not isinstance(self.prompts, (list, tuple)) or \
                not all(isinstance(p, (str, int, float)) and not isinstance(p, bool) for p in self.prompts):
            raise ConfigError(f"prompts={self.prompts!r} must be a list of prompts, e.g. prompts='[a red circle, a "
                              f"blue square]' (or one: prompts='a red circle')")
        if is_int(self.class_labels):
            self.class_labels = [self.class_labels]  # class_labels=2: one label (a list needs brackets)
        if self.class_labels is not None and (not isinstance(self.class_labels, (list, tuple)) or
                                              not all(map(is_int, self.class_labels))):
            raise ConfigError(f"class_labels={self.class_labels!r} must be a list of class indices, e.g. "
                              f"class_labels='[0, 3]' (or one: class_labels=2)")
        if self.prompts and self.prompts_file:
            raise ConfigError("give one of prompts='[a red circle, a blue square]' and prompts_file=FILE, not both "
                              f"(got prompts={self.prompts}, prompts_file={self.prompts_file})")
        for key in ("num_steps", "num_images_per_prompt", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.guidance_scale < math.inf:  # NaN too
            raise ConfigError(f"guidance_scale={self.guidance_scale} must be a finite number >= 0 (1.0: the "
                              f"conditional model alone, larger: stronger guidance)")
        if not 0 <= self.eta < math.inf:
            raise ConfigError(f"eta={self.eta} must be a finite number >= 0 (0: deterministic DDIM, "
                              f"1: DDPM-like noise)")
        check_eta(self.sampler, self.eta)
        if self.image_size is not None and self.image_size < 1:
            raise ConfigError(f"image_size={self.image_size} must be >= 1 (or null: the training resolution)")


register_schemas("sample")  # conf/sample.yaml extends SampleConfig: stored before Hydra composes


def read_prompts(config: SampleConfig) -> list[str]:
    if not config.prompts_file:
        return [str(p) for p in config.prompts]
    path = Path(config.prompts_file)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"prompts_file={path} {what}; give a text file with one prompt per line")
    prompts = read_lines(path, "prompts_file")
    if not prompts:
        raise ConfigError(f"prompts_file={path} holds no prompts")
    return prompts


def check_class_labels(config: SampleConfig, pipeline: LatentDiffusionPipeline) -> None:
    """class_labels for a class-conditional model (within its classes), none for any other."""
    conditioner = pipeline.conditioner_config
    if conditioner.kind != "class":
        if config.class_labels is not None:
            raise ConfigError(f"class_labels={config.class_labels} given, but {config.ckpt_path} is not "
                              f"class-conditional (model.conditioner.kind={conditioner.kind}); leave class_labels out")
        return
    n = conditioner.num_classes
    if not config.class_labels:
        raise ConfigError(f"{config.ckpt_path} is class-conditional ({n} classes): give class_labels=[...], one "
                          f"row of images per label, each in [0, {n - 1}] ({n}: the null class, unconditional "
                          f"samples)")
    bad = [label for label in config.class_labels if not 0 <= label <= n]
    if bad:
        raise ConfigError(f"class_labels={config.class_labels}: {bad} outside [0, {n}] ({n} classes; {n}: the null "
                          f"class)")


def read_rows(config: SampleConfig, pipeline: LatentDiffusionPipeline, prompts: list[str]) -> list[str]:
    """The prompt of each row of images (num_images_per_prompt seeds each): a text-conditioned model's `prompts`
    (`read_prompts`); a class-conditional model's labels, named by the prompts when given; one row (no prompt) of an
    unconditional model."""
    conditioner = pipeline.conditioner
    check_class_labels(config, pipeline)
    if conditioner.uses_prompts:
        if not prompts:
            raise ConfigError(f"{config.ckpt_path} is text-conditioned: give prompts='[a red circle, a blue square]' "
                              f"or prompts_file=FILE")
        return prompts
    if conditioner.reads_labels:
        if not prompts:
            return [f"class {label}" for label in config.class_labels]
        if len(prompts) != len(config.class_labels):
            raise ConfigError(f"class_labels has {len(config.class_labels)} entries for {len(prompts)} prompts (the "
                              f"prompts name the labels' rows: give one per label, or leave them out)")
        return prompts
    if prompts:
        raise ConfigError(f"{config.ckpt_path} is unconditional: it reads no prompts; leave prompts and prompts_file "
                          f"out (it generates num_images_per_prompt={config.num_images_per_prompt} images)")
    return [""]


def sample(cfg: DictConfig | dict[str, Any] | SampleConfig) -> list[Path]:
    """Generate every image of `cfg`; return the paths of the per-image PNGs (grid.png and sample.json beside them)."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict):
        cfg = {k: v for k, v in cfg.items() if k != "hydra"}
    config = to_dataclass(SampleConfig, cfg)
    prompts = read_prompts(config)  # a missing prompts_file fails before the checkpoint is read
    device = choose_device(config.device)
    pipeline = LatentDiffusionPipeline.from_pretrained(config.ckpt_path, use_ema=config.use_ema).to(device)
    pipeline.schedule.check_num_steps(config.num_steps, "num_steps")
    if config.image_size is not None:
        pipeline.check_image_size(config.image_size)
    prompts = read_rows(config, pipeline, prompts)
    if not pipeline.conditioner.conditional and config.guidance_scale != 1.0:
        log.warning("guidance_scale=%g: %s is unconditional, so guidance has nothing to steer by (every scale gives "
                    "the same images); sampled once, as at 1.0", config.guidance_scale, config.ckpt_path)
        config = dataclasses.replace(config, guidance_scale=1.0)  # what sample.json records
    if config.negative_prompt is not None and not pipeline.conditioner.uses_prompts:
        raise ConfigError(f"negative_prompt={config.negative_prompt!r} applies to text-conditioned models; "
                          f"{config.ckpt_path} reads no prompts: leave it null")
    k = config.num_images_per_prompt
    check_seeds("seed", config.seed, len(prompts) * k)  # before any image is written
    out = Path(config.output_dir)
    earlier = [*out.glob("prompt*_seed*.png"), *(out / n for n in (GRID_NAME, RECORD_NAME) if (out / n).exists())]
    if earlier and not config.overwrite:
        raise ConfigError(f"output_dir={out} holds the samples of an earlier run ({len(earlier)} files, e.g. "
                          f"{earlier[0].name}); choose another output_dir, or pass overwrite=true to replace them")
    for path in earlier:  # none of them mixes with this run's
        path.unlink()
    out.mkdir(parents=True, exist_ok=True)

    jobs = [(i, j, config.seed + i * k + j) for i in range(len(prompts)) for j in range(k)]  # (prompt, copy, seed)
    rows = "prompts" if pipeline.conditioner.uses_prompts else "labels" if pipeline.conditioner.reads_labels else \
        "row (unconditional)"
    log.info("%d %s x %d images, sampler %s, %d steps, guidance %.2f, seeds %d..%d, device %s",
             len(prompts), rows, k, config.sampler, config.num_steps, config.guidance_scale, jobs[0][2], jobs[-1][2],
             device)

    start = time.perf_counter()
    shown: list[torch.Tensor] = []  # uint8 images of the first GRID_PROMPTS prompts, for grid.png
    paths: list[Path] = []
    non_finite = 0
    for b in range(0, len(jobs), config.batch_size):
        batch = jobs[b: b + config.batch_size]
        labels = None if config.class_labels is None else [config.class_labels[i] for i, _, _ in batch]
        with torch.no_grad():
            x = pipeline.generate([prompts[i] for i, _, _ in batch], [s for _, _, s in batch], sampler=config.sampler,
                                  num_steps=config.num_steps, guidance_scale=config.guidance_scale,
                                  class_labels=labels, eta=config.eta, image_size=config.image_size,
                                  negative_prompts=None if config.negative_prompt is None else
                                  [config.negative_prompt] * len(batch))         # (B, 3, H, W) in [-1, 1]
        for (i, _, seed), image in zip(batch, x.cpu()):
            if not torch.isfinite(image).all():
                non_finite += 1
            path = out / f"prompt{i:03d}_seed{seed:06d}.png"
            pixels = to_uint8(image)                                            # (3, H, W)
            write_png(pixels, path)
            paths.append(path)
            if i < GRID_PROMPTS:
                shown.append(pixels)
    seconds = time.perf_counter() - start
    if non_finite:
        log.warning("%d of %d images hold NaN or infinite values (saved as black or clipped pixels): the model or its "
                    "precision diverged", non_finite, len(paths))

    grid = make_grid(torch.stack(shown).float() / 127.5 - 1, nrow=k)  # rows = prompts (the first GRID_PROMPTS)
    write_png(grid, out / GRID_NAME)
    record = {"config": asdict(config), "checkpoint": str(Path(config.ckpt_path).absolute()),  # the config's as typed
              "prompts": prompts, "seeds": [s for _, _, s in jobs],
              "files": [p.name for p in paths], "seconds": round(seconds, 2), "device": str(device),
              "checkpoint_step": pipeline.provenance["step"], "weights": pipeline.provenance["weights"]}
    atomic_write_text(json.dumps(record, indent=2), out / RECORD_NAME)
    log.info("wrote %d images, %s and %s in %.1f s", len(paths), out / GRID_NAME, out / RECORD_NAME, seconds)
    return paths


@cli_entry
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_cli("ldm-sample", lambda: sample(cfg), kept="the finished batches' images are in output_dir, without "
                                                      "grid.png and sample.json; the same command with "
                                                      "overwrite=true starts again", sigterm=True)


if __name__ == "__main__":
    main()
