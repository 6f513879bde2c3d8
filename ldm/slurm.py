"""Preemption and Ctrl-C: on a stop signal, save `last.ckpt` at the end of the current step, stop, and (SLURM) requeue.

Signals handled during fit, in every run:
  USR1 (`signal_name`)  SLURM's warning before the time limit (`#SBATCH --signal=USR1@120`): save, stop, and inside a
                        SLURM job run `scontrol requeue <job id>`;
  TERM                  a scheduler or `kill`: save, stop (no requeue: SLURM's own preemption requeues by itself);
  INT                   Ctrl-C: save, stop. A second Ctrl-C interrupts at once (nothing more is saved).

This callback is the one mechanism that saves on a signal. Lightning's own SLURM requeue
(`SLURMEnvironment(auto_requeue=True)`) is switched off by `ldm.cli.train` because it saves from inside the signal
handler, in the middle of a step: ranks can be in different collectives at that moment, and the checkpoint can hold a
half-finished step, so the resumed run would not match the uninterrupted one. Here the handler only raises a flag; at
the end of the training batch the ranks agree on it (any rank signalled -> all act), save through the checkpoint
callback (atomic `last.ckpt`), rank 0 requeues when asked to, and the trainer stops. The requeued job keeps its
SLURM_JOB_ID, so `paths=slurm` puts it in the same run directory, `auto_resume` picks up `last.ckpt` there, and the
W&B id derived from that directory continues the same W&B run. A signal acted on at the run's last step stops
nothing: `last.ckpt` is written (also with `save_last: false`) and the run finishes with its export, but without the
FID callback's final evaluation, which the time left may not hold; no requeue (the requeued job would find nothing
left to train).

Outside fit, `ldm-train` holds the requeue signal (`requeue_signal_held`): one before training is acted on at the end
of its first step, one after it (export, final evaluation) lets the run finish.

The sbatch scripts in slurm/ ask for the signal with `#SBATCH --signal=USR1@120` (sent to every task of the step);
the submitit launcher (hydra/launcher=slurm) is told to send USR1 too, instead of its own USR2, so submitit's
requeue never fires.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ldm.callbacks.checkpoint import Checkpoint, run_halted
from ldm.callbacks.step_boundary import StepBoundary, final_batch, validation_due
from ldm.config import ConfigError


def catchable_signal(signal_name: str) -> signal.Signals | None:
    """The signal `signal_name` names ("USR1", "SIGUSR1"), or None for one a process cannot catch or no signal."""
    name = f"SIG{str(signal_name).upper().removeprefix('SIG')}"
    if name not in signal.Signals.__members__ or name in ("SIGKILL", "SIGSTOP"):
        return None
    return signal.Signals[name]


_held: list[signal.Signals] = []  # the requeue signal, received outside fit while `requeue_signal_held` held it


@contextlib.contextmanager
def requeue_signal_held(signal_name: str | None) -> Iterator[list[signal.Signals]]:
    """Hold SLURM's warning before the time limit (`signal_name`) outside fit: at a run's start, its export, its
    final evaluation. Its default action ends the process: a job that had trained and exported everything ended as
    failed (`--dependency=afterok` chains never started), its W&B run left open and its run lock behind. One that
    arrives before fit is acted on at the end of fit's first step (`SlurmRequeue.setup`: save, requeue); one after
    fit lets the run finish. A handler the caller installed stays; so does the signal off the main thread. Yields
    the signal held and not acted on, if one was (empty: none)."""
    signum = catchable_signal(signal_name) if signal_name is not None else None
    if signum is None or threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signum) != signal.SIG_DFL:
        yield []
        return

    def hold(received: int, frame: FrameType | None) -> None:
        if not _held:
            _held.append(signal.Signals(received))
            print(f"{signum.name} outside a training step: held (a run with steps left to train saves last.ckpt at "
                  f"the end of its first and stops; one past its training finishes)", file=sys.stderr, flush=True)

    _held.clear()
    signal.signal(signum, hold)
    try:
        yield _held
    finally:
        signal.signal(signum, signal.SIG_DFL)
        _held.clear()


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `ARRAYID_TASKID` inside a job array, else SLURM_JOB_ID (None outside SLURM)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID") or None


def requeue_job(job_id: str) -> bool:
    """Run `scontrol requeue JOB_ID`; True when it succeeded."""
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        rank_zero_warn("scontrol is not on PATH; the job was not requeued")
        return False
    if result.returncode != 0:
        rank_zero_warn(f"scontrol requeue {job_id} failed ({result.returncode}): {result.stderr.strip()}")
        return False
    return True


class SlurmRequeue(StepBoundary):
    """Save `last.ckpt` at the end of the current step on USR1, TERM or INT, then stop; requeue on USR1 under SLURM.
    At the run's last step: save, no requeue, and the run ends as usual but for its final evaluation (see the module
    docstring).

    Args:
        signal_name: the signal SLURM sends before the time limit (`#SBATCH --signal=USR1@120` -> "USR1").
        requeue: run `scontrol requeue` after saving on that signal inside a SLURM job (false: save and stop only).
    """

    def __init__(self, signal_name: str = "USR1", requeue: bool = True):
        signum = catchable_signal(signal_name)
        if signum is None:
            raise ConfigError(f"callbacks.slurm_requeue.signal_name={signal_name!r} is not a signal a process can "
                              f"catch: the one `#SBATCH --signal=NAME@SECONDS` names, e.g. USR1 or USR2")
        if not isinstance(requeue, bool):
            raise ConfigError(f"callbacks.slurm_requeue.requeue={requeue!r} must be true or false")
        self.signum = signum
        self.requeue = requeue
        self.job_id: str | None = None
        self.requeued = False
        self.stopped = False  # saved on a signal (and, before the last step, asked the trainer to stop)
        self.interrupted_by: signal.Signals | None = None  # the signal that stopped the run before its last step
        # a stop signal at the run's last step or in its final validation: the run finished all the same
        self.signalled_at_end: signal.Signals | None = None
        self._received: signal.Signals | None = None  # the first stop signal of this run, until acted on
        self._previous_handlers: dict[signal.Signals, Any] = {}  # the handlers ours replaced
        self._active = False  # handlers installed and fit running
        # the signal of a stop at a step with a scheduled validation, until last.ckpt is saved again after it
        self._after_validation: signal.Signals | None = None

    @property
    def stop_pending(self) -> bool:
        """A stop signal received and not acted on yet: this step's end will stop the run (`stop_pending`)."""
        return self._received is not None and not self.stopped

    @property
    def signals(self) -> tuple[signal.Signals, ...]:
        """The requeue signal, then those that stop without a requeue (in the ranks' vote, a later one wins)."""
        return tuple(dict.fromkeys((self.signum, signal.SIGTERM, signal.SIGINT)))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # note: only a flag here; the save happens at a step boundary (see the module docstring).
        if not self._active:
            self._forward(signum, frame)
            return
        if signum == signal.SIGINT and self._received is not None:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self._received is None:
            self._received = signal.Signals(signum)
            if signum == signal.SIGINT:
                print("\nCtrl-C: saving last.ckpt at the end of this step, then stopping (Ctrl-C again: stop now)",
                      file=sys.stderr, flush=True)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.job_id = slurm_job_id()
        if stage != "fit" or threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.signals:
            self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        self._active = True
        if self.signum in _held and self._received is None:  # before fit (`requeue_signal_held`): at the first step
            self._received = self.signum
            _held.clear()
        where = f"SLURM job {self.job_id}: on {self.signum.name} the run saves last.ckpt and requeues; " \
            if self.job_id is not None and self.requeue else ""
        rank_zero_info(f"{where}on {'/'.join(s.name for s in self.signals)} the run saves last.ckpt at the end of "
                       f"the current step and stops")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # note: Lightning installs its own SIGTERM handler after `setup` (calling ours too), and on its flag raises
        # SIGTERMException at the next batch end of any loop, a validation batch included: a signal during validation
        # ended the run before this callback's save at the step's end, with nothing saved. From here on ours alone
        # handles the stop signals (any rank signalled -> all ranks save and stop at the same step).
        if self._active and threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                signal.signal(signum, self._on_signal)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        """After fit: hand the signal to the handler ours replaced, and reinstall that one for good.

        note: when fit raises, Lightning skips the teardown hooks and its signal connector then reinstalls the
        handlers it found at the start of fit, ours among them; they must not swallow a later Ctrl-C.
        """
        previous = self._previous_handlers.get(signal.Signals(signum), signal.SIG_DFL)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        self._active = False
        if threading.current_thread() is threading.main_thread():
            for signum, handler in self._previous_handlers.items():
                if handler is not None:  # None: a handler installed outside Python, which we cannot reinstall
                    signal.signal(signum, handler)

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._received is not None and not self.stopped:  # after the last step's end: never acted on
            self.signalled_at_end = self._received
        self._restore()

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # note: Lightning skips the teardown hooks when fit raises

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stopped or not self.stepped(trainer):
            return  # note: mid-accumulation the gradients so far would not reach the checkpoint; wait for the step
        # every rank takes part in this reduction each step, so they all act at the same step, on the same signal:
        # the one later in `signals` wins (a SIGTERM on any rank, a cancel or a preemption, is never requeued)
        code = self.signals.index(self._received) + 1 if self._received is not None else 0
        code = int(trainer.strategy.reduce(torch.tensor(code, device=trainer.strategy.root_device), reduce_op="max"))
        if not code or run_halted(trainer):
            return
        received = self.signals[code - 1]  # perhaps another rank's
        if final_batch(trainer):  # nothing left to train: the run ends (export), without its final evaluation
            callback = trainer.checkpoint_callback
            if not (isinstance(callback, Checkpoint) and callback.save_last):  # which writes last.ckpt now itself
                self._save(trainer)
            self.stopped = True  # note: callbacks skip what the time left cannot hold (the FID callback's last one)
            self.signalled_at_end = received
            rank_zero_info(f"{received.name} at the run's last step ({trainer.global_step}): last.ckpt holds it; "
                           f"finishing without the final evaluation (ldm-eval the export), no requeue")
            return
        path = self._save(trainer)
        self.stopped = True
        self.interrupted_by = received
        trainer.should_stop = True
        due = validation_due(trainer)
        if due and path is not None:
            # A validation the schedule holds for this step runs, as in the run that was not stopped, and last.ckpt
            # is written again after it: what it measured (stage 1's latent statistics, metrics) is part of the state
            # the uninterrupted run carries on with. The save before it stands should the grace time run out; the
            # requeue waits for the second (scontrol requeue ends the running job).
            self._after_validation = received
            rank_zero_info(f"{received.name}: saved {path} at step {trainer.global_step}; finishing this step's "
                           f"validation, then saving again")
            return
        if not due:
            # note: Lightning validates after any batch once should_stop is set; that costs grace time, and a
            # checkpoint written after it (validation-time checkpoints) resumed with the loop counters a batch off.
            trainer.limit_val_batches = 0
        self._requeue_or_stop(trainer, received, path)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._after_validation is not None and not trainer.sanity_checking:
            received, self._after_validation = self._after_validation, None
            self._requeue_or_stop(trainer, received, self._save(trainer))

    def _requeue_or_stop(self, trainer: L.Trainer, received: signal.Signals, path: Path | None) -> None:
        """Say what was saved; requeue the SLURM job when `received` is the requeue signal and something was."""
        saved = f"saved {path}" if path is not None else "nothing saved (checkpoints are off)"
        requeue = received == self.signum and self.requeue and self.job_id is not None and path is not None
        if trainer.is_global_zero:
            if requeue and requeue_job(self.job_id):
                self.requeued = True
                rank_zero_info(f"{received.name}: {saved} at step {trainer.global_step}; requeued SLURM job "
                               f"{self.job_id}")
            else:
                rank_zero_info(f"{received.name}: {saved} at step {trainer.global_step}; stopping")

    @staticmethod
    def _save(trainer: L.Trainer) -> Path | None:
        callback = trainer.checkpoint_callback
        if isinstance(callback, Checkpoint):
            return callback.save_last_now(trainer)
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        return path
