"""Stops from outside, end to end through the real CLI: Ctrl-C saves at the end of the current step; after a SIGKILL
the same command resumes from the newest surviving checkpoint and ends bit-identical to a run never stopped.
(In-process, every stop point is checked bit for bit in test_scale_resume.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scale_helpers import REPO, cli_env, run_cli, tiny_overrides, wait_for_step

AUTOENCODER = ["model.net.ch=16"]


def _slow_launch(args: list[str], progress: Path, own_group: bool = False) -> subprocess.Popen:
    """ldm-train with a one-second pause after every step, so a signal lands mid-run; `own_group`: in a process
    group of its own (with its loader workers), as a SLURM job step."""
    return subprocess.Popen([sys.executable, "-m", "ldm.cli.train", *args,
                             "+callbacks.progress_file._target_=scale_helpers.Progress",
                             f"+callbacks.progress_file.path={progress}", "+callbacks.progress_file.sleep=1.0"],
                            cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=own_group)


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir() if p.suffix == ".ckpt" or p.name.endswith(".tmp"))


@pytest.mark.slow
def test_ctrl_c_saves_at_the_end_of_the_step_and_the_rerun_continues(shapes_shards, tmp_path):
    out, progress = tmp_path / "run", tmp_path / "progress"
    args = tiny_overrides(shapes_shards, out, max_steps=40, every=100) + AUTOENCODER
    proc = _slow_launch(args, progress)
    wait_for_step(progress, proc, 2)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Ctrl-C: saving last.ckpt at the end of this step" in stderr
    saved = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= saved < 40
    assert not (out / "train.lock").exists()  # released on the way out

    again = run_cli([*args, f"trainer.max_steps={saved + 2}"])  # the same command: auto_resume
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == saved + 2
    assert _checkpoints(out) == ["last.ckpt"]  # no -v1 copies, no temp files


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_saves_with_loader_workers(shapes_shards, tmp_path):
    """Preemption and scancel signal every process of the job, the loader workers too: they leave the signal to the
    training process, which saves at the end of the step and exits 0 (a worker dying of SIGTERM took the run down)."""
    out, progress = tmp_path / "run", tmp_path / "progress"
    args = tiny_overrides(shapes_shards, out, max_steps=40, every=100) + AUTOENCODER + ["data.num_workers=1"]
    proc = _slow_launch(args, progress, own_group=True)
    wait_for_step(progress, proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert 2 <= torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] < 40


@pytest.mark.slow
def test_after_sigkill_the_same_command_resumes_from_the_newest_checkpoint_exactly(shapes_shards, tmp_path):
    steps = 8
    full_dir, out, progress = tmp_path / "full", tmp_path / "run", tmp_path / "progress"
    full = run_cli(tiny_overrides(shapes_shards, full_dir, max_steps=steps, every=2) + AUTOENCODER)
    assert full.returncode == 0, full.stderr[-3000:]

    args = tiny_overrides(shapes_shards, out, max_steps=steps, every=2) + AUTOENCODER
    proc = _slow_launch(args, progress)
    wait_for_step(progress, proc, 5)
    proc.send_signal(signal.SIGKILL)  # no handler, no save, the lock file stays behind
    proc.communicate(timeout=60)
    assert (out / "train.lock").exists()
    killed_at = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert killed_at >= 4 and killed_at % 2 == 0  # the newest periodic checkpoint survived whole
    (out / "checkpoints" / ".last.ckpt.k1ll3d.tmp").write_bytes(b"torn")  # as a kill during a write leaves it

    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "run lock: taking over" in output and "removed" in output and "auto_resume: resuming from" in output
    a, b = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=True) for d in (full_dir, out))
    assert a["global_step"] == b["global_step"] == steps
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert a["WebDataModule"] == b["WebDataModule"]
    assert not [n for n in _checkpoints(out) if "-v" in n or n.endswith(".tmp")]
