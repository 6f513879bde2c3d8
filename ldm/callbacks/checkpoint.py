"""Checkpoints that are never torn and never overwritten by a failing run.

`AtomicCheckpointIO` is the Trainer's CheckpointIO plugin: every checkpoint Lightning writes (periodic, `last.ckpt`,
the requeue checkpoint) goes through `ldm.io.atomic_open` (temporary file in the target directory, fsync,
`os.replace`), so a reader sees either the old file or the new one, never half of one.

`Checkpoint` is Lightning's ModelCheckpoint that refuses to save once any callback has `halted` the run (the NaN
guard after K non-finite steps): the error path keeps the last good `last.ckpt` instead of overwriting it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.data import extract_batch_size
from typing_extensions import override

from ldm.io import atomic_open


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save straight into `atomic_open(path)`: a checkpoint file is never half-written, and never buffered
    whole in memory first."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


def run_halted(trainer: L.Trainer) -> bool:
    """True once a callback has stopped the run because it went wrong (it sets `halted = True`)."""
    return any(getattr(callback, "halted", False) for callback in trainer.callbacks)


class Checkpoint(ModelCheckpoint):
    """ModelCheckpoint that writes nothing after the run was halted (see `run_halted`); otherwise identical.

    `save_last: true` makes `last.ckpt` a real file written through the Trainer's CheckpointIO (atomic), not a link.
    Every checkpoint also carries, under "ldm", `run_info` (ldm-train sets the package version and resolved config)
    and `samples_seen`: training samples consumed over all ranks, counted batch by batch (restored on resume).
    """

    run_info: dict[str, Any] | None = None
    samples_seen: int = 0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # note: counted before the periodic save below, so a checkpoint includes its own step's batch
        self.samples_seen += extract_batch_size(batch) * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["ldm"] = {**(self.run_info or {}), "samples_seen": self.samples_seen}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "samples_seen": self.samples_seen}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.samples_seen = int(state_dict.get("samples_seen", 0))

    @override
    def _save_topk_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not run_halted(trainer):
            super()._save_topk_checkpoint(trainer, monitor_candidates)

    @override
    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if not run_halted(trainer):
            super()._save_last_checkpoint(trainer, monitor_candidates)

    def save_last_now(self, trainer: L.Trainer) -> Path:
        """Write `last.ckpt` at this point (a requeue or a stop outside the periodic schedule); returns its path."""
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return Path(self.last_model_path)
