"""SLURM requeue end to end: USR1 to a training process -> last.ckpt + `scontrol requeue JOBID`; the relaunched job
(same SLURM_JOB_ID) resumes in the same run directory and the same W&B run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scale_helpers import REPO, cli_env, fake_scontrol, run_cli, tiny_overrides, wait_for_step

JOB_ID = "777"


def slurm_env(bin_dir: Path) -> dict[str, str]:
    """What srun sets for a one-task job, enough for Lightning's SLURMEnvironment."""
    import os

    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "ldm-test",
            "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
def test_usr1_saves_requeues_and_the_relaunch_resumes(shapes_shards, tmp_path):
    bin_dir, log = fake_scontrol(tmp_path)
    env = slurm_env(bin_dir)
    run_dir = tmp_path / "runs" / "train" / f"slurm-{JOB_ID}"
    base = [o for o in tiny_overrides(shapes_shards, run_dir, max_steps=40, every=100)
            if not o.startswith(("paths.output_dir=", "logger="))]
    base += ["paths=slurm", f"paths.runs_dir={tmp_path / 'runs'}", "model.net.ch=16", "logger=wandb"]
    progress = tmp_path / "progress"

    # First launch: slow steps; the test plays SLURM and sends USR1 once training runs.
    proc = subprocess.Popen([sys.executable, "-m", "ldm.cli.train", *base, "+callbacks.progress_file._target_="
                             "scale_helpers.Progress", f"+callbacks.progress_file.path={progress}",
                             "+callbacks.progress_file.sleep=1.0"],
                            cwd=REPO, env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(progress, proc, 2)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert log.read_text().split() == ["requeue", JOB_ID]
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= saved < 40

    # The requeued job: same job id, same command -> same run directory, resumes from last.ckpt by itself.
    result = run_cli([*base, f"trainer.max_steps={saved + 2}"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"auto_resume: resuming from {run_dir / 'checkpoints' / 'last.ckpt'}" in output
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved + 2
    assert log.read_text().split() == ["requeue", JOB_ID]  # no second requeue
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    # offline-run-<time>-<id>: two launches, one W&B run id (derived from the run directory)
    assert len(wandb_runs) == 2 and len({name.split("-", 3)[3] for name in wandb_runs}) == 1, wandb_runs
