"""What Lightning costs per step: `ldm-train`'s training step against a plain PyTorch loop doing the same work.

    python benchmarks/lightning_overhead.py              # CPU, 2 threads, the quickstart model (random weights)
    python benchmarks/lightning_overhead.py --breakdown  # also Lightning without the progress bar, without loggers,
                                                         # and with no callbacks, to see where an overhead goes

Both sides train one `LatentDiffusionModule` built from `experiment=quickstart_ldm` (its UNet, frozen KL-f2
autoencoder and frozen byte text encoder, random weights written to a temp dir; `channels_last` as configured) on the
same in-memory batches of `shapes` images (one DataLoader over pre-built batches, no decoding on either side).

- Lightning: a `lightning.Trainer` built as `ldm-train` builds it (the experiment's trainer, callbacks and CSV
  logger: checkpointing, RNG state, NaN guard, SLURM requeue, rich progress bar, LR monitor, throughput), `fit` on
  the batches. A step is the time between two `on_train_batch_start` calls, less the plain step run in between:
  everything Lightning does per step.
- Plain: `module._loss(batch, step_generator(...), module.pipeline)`, backward, gradient clipping as the trainer's
  `gradient_clip_val`, AdamW step, LR scheduler step, `module.ema.update_parameters`, with an optimizer of its own.

The two alternate step by step inside one `fit`: after each Lightning step a callback (the last one, so after every
batch-end hook that counts for Lightning) runs one timed plain step on the same batch. Each pair of steps is a few
hundred milliseconds apart, so a change in the machine's load moves both sides alike; the figure is the median of the
pairs' ratios (Lightning / plain) over `--rounds` fits of `--steps` steps per variant, the first `--warmup` steps of
each fit left out (Lightning's first step also counts FLOPs). Its excess over 1 is Lightning's overhead. (Work on
other threads, the rich bar's redraws, lands on whichever side it interrupts, so the bar's cost is measured halved.)
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
from arguments import non_negative_int, output_file, positive_int
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


class PlainLoop:
    """The plain PyTorch loop's step on the module: loss, backward, clipping, AdamW, LR scheduler, EMA."""

    def __init__(self, cfg: DictConfig, module: L.LightningModule, total_steps: int):
        c = self.config = module.config
        self.module = module
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay,
                                           fused=fusable(self.params))  # as LatentDiffusionModule.configure_optimizers
        self.scheduler = lr_scheduler(self.optimizer, c.lr_schedule, c.warmup_steps, total_steps, c.lr_decay_steps)
        self.clip = cfg.trainer.get("gradient_clip_val")
        self.steps = 0

    def step(self, batch: dict[str, Any]) -> float:
        """One step on `batch`; its wall time in seconds."""
        start = time.perf_counter()
        module = self.module
        generator = step_generator(self.config.seed, 0, self.steps, module.device)
        loss = module._loss(batch, generator, module.pipeline)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if module.ema is not None:
            module.ema.update_parameters(module.pipeline.unet)
        self.steps += 1
        return time.perf_counter() - start


class Interleave(L.Callback):
    """Time Lightning's steps (between two `on_train_batch_start` calls) and, at each batch's end, run one plain step
    on the same batch, in the modules' modes as Lightning left them, timed apart."""

    def __init__(self, plain: PlainLoop):
        self.plain = plain
        self.starts: list[float] = []
        self.plain_times: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.plain_times.append(self.plain.step(batch))

    def pairs(self) -> list[tuple[float, float]]:
        """(Lightning, plain) step times, one pair per step but the last, which no next step closes (closed at the end
        of training, it took in the final checkpoint and export: 1.2-1.5x the others)."""
        return [(t - p, p) for t, p in zip(np.diff(self.starts), self.plain_times[:-1], strict=True)]


def interleaved_fit(cfg: DictConfig, module: L.LightningModule, loader: torch.utils.data.DataLoader, steps: int,
                    variant: str = "ldm-train") -> list[tuple[float, float]]:
    """(Lightning, plain) step times of one `trainer.fit` of `steps` steps, built as ldm-train builds it (or a
    stripped `variant`), with a plain step after each of its steps."""
    interleave = Interleave(PlainLoop(cfg, module, steps))
    callbacks = [] if variant == "no callbacks" else instantiate_callbacks(cfg.get("callbacks"))
    if variant == "no progress bar":
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.ProgressBar)]
    loggers = [] if variant in ("no loggers", "no callbacks") else instantiate_loggers(cfg.get("logger"))
    if not loggers:  # the LR monitor refuses a trainer without a logger
        callbacks = [c for c in callbacks if not isinstance(c, L.pytorch.callbacks.LearningRateMonitor)]
    overrides = {"max_steps": steps, "enable_model_summary": False}
    if variant == "no callbacks":
        overrides["enable_checkpointing"] = False
    trainer = build_trainer(cfg, [*callbacks, interleave], loggers, **overrides)
    trainer.fit(module, train_dataloaders=loader)
    return interleave.pairs()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--rounds", type=positive_int, default=3, help="fits per variant (variants alternate)")
    parser.add_argument("--steps", type=int, default=25,
                        help="Lightning steps per fit (a plain one after each; the last is not timed)")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="steps left out at the start of each fit")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time Lightning without the progress bar, without loggers (and LR monitor), with "
                             "no callbacks")
    parser.add_argument("--output", type=output_file,
                        default=str(Path(__file__).parent / "results" / "lightning-overhead-cpu.json"))
    args = parser.parse_args()
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps {args.steps} must be more than --warmup {args.warmup} + 1 (the steps timed are those "
                     f"after the warm-up, but the last)")
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

        variants = ["ldm-train"]
        if args.breakdown:
            variants += ["no progress bar", "no loggers", "no callbacks"]
        pairs: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
        interleaved_fit(cfg, module, loader, args.warmup + 1)  # warm-up
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else variants[::-1]:
                pairs[variant] += interleaved_fit(cfg, module, loader, args.steps, variant)[args.warmup:]
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{v} {statistics.median(a / b for a, b in p):.3f}" for v, p in pairs.items()), flush=True)
        load_after = os.getloadavg()

    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
              "lightning": L.__version__, "machine": platform.processor() or platform.machine(),
              "threads": args.threads, "batch_size": cfg.data.batch_size, "pairs_per_variant": len(pairs[variants[0]]),
              "load_average_before": load_before, "load_average_after": load_after,
              "ratio_to_plain": {v: statistics.median(a / b for a, b in p) for v, p in pairs.items()},
              "median_step_s": {v: {"lightning": statistics.median(a for a, _ in p),
                                    "plain": statistics.median(b for _, b in p)} for v, p in pairs.items()},
              "step_s": {v: {"lightning": [a for a, _ in p], "plain": [b for _, b in p]} for v, p in pairs.items()}}
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; {result['pairs_per_variant']} pairs per variant")
    print("| Lightning | median step (ms) | plain steps beside it (ms) | median of the pairs' ratios |\n"
          "| --- | --- | --- | --- |")
    for v in variants:
        step = result["median_step_s"][v]
        print(f"| {v} | {step['lightning'] * 1e3:.1f} | {step['plain'] * 1e3:.1f} | "
              f"**{result['ratio_to_plain'][v]:.3f}** |")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
