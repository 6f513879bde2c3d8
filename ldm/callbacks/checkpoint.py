"""Checkpoints written only at step boundaries, never torn, never duplicated, never written by a failing run.

`AtomicCheckpointIO` is the Trainer's CheckpointIO plugin: every checkpoint goes through `ldm.io.atomic_open`
(temporary file in the target directory, fsync, `os.replace`), so a reader sees either the old file or the new one.

`Checkpoint` is our own checkpoint callback on Lightning's public `Checkpoint` base (not ModelCheckpoint, whose
behaviour could only be changed through private methods). It writes

  periodic    `step{step:07d}.ckpt` every `every_n_train_steps` steps, at the end of that step's batch, or after
              that step's validation when the schedule holds one (a run resumed from a file written before it
              skipped that validation: its metrics, grids and stage 1's latent statistics were lost; Lightning's
              ModelCheckpoint saves before it);
  validation  the same file at the end of each validation instead, when `every_n_train_steps` is null (so the
              checkpoint holds what that validation measured, e.g. the autoencoder's latent statistics); a
              validation inside an accumulation group (its step's gradients half summed) saves at the end of the
              batch that completes the step;
  epoch end   the same file at the end of each training epoch, with `save_on_train_epoch_end: true`;
  final step  `last.ckpt` at the end of the batch that reaches `trainer.max_steps` (or the last batch of the last
              epoch), or after which a callback stopped the run (`should_stop`: `trainer.max_time`, EarlyStopping),
              while the fit loop still stands inside that epoch; Lightning's own end-of-run save comes later, in
              `on_train_end`, after the loop has counted the epoch as finished, and a run resumed from such a file
              skipped the rest of the epoch;
  on request  `last.ckpt` from `save_last_now` (the preemption callback in `ldm.slurm`, at a step boundary).

`last.ckpt` is rewritten with every checkpoint (a hard link to the periodic file when the file system has them), so
it always holds the newest state. File names carry no version suffix: a step written twice (a run resumed from an
older checkpoint) replaces the earlier file. Nothing is written once any callback has `halted` the run (the NaN guard
after K non-finite steps) and nothing on exceptions, so an error path keeps the last good `last.ckpt`.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint as CheckpointBase
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ldm.callbacks.step_boundary import StepBoundary, final_batch, validation_due
from ldm.callbacks.throughput import batch_size_of
from ldm.config import ConfigError, is_int
from ldm.io import atomic_open, is_export

LAST_NAME = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save straight into `atomic_open(path)`: a checkpoint file is never half-written, and never buffered
    whole in memory first."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}")
        with atomic_open(path) as f:
            torch.save(checkpoint, f)


def run_halted(trainer: L.Trainer) -> bool:
    """True once a callback has stopped the run because it went wrong (it sets `halted = True`)."""
    return any(getattr(callback, "halted", False) for callback in trainer.callbacks)


def stopped_without_export(trainer: L.Trainer) -> bool:
    """True when the run ends without its export: the NaN guard halted it (the export would replace the one an earlier
    segment finished with the weights of a diverged run), or a signal stopped it before its last step (a part-trained
    model looks finished in an export, and writing it costs the grace time; the resumed run exports at its end), or
    the run was `fast_dev_run`'s wiring check (a batch or two), or the fit trained no batch (a finished run resumed:
    its export, written again under this command's settings, another prediction type say, would no longer match the
    weights; without one, it is written). A module's `on_fit_end` then leaves `<run>/export` as it was."""
    if trainer.fast_dev_run:
        rank_zero_info("fast_dev_run: no export (a wiring check, not a trained model)")
        return True
    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, Checkpoint)), None)
    export = Path(trainer.default_root_dir) / "export"
    if checkpoint is not None and not checkpoint.trained_in_fit and is_export(export):  # (a torn one is written)
        rank_zero_info(f"this fit trained no step (it resumed at step {trainer.global_step}): {export} stays as the "
                       f"earlier segment wrote it")
        return True
    if run_halted(trainer):
        rank_zero_warn(f"the run was halted at step {trainer.global_step}: {trainer.default_root_dir}/export is left "
                       f"as it was (the checkpoints hold the run)")
        return True
    if (received := run_interrupted(trainer)) is not None:
        rank_zero_info(f"{received.name} stopped the run at step {trainer.global_step}: no export (the same command "
                       f"resumes it and exports at its end)")
        return True
    return False


def stopping(trainer: L.Trainer, epoch_ended: bool = False) -> bool:
    """Whether the fit loop stops at this batch's end (or, `epoch_ended`, at this epoch's end, which the loop has
    counted already) on `should_stop` (a callback's: the Timer of `trainer.max_time`, EarlyStopping): Lightning
    trains on, the flag left set, until `trainer.min_steps` and `min_epochs` are met."""
    loop = trainer.fit_loop  # note: an epoch whose last batch this is counts (it ends before the loop stops)
    ending = 0 if epoch_ended else int(trainer.is_last_batch)
    return trainer.should_stop and trainer.global_step >= (loop.min_steps or 0) \
        and loop.epoch_progress.current.processed + ending >= (loop.min_epochs or 0)


def run_stopped(trainer: L.Trainer) -> bool:
    """True once a callback has stopped the run on a signal, its state saved (it sets `stopped = True`:
    `ldm.slurm.SlurmRequeue`)."""
    return any(getattr(callback, "stopped", False) for callback in trainer.callbacks)


def stop_pending(trainer: L.Trainer) -> bool:
    """True when a callback holds a stop signal it has not acted on yet (it sets `stop_pending`;
    `ldm.slurm.SlurmRequeue` acts at the step's end): Lightning then writes a log row at this step, due or not."""
    return any(getattr(callback, "stop_pending", False) for callback in trainer.callbacks)


def run_interrupted(trainer: L.Trainer, at_end: bool = False) -> signal.Signals | None:
    """The signal on which a callback stopped the run before its last step (`interrupted_by`), or with `at_end` the
    one that came at its last step or after it, the run finished all the same (`signalled_at_end`); None if none."""
    attribute = "signalled_at_end" if at_end else "interrupted_by"
    return next((getattr(callback, attribute) for callback in trainer.callbacks
                 if getattr(callback, attribute, None) is not None), None)


def link_or_copy(source: Path, target: Path) -> None:
    """Make `target` hold `source`'s bytes, atomically: a hard link renamed into place, else an atomic copy."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.link.tmp")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
    except OSError:  # no hard links here (some network and FUSE file systems)
        with open(source, "rb") as src, atomic_open(target) as dst:
            shutil.copyfileobj(src, dst, length=16 << 20)
        return
    os.replace(tmp, target)


class Checkpoint(StepBoundary, CheckpointBase):
    """Step-boundary checkpoints (see the module docstring for when each file is written).

    Every checkpoint also carries, under "ldm", `run_info` (ldm-train sets the package version and resolved config),
    `samples_seen`: training samples consumed over all ranks, counted batch by batch (restored on resume), and
    `saved_at`: when it was written (Unix time).

    Args:
        dirpath: folder of the checkpoints; null: `<trainer.default_root_dir>/checkpoints`.
        filename: name of a periodic checkpoint without ".ckpt", formatted with `step` (the global step) and `epoch`.
        every_n_train_steps: a periodic checkpoint every N optimizer steps; null or 0: after each validation instead.
        save_last: keep `last.ckpt`, always the newest state (see the module docstring).
        save_top_k: periodic checkpoints kept on disk: -1 all, 0 none (only `last.ckpt`), k the newest k.
        save_on_train_epoch_end: also write a periodic checkpoint at the end of each training epoch.
    """

    run_info: dict[str, Any] | None = None

    def __init__(self, dirpath: str | None = None, filename: str = "step{step:07d}",
                 every_n_train_steps: int | None = None, save_last: bool = True, save_top_k: int = -1,
                 save_on_train_epoch_end: bool = False) -> None:
        if every_n_train_steps is not None and (not is_int(every_n_train_steps) or every_n_train_steps < 0):
            raise ConfigError(f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps!r} must be a whole "
                              f"number of steps >= 0, or null (checkpoint after each validation); it follows "
                              f"trainer.val_check_interval unless set, so set it when that is a fraction of an epoch")
        if not is_int(save_top_k) or save_top_k < -1:
            raise ConfigError(f"callbacks.checkpoint.save_top_k={save_top_k!r} must be -1 (keep all), 0 or more")
        try:  # at start, not at the first checkpoint after hours of training
            name = filename.format(step=0, epoch=0)
        except (KeyError, IndexError, ValueError, AttributeError) as err:
            why = f"{type(err).__name__}: {err}"
        else:
            why = "not a file name of its own" if not name or "/" in name or f"{name}.ckpt" == LAST_NAME else ""
        if why:
            raise ConfigError(f"callbacks.checkpoint.filename={filename!r}: {why}; a name takes the fields {{step}} "
                              f"and {{epoch}} only (metrics are not known when a step's checkpoint is written), e.g. "
                              f"'step{{step:07d}}' or 'epoch{{epoch}}-step{{step:07d}}'")
        self.dirpath = dirpath and str(Path(dirpath).expanduser())  # as resume reads it (`ldm.cli.train`)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.save_last = save_last
        self.save_top_k = save_top_k
        self.save_on_train_epoch_end = save_on_train_epoch_end
        self.samples_seen = 0
        self.last_model_path = ""  # the newest last.ckpt written (ModelCheckpoint's attribute of that name)
        self.kept: list[str] = []  # periodic checkpoints written by this run (and its earlier segments), oldest first
        self._validated = False  # a validation asked for a checkpoint, due at the next optimizer step
        self._after_validation = False  # this step's periodic checkpoint, due at the end of its validation
        self._stop_held = False  # a callback's stop, asked for inside an accumulation group, due at the step's end
        self._last_step = -1  # global step of the newest last.ckpt this process wrote
        self.trained_in_fit = False  # whether the current fit has trained a batch (`stopped_without_export`)

    # -- when -------------------------------------------------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.dirpath is None:
            self.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        self.trained_in_fit = False
        # a fit that raised (Python API) may have left a checkpoint due: none of it carries into the next one
        self._validated = self._after_validation = self._stop_held = False
        self._last_step = -1  # (another fit's last.ckpt is not this one's)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.trained_in_fit = True
        # note: counted before the batch's end, so a checkpoint written then by any callback (Lightning runs this
        # one after the others; ldm.slurm saves on a signal through it) includes its own step's batch
        self.samples_seen += batch_size_of(batch) * trainer.world_size

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.stepped(trainer):
            self._hold_stop(trainer)
            return  # gradient accumulation: no optimizer step in this batch, so no step boundary either
        if self._stop_held:
            self._stop_held = False
            trainer.should_stop = True
        periodic = self.every_n_train_steps > 0 and trainer.global_step % self.every_n_train_steps == 0
        if periodic and validation_due(trainer) and not stopping(trainer):
            self._after_validation = True
        elif periodic or self._validated:
            self._validated = False
            self.save(trainer, periodic=True)
        elif self.save_last and (final_batch(trainer) or stopping(trainer)) and not self._last_is_current(trainer):
            self.save(trainer, periodic=False)  # should_stop: Lightning runs this callback after the one that set it

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        if not self.stepped(trainer):  # a validation inside an accumulation group: its gradients so far are in no
            self._validated = self._validated or self.every_n_train_steps == 0  # checkpoint: at the step's end
            self._hold_stop(trainer)
        elif self.every_n_train_steps == 0 or self._after_validation:
            self._after_validation = False
            self.save(trainer, periodic=True)
        elif self.save_last and stopping(trainer) and not self._last_is_current(trainer):
            self.save(trainer, periodic=False)  # EarlyStopping stopped the run: while the loop stands in its epoch

    def _hold_stop(self, trainer: L.Trainer) -> None:
        """A stop asked for inside an accumulation group (the Timer of `trainer.max_time` looks at every batch,
        EarlyStopping at a validation there) would lose the step's half-summed gradients and leave the epoch before
        any step boundary: it is held to the batch that completes the step, and saved there (as `ldm.slurm` holds a
        signal)."""
        if stopping(trainer) and not run_halted(trainer):
            trainer.should_stop = False
            self._stop_held = True

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_on_train_epoch_end and trainer.is_last_batch:  # (not a stop inside the epoch, which Lightning
            self.save(trainer, periodic=True)                        # counts as ended too: a resume skipped its rest)
        elif self.save_last and stopping(trainer, epoch_ended=True) and not self._last_is_current(trainer):
            self.save(trainer, periodic=False)  # a stop at the epoch's end (the Timer, EarlyStopping look there too)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A stop that none of the hooks above saw (`should_stop` set outside a step's end or a validation's): the
        # run's final state still reaches last.ckpt. A fit that trained no batch (a run resumed at its end) has no new
        # state, and would write the command's settings over those the weights were trained with.
        if self.save_last and self.trained_in_fit and not self._last_is_current(trainer):
            self.save(trainer, periodic=False)

    def _last_is_current(self, trainer: L.Trainer) -> bool:
        return self._last_step == trainer.global_step

    # -- what -------------------------------------------------------------------------------------------------------

    def save(self, trainer: L.Trainer, periodic: bool, requested: bool = False) -> Path | None:
        """Write this step's periodic checkpoint (`periodic`) and/or `last.ckpt`; returns the path written.
        `requested`: `last.ckpt` even with `save_last: false` (a stop signal must leave something to resume from).

        Collective: every rank calls it (each builds its part of the state), rank 0 writes.
        """
        if run_halted(trainer) or trainer.fast_dev_run or trainer.sanity_checking \
                or trainer.state.fn != TrainerFn.FITTING:
            return None  # note: fast_dev_run promises no checkpoints
        directory = Path(self.dirpath or Path(trainer.default_root_dir) / "checkpoints")
        last = directory / LAST_NAME
        if not periodic or self.save_top_k == 0:
            if not (self.save_last or requested):
                return None
            trainer.save_checkpoint(last, weights_only=False)  # full state: optimizer, loops, callbacks
            self._wrote_last(trainer, last)
            return last
        path = directory / f"{self.filename.format(step=trainer.global_step, epoch=trainer.current_epoch)}.ckpt"
        if str(path) in self.kept:
            self.kept.remove(str(path))
        self.kept.append(str(path))  # before the save: the file lists itself, so a run resumed from it prunes it
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            if self.save_last:
                link_or_copy(path, last)
            while self.save_top_k > 0 and len(self.kept) > self.save_top_k:
                Path(self.kept.pop(0)).unlink(missing_ok=True)
        if self.save_last:
            self._wrote_last(trainer, last)
        return path

    def _wrote_last(self, trainer: L.Trainer, last: Path) -> None:
        self.last_model_path = str(last)
        self._last_step = trainer.global_step

    def save_last_now(self, trainer: L.Trainer) -> Path | None:
        """Write `last.ckpt` at this point (a stop outside the periodic schedule); returns its path, or None when
        nothing may be written (the run was halted, or `fast_dev_run`)."""
        return self.save(trainer, periodic=False, requested=True)

    # -- state ------------------------------------------------------------------------------------------------------

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # note: saved_at orders a run's checkpoints on resume (`ldm.cli.train.newest_checkpoint`); a copy keeps it
        checkpoint["ldm"] = {**(self.run_info or {}), "samples_seen": self.samples_seen, "saved_at": time.time()}

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.samples_seen = int(checkpoint.get("ldm", {}).get("samples_seen", 0))

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"kept": [Path(p).name for p in self.kept], "dirpath": self.dirpath}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The names in this run's folder: a run directory copied or moved (`cp -r`) prunes its own copies. note:
        # checkpoints of older code list absolute paths, of which the names are taken too.
        directory = Path(self.dirpath or "")
        kept = [directory / Path(p).name for p in state_dict.get("kept", [])]
        self.kept = [str(p) for p in kept if self.dirpath is not None and p.exists()]
