"""Skip optimizer steps whose loss or gradients are not finite, the same way on every rank; stop after K in a row.

The guard watches two Lightning hooks that fire for automatic and manual optimization alike:
  on_before_backward        sees every loss that goes through `backward` (automatic) or `self.manual_backward`;
  on_before_optimizer_step  runs after backward (and after AMP unscaling) and right before `optimizer.step()`.
At the second hook each rank computes "my loss or my gradients are non-finite", the ranks all-reduce that flag (any
rank bad -> all bad), and if it is set every rank drops its gradients (`zero_grad(set_to_none=True)`), so the
optimizer's `step()` changes neither the weights nor its moments; running statistics (BatchNorm's, which the forward
updated) are put back at the batch's end. Every rank has run its backward by then, so DDP's gradient all-reduce never
waits on a rank that bailed out early.

A training batch with at least one skipped optimizer step counts as skipped (logged as `train/nan_skipped`, the total
so far). After `max_consecutive` skipped batches in a row the guard sets `halted`, stops the trainer and says why;
`ldm.callbacks.checkpoint.Checkpoint` then writes nothing more, so `last.ckpt` stays the last good state, and
`ldm.cli.train.train` raises `TrainingDiverged` with the message.

The gradients' total norm the guard checks is logged too, as `train/grad_norm` (before clipping, which reuses it), every
`trainer.log_every_n_steps` optimizer steps.

With fp16 mixed precision (`16-mixed`) infinite gradients are the GradScaler's business (it skips the step and lowers
the scale), so only a non-finite loss counts there.

Manual optimization (AutoencoderModule) needs nothing special, provided the module calls `self.manual_backward(loss)`
(not `loss.backward()`) and steps through the LightningOptimizer from `self.optimizers()` or through
`trainer.strategy.optimizer_step` (the autoencoder's discriminator step, which global_step does not count).
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from ldm.callbacks.checkpoint import stop_pending
from ldm.callbacks.step_boundary import logging_due
from ldm.config import ConfigError, is_int
from ldm.modules.optim import gradient_norm

log = logging.getLogger(__name__)

ADVICE = "Resume from the last good checkpoint with a lower learning rate, a different seed or fp32 precision."


class NanGuard(L.Callback):
    """Skip non-finite steps on all ranks at once; halt after `max_consecutive` skipped batches in a row.

    Args:
        max_consecutive: stop the run after this many skipped training batches in a row (>= 1).
        check_grads: also inspect gradients, not only the loss: their total norm (`ldm.modules.optim.gradient_norm`,
            which norm clipping then reuses), logged before clipping as `train/grad_norm` (`train/grad_norm_1` for a
            second optimizer, the autoencoder's discriminator).
    """

    def __init__(self, max_consecutive: int = 5, check_grads: bool = True):
        if not is_int(max_consecutive) or max_consecutive < 1:
            raise ConfigError(f"callbacks.nan_guard.max_consecutive={max_consecutive!r} must be an integer >= 1")
        self.max_consecutive = max_consecutive
        self.check_grads = check_grads
        self.skipped_total = 0    # batches skipped over the whole run (restored on resume)
        self.consecutive = 0      # batches skipped in a row up to now
        self.halted = False       # set when the run was stopped; checkpointing then stops too
        self.message = ""
        self._loss_finite = True  # all losses backpropagated since the last optimizer step were finite
        self._batch_stepped = False  # an optimizer step ran in this batch (not so between accumulation steps)
        self._batch_skipped = False
        self._norms: dict[str, torch.Tensor] = {}  # this batch's gradient norms, by log key
        self._running: list[torch.nn.Module] = []  # modules with running statistics (BatchNorm: the discriminator)
        self._running_before: list[tuple[torch.Tensor, torch.Tensor]] = []  # (buffer, its value at the batch's start)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._running = [m for m in pl_module.modules() if getattr(m, "track_running_stats", False)]

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_stepped = self._batch_skipped = False
        self._norms = {}
        # a skipped step changes nothing: BatchNorm's running statistics, updated by the forward, are put back too
        self._running_before = [(b, b.clone()) for m in self._running for b in m.buffers(recurse=False)]

    @override
    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # note: no .item() here; the flag stays on the device until the optimizer step reads it.
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is True else self._loss_finite & finite

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        finite = torch.as_tensor(self._loss_finite)
        self._loss_finite = True
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if self.check_grads and scaler is None:
            norm = gradient_norm(trainer, optimizer)  # computed once: norm clipping reuses it
            if norm is not None:
                finite = finite.to(norm.device) & torch.isfinite(norm)
                index = next(i for i, o in enumerate(trainer.optimizers) if o is optimizer)
                self._norms["train/grad_norm" if index == 0 else f"train/grad_norm_{index}"] = norm
        bad = not bool(finite.item())
        bad = trainer.strategy.reduce_boolean_decision(bad, all=False)  # any rank bad -> every rank skips
        self._batch_stepped = True
        if bad:
            optimizer.zero_grad(set_to_none=True)
            self._batch_skipped = True

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._batch_stepped:
            return  # gradient accumulation: the decision comes with the batch that steps
        if self._batch_skipped:
            self._skip(trainer)
        else:
            self.consecutive = 0
        if logging_due(trainer) or (trainer.log_every_n_steps and (trainer.should_stop or stop_pending(trainer))):
            # note: only on the steps the loggers write (Lightning's `self.log` costs ~1 ms a call on 2 CPU threads),
            # which include a stop's step: left out there, the row showed the norm of the last step logged. The
            # total at every such step: logged only at a skip, Lightning wrote it again at each logged step up to
            # the epoch's end, which a resumed run (a new process) did not
            for key, value in {**self._norms, "train/nan_skipped": float(self.skipped_total)}.items():
                pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True, batch_size=1)

    def _skip(self, trainer: L.Trainer) -> None:
        """A skipped step: BatchNorm statistics put back, counted, said; halts after `max_consecutive` in a row."""
        with torch.no_grad():
            for buffer, before in self._running_before:
                buffer.copy_(before)
        self.skipped_total += 1
        self.consecutive += 1
        if trainer.is_global_zero:  # note: logging, not warnings: each message of its own stayed in a registry
            log.warning("NaN guard: non-finite loss or gradients at step %d; optimizer step skipped on every rank "
                        "(%d in a row, %d in total)", trainer.global_step, self.consecutive, self.skipped_total)
        if self.consecutive >= self.max_consecutive:
            self.halted = True
            self.message = (f"NaN guard: {self.consecutive} training steps in a row had a non-finite loss or "
                            f"gradients (callbacks.nan_guard.max_consecutive={self.max_consecutive}); stopped at "
                            f"global step {trainer.global_step} without writing a checkpoint. {ADVICE}")
            trainer.should_stop = True
            # note: Lightning validates after any batch once should_stop is set; a validation here would log the
            # halted step and (stage 1) write its latent statistics over those of the step last.ckpt holds
            trainer.limit_val_batches = 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"skipped_total": self.skipped_total, "consecutive": self.consecutive}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_total = int(state_dict["skipped_total"])
        self.consecutive = int(state_dict["consecutive"])
