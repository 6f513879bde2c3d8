"""Callbacks that act once per optimizer step, not once per batch.

Lightning calls `on_train_batch_start` / `on_train_batch_end` for every batch, which under gradient accumulation
(`trainer.accumulate_grad_batches` > 1) means every micro-batch, while `trainer.global_step` moves only at the batch
that steps the optimizer (the last of each group, and the last batch of an epoch). A checkpoint, a stop on a signal,
a sample grid or an FID evaluation between the two would see half-summed gradients or repeat itself at one step.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor as _LearningRateMonitor
from typing_extensions import override


class StepBoundary(L.Callback):
    """A callback that needs to know, in `on_train_batch_end`, whether this batch ended with an optimizer step
    (`stepped`). A subclass that overrides `on_train_batch_start` calls this one's."""

    _step_at_batch_start = -1  # global step when the current batch started

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step_at_batch_start = trainer.global_step

    def stepped(self, trainer: L.Trainer) -> bool:
        """The current (or, during validation, the last) training batch ended with an optimizer step."""
        return trainer.global_step != self._step_at_batch_start


class LearningRateMonitor(_LearningRateMonitor):
    """Lightning's, logging the learning rates once per optimizer step: Lightning's logs them at every batch's start
    while the step's logs are due, so under gradient accumulation each `lr` row came once per micro-batch. Its
    history of every rate logged (`lrs`, read by nothing) keeps the last one only, not one a logged step for the
    whole run."""

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the first micro-batch of its step
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            for history in self.lrs.values():
                del history[:-1]


def logging_due(trainer: L.Trainer) -> bool:
    """The step just taken is one the loggers write: every `trainer.log_every_n_steps` steps, none at 0 (Lightning's
    "no step logging")."""
    every = trainer.log_every_n_steps
    return every > 0 and trainer.global_step % every == 0


def validation_due(trainer: L.Trainer) -> bool:
    """Lightning's schedule validates after the batch that just ended (`trainer.val_check_interval` in batches or as
    a fraction of the epoch, `check_val_every_n_epoch`): as Lightning decides it, minus its rule that a stop
    (`should_stop`) validates after any batch."""
    if not trainer.enable_validation:
        return False
    every = trainer.check_val_every_n_epoch
    if every is not None and (trainer.current_epoch + 1) % every:
        return False
    interval = trainer.val_check_batch
    if interval is None or interval == float("inf"):
        return trainer.is_last_batch
    loop = trainer.fit_loop.epoch_loop
    index = loop.total_batch_idx if every is None else loop.batch_idx
    return (index + 1) % interval == 0


def validations_between(trainer: L.Trainer, start: int, end: int) -> tuple[int | None, int | None] | None:
    """The batches after which Lightning's schedule (`validation_due`'s) validates, counted from the run's first: the
    first after `start` (perhaps past `end`) and the last in (start, end], None where there is none; None for a
    schedule of unknown length (an epoch of unknown length, validation at each epoch's end)."""
    every, interval, epoch = trainer.check_val_every_n_epoch, trainer.val_check_batch, trainer.num_training_batches
    if interval is None or not math.isfinite(interval):
        return None
    interval = int(interval)
    if every is None:  # every `interval` batches, across epochs
        first, last = (start // interval + 1) * interval, end - end % interval
    else:  # after each interval-th batch of every every-th epoch
        if not math.isfinite(epoch) or not 0 < interval <= epoch:
            return None
        epoch = int(epoch)

        def due(index: int) -> bool:  # the epoch (from 0) validates
            return (index + 1) % every == 0

        index, batch = divmod(start, epoch)
        batch = (batch // interval + 1) * interval
        while not due(index) or batch > epoch:
            index, batch = index + 1, interval
        first = index * epoch + batch
        index = (end - 1) // epoch
        batch = (end - index * epoch) // interval * interval
        while index >= 0 and not (due(index) and batch):
            index, batch = index - 1, epoch // interval * interval
        last = index * epoch + batch if index >= 0 else 0
    return first, last if last > start else None


def final_batch(trainer: L.Trainer) -> bool:
    """The batch that just ended is the run's last: it reached `trainer.max_steps`, or it is the last batch of the
    last epoch."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    return (max_epochs is not None and max_epochs >= 0 and trainer.is_last_batch
            and trainer.current_epoch + 1 >= max_epochs)
