"""What Lightning costs per step: `ldm-train`'s training step against a plain PyTorch loop doing the same work.

    python benchmarks/lightning_overhead.py              # CPU, 2 threads, the quickstart model (random weights)
    python benchmarks/lightning_overhead.py --breakdown  # also Lightning without the progress bar, without loggers,
                                                         # and with no callbacks, to see where an overhead goes

Both sides train one `LatentDiffusionModule` built from `experiment=quickstart_ldm` (its UNet, frozen KL-f2
autoencoder and frozen byte text encoder, random weights written to a temp dir; `channels_last` as configured) on the
same in-memory batches of `shapes` images (one DataLoader over pre-built batches, no decoding on either side).

- Lightning: a `lightning.Trainer` built as `ldm-train` builds it (the experiment's trainer, callbacks and CSV
  logger: checkpointing, RNG state, NaN guard, SLURM requeue, rich progress bar, LR monitor, throughput), `fit` on
  the batches. A step is the time between two `on_train_batch_start` calls: everything Lightning does per step.
- Plain: `module._loss(batch, step_generator(...), module.pipeline)`, backward, gradient clipping as the trainer's
  `gradient_clip_val`, AdamW step, LR scheduler step, `module.ema.update_parameters`; a step is the time between the
  starts of two iterations.

Segments of `--steps` steps alternate (L P P L L P ...), so both sides see the same machine load; the first
`--warmup` steps of each segment are left out (Lightning's first step also counts FLOPs). The figure is the ratio of
the median step times; its excess over 1 is Lightning's overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from common import experiment, random_autoencoder, random_byte_text_encoder
from omegaconf import DictConfig

from ldm import config as configs
from ldm.cli.train import apply_module_switches, build_trainer, instantiate_callbacks, instantiate_loggers
from ldm.data.shapes import ShapesDataset
from ldm.modules.optim import fusable, lr_scheduler
from ldm.seeding import step_generator


class Batches(torch.utils.data.Dataset):
    """Pre-built batches, served as they are (DataLoader with batch_size=None), cycled `length` times in all."""

    def __init__(self, batches: list[dict[str, Any]], length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batches[index % len(self.batches)]


def shapes_batches(count: int, batch_size: int, resolution: int) -> list[dict[str, Any]]:
    """`count` batches of shapes images (B, 3, H, W) in [-1, 1] with their captions."""
    data = ShapesDataset(count * batch_size, resolution, seed=0)
    batches = []
    for b in range(count):
        samples = [data[b * batch_size + i] for i in range(batch_size)]
        images = np.stack([np.asarray(s["image"], dtype=np.float32) for s in samples])   # (B, H, W, 3) in [0, 255]
        image = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0  # (B, 3, H, W)
        batches.append({"image": image, "caption": [s["caption"] for s in samples]})
    return batches


class StepTimer(L.Callback):
    """Wall time between consecutive `on_train_batch_start` calls, and the modules' train/eval modes in a step."""

    def __init__(self):
        self.starts: list[float] = []
        self.modes: list[bool] | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())
        if self.modes is None:
            self.modes = [m.training for m in pl_module.modules()]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.starts.append(time.perf_counter())  # closes the last step (its batch-end hooks included)


def lightning_segment(cfg: DictConfig, module: L.LightningModule, loader: torch.utils.data.DataLoader, steps: int,
                      variant: str = "ldm-train") -> tuple[list[float], list[bool]]:
    """Step times of one `trainer.fit` of `steps` steps, built as ldm-train builds it (or a stripped `variant`)."""
    timer = StepTimer()
    callbacks = [] if variant == "no callbacks" else instantiate_callbacks(cfg.get("callbacks"))
    if variant == "no progress bar":
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    loggers = [] if variant in ("no loggers", "no callbacks") else instantiate_loggers(cfg.get("logger"))
    if not loggers:  # the LR monitor refuses a trainer without a logger
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    overrides = {"max_steps": steps, "enable_model_summary": False}
    if variant == "no callbacks":
        overrides["enable_checkpointing"] = False
    trainer = build_trainer(cfg, [*callbacks, timer], loggers, **overrides)
    trainer.fit(module, train_dataloaders=loader)
    return list(np.diff(timer.starts)), timer.modes


def plain_segment(cfg: DictConfig, module: L.LightningModule, loader: torch.utils.data.DataLoader, steps: int,
                  modes: list[bool]) -> list[float]:
    """Step times of a plain loop: the module's loss, backward, clipping, AdamW, LR scheduler, EMA."""
    c = module.config
    for m, training in zip(module.modules(), modes, strict=True):
        m.training = training  # the train/eval modes Lightning's steps ran with
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay,
                                  fused=fusable(params))  # as LatentDiffusionModule.configure_optimizers
    scheduler = lr_scheduler(optimizer, c.lr_schedule, c.warmup_steps, steps, c.lr_decay_steps)
    clip = cfg.trainer.get("gradient_clip_val")
    starts = []
    for step, batch in enumerate(loader):
        if step == steps:
            break
        starts.append(time.perf_counter())
        generator = step_generator(c.seed, 0, step, module.device)
        loss = module._loss(batch, generator, module.pipeline)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if module.ema is not None:
            module.ema.update_parameters(module.pipeline.unet)
    starts.append(time.perf_counter())
    return list(np.diff(starts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="L P P L rounds: 2 segments of each side per round")
    parser.add_argument("--steps", type=int, default=25, help="steps per segment")
    parser.add_argument("--warmup", type=int, default=3, help="steps left out at the start of each segment")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time Lightning without the progress bar, without loggers (and LR monitor), with "
                             "no callbacks")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "lightning-overhead-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        autoencoder, text = random_autoencoder(root, "quickstart_vae", 1.0), random_byte_text_encoder(root)
        cfg = experiment("quickstart_ldm", [f"model.autoencoder_path={autoencoder}",
                                            f"model.conditioner.name_or_path={text}",
                                            f"paths.output_dir={root / 'run'}", "trainer.val_check_interval=100000"])
        module = configs.instantiate(cfg.model, "model")
        apply_module_switches(module, cfg)
        batches = shapes_batches(8, cfg.data.batch_size, cfg.data.resolution)
        loader = torch.utils.data.DataLoader(Batches(batches, args.steps), batch_size=None, num_workers=0)

        variants = ["ldm-train", "plain"]
        if args.breakdown:
            variants[1:1] = ["no progress bar", "no loggers", "no callbacks"]
        times: dict[str, list[float]] = {v: [] for v in variants}
        modes = lightning_segment(cfg, module, loader, args.warmup + 1)[1]  # warm-up; learns the modules' modes
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for order in (variants, variants[::-1]):
                for variant in order:
                    if variant == "plain":
                        step_times = plain_segment(cfg, module, loader, args.steps, modes)
                    else:
                        step_times = lightning_segment(cfg, module, loader, args.steps, variant)[0]
                    times[variant] += step_times[args.warmup:]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} {statistics.median(t) * 1e3:.1f} ms" for v, t in times.items()), flush=True)
        load_after = os.getloadavg()

    plain = statistics.median(times["plain"])
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "lightning": L.__version__, "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "batch_size": cfg.data.batch_size, "steps_per_side": len(times["plain"]),
              "load_average_before": load_before, "load_average_after": load_after,
              "median_step_s": {v: statistics.median(t) for v, t in times.items()},
              "ratio_to_plain": {v: statistics.median(t) / plain for v, t in times.items()},
              "step_s": times}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; {len(times['plain'])} steps per side")
    print("| loop | median step (ms) | / plain |\n| --- | --- | --- |")
    for v in variants:
        print(f"| {v} | {result['median_step_s'][v] * 1e3:.1f} | **{result['ratio_to_plain'][v]:.3f}** |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
