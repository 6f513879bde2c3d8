"""Log image grids every N training steps (CompVis' ImageLogger pattern), for any module with `log_images`.

The module returns `{name: images (B, C, H, W) in [-1, 1]}` from `log_images(batch)`; each entry becomes one grid,
written as a PNG under `save_dir/<split>/<name>_step0001000.png` and sent to W&B when a WandbLogger is attached.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy

from ldm.callbacks.step_boundary import StepBoundary
from ldm.callbacks.throughput import paused
from ldm.config import ConfigError, is_int
from ldm.images import make_grid, write_png
from ldm.nn import eval_mode

log = logging.getLogger(__name__)


class ImageLogger(StepBoundary):
    """Calls `pl_module.log_images(batch)` on rank zero (on every rank under FSDP) every `every_n_steps` optimizer
    steps and on the first validation batch. A grid that fails (out of memory, a full disk) is a warning: the run goes
    on.

    Args:
        save_dir: where the PNGs go (the train configs use `${paths.output_dir}/images`).
        every_n_steps: training steps between grids; 0 turns training grids off.
        log_on_validation: also log the first batch of each validation run.
        nrow: images per grid row.
    """

    def __init__(self, save_dir: str, every_n_steps: int = 500, log_on_validation: bool = True, nrow: int = 8):
        super().__init__()
        if not is_int(every_n_steps) or every_n_steps < 0:  # null crashed the run at its first step
            raise ConfigError(f"callbacks.image_logger.every_n_steps={every_n_steps!r} must be a whole number of steps "
                              f">= 0 (0: no training grids)")
        if not is_int(nrow) or nrow < 1:
            raise ConfigError(f"callbacks.image_logger.nrow={nrow!r} must be a whole number of images per row >= 1")
        if not isinstance(log_on_validation, bool):
            raise ConfigError(f"callbacks.image_logger.log_on_validation={log_on_validation!r} must be true or false")
        self.save_dir = Path(save_dir)
        self.every_n_steps = every_n_steps
        self.log_on_validation = log_on_validation
        self.nrow = nrow

    def log_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, split: str) -> None:
        """Write (and send to W&B) the grids of `batch`; a failure is logged as a warning, not raised."""
        try:
            with paused(trainer), eval_mode(pl_module):
                self._log_batch(trainer, pl_module, batch, split)
        except Exception as err:  # noqa: BLE001 -- a picture must never stop a training run
            log.warning("image logger: no %s grids at step %d (%s: %s)", split, trainer.global_step,
                        type(err).__name__, err)

    def _log_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, split: str) -> None:
        # note: under FSDP the networks are sharded, so every rank runs them (each forward gathers the shards) and
        # rank zero writes; otherwise rank zero alone runs them.
        sharded = isinstance(trainer.strategy, FSDPStrategy)
        if not hasattr(pl_module, "log_images") or not (trainer.is_global_zero or sharded):
            return
        with torch.no_grad():
            images = pl_module.log_images(batch)
        if not trainer.is_global_zero or trainer.fast_dev_run:  # a wiring check makes the grids, writes nothing
            return

        step = trainer.global_step
        out = self.save_dir / split
        out.mkdir(parents=True, exist_ok=True)
        grids = {name: make_grid(x, self.nrow) for name, x in images.items()}
        for name, grid in grids.items():
            write_png(grid, out / f"{name}_step{step:07d}.png")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{split}/images", images=[g.permute(1, 2, 0).numpy() for g in grids.values()],
                                 caption=list(grids), step=step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.every_n_steps > 0 and self.stepped(trainer) and trainer.global_step % self.every_n_steps == 0:
            self.log_batch(trainer, pl_module, batch, "train")

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if self.log_on_validation and batch_idx == 0 and not trainer.sanity_checking:
            self.log_batch(trainer, pl_module, batch, "val")
