"""SLURM preemption: on the warning signal, save `last.ckpt` at a step boundary and requeue the same job.

This callback is the one mechanism that requeues. Lightning's own (`SLURMEnvironment(auto_requeue=True)`) is switched
off by `ldm.cli.train` because it saves from inside the signal handler, in the middle of a step: ranks can be in
different collectives at that moment, and the checkpoint can hold a half-finished step, so the resumed run would not
match the uninterrupted one. Here the handler only raises a flag; at the end of the training batch the ranks agree on
it (any rank signalled -> all act), save through the checkpoint callback (atomic `last.ckpt`), rank 0 runs
`scontrol requeue <job id>`, and the trainer stops. The requeued job keeps its SLURM_JOB_ID, so `paths=slurm` puts it
in the same run directory, `auto_resume` picks up `last.ckpt` there, and the W&B id derived from that directory
continues the same W&B run.

The sbatch scripts in slurm/ ask for the signal with `#SBATCH --signal=USR1@120` (sent to every task of the step);
the submitit launcher (hydra/launcher=slurm) is told to send USR1 too, instead of its own USR2, so submitit's
requeue never fires.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ldm.callbacks.checkpoint import Checkpoint, run_halted


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `ARRAYID_TASKID` inside a job array, else SLURM_JOB_ID (None outside SLURM)."""
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


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


class SlurmRequeue(L.Callback):
    """Save and requeue on the SLURM warning signal (a no-op outside a SLURM job).

    Args:
        signal_name: the signal SLURM sends before the time limit (`#SBATCH --signal=USR1@120` -> "USR1").
        requeue: run `scontrol requeue` after saving (false: save and stop only).
    """

    def __init__(self, signal_name: str = "USR1", requeue: bool = True):
        self.signum = signal.Signals[f"SIG{signal_name.upper().removeprefix('SIG')}"]
        self.requeue = requeue
        self.job_id: str | None = None
        self.requeued = False
        self._signalled = False
        self._previous_handler: Any = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # note: only a flag here; the save happens at a step boundary (see the module docstring).
        self._signalled = True

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.job_id = slurm_job_id()
        if stage == "fit" and self.job_id is not None:
            self._previous_handler = signal.signal(self.signum, self._on_signal)
            rank_zero_info(f"SLURM job {self.job_id}: on {self.signum.name} the run saves last.ckpt and requeues")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_handler is not None:
            signal.signal(self.signum, self._previous_handler)
            self._previous_handler = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.job_id is None or self.requeued:
            return
        # every rank takes part in this reduction each step, so they all act at the same step
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False) or run_halted(trainer):
            return
        path = self._save(trainer)
        self.requeued = True
        trainer.should_stop = True
        if trainer.is_global_zero:
            if self.requeue and requeue_job(self.job_id):
                rank_zero_info(f"{self.signum.name}: saved {path} at step {trainer.global_step}; "
                               f"requeued SLURM job {self.job_id}")
            else:
                rank_zero_info(f"{self.signum.name}: saved {path} at step {trainer.global_step}; stopping")

    @staticmethod
    def _save(trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, Checkpoint) and callback.save_last:
            return callback.save_last_now(trainer)
        path = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(path)
        return path
