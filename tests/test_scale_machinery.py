"""The launch-at-scale machinery on its own: atomic checkpoints, resume resolution, NaN guard, SLURM requeue, sbatch."""

from __future__ import annotations

import csv
import logging
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from scale_helpers import (
    REPO,
    compose_train,
    fake_scontrol,
    load_json,
    run_cli,
    tiny_autoencoder_export,
    tiny_ldm_overrides,
    tiny_overrides,
)

from ldm.callbacks.checkpoint import AtomicCheckpointIO
from ldm.callbacks.nan_guard import NanGuard
from ldm.callbacks.rng_state import RngState, capture_rng_state, restore_rng_state
from ldm.callbacks.step_boundary import validations_between
from ldm.cli.common import run_id
from ldm.cli.train import TrainingDiverged, checkpoint_damage, remove_stale_temp_files, resolve_ckpt_path, train
from ldm.io import atomic_write_bytes
from ldm.modules.optim import adam, gradient_norm
from ldm.slurm import SlurmRequeue, slurm_job_id

# -- atomic writes ---------------------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write_bytes(b"old", path)
    atomic_write_bytes(b"new contents", path)
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def test_a_write_to_a_link_replaces_the_link_not_the_file_it_names(tmp_path):
    """A run forked by linking another run's files (`cp -rs`), or rolled back by linking last.ckpt to an older
    checkpoint: its writes replace the links and leave the files they named, another run's, as they were."""
    theirs = tmp_path / "orig" / "last.ckpt"
    atomic_write_bytes(b"theirs", theirs)
    (tmp_path / "fork").mkdir()
    (tmp_path / "fork" / "last.ckpt").symlink_to(theirs)
    atomic_write_bytes(b"ours", tmp_path / "fork" / "last.ckpt")
    assert theirs.read_bytes() == b"theirs" and not (tmp_path / "fork" / "last.ckpt").is_symlink()


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    atomic_write_bytes(b"good", path)

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(b"torn", path)
    assert path.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temp file is gone too


def test_checkpoint_io_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    state = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 7}
    io.save_checkpoint(state, tmp_path / "a" / "x.ckpt")
    loaded = io.load_checkpoint(tmp_path / "a" / "x.ckpt")
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- resume resolution, ids, RNG ---------------------------------------------------------------------------------------


def test_finding_the_checkpoint_to_resume_never_runs_a_checkpoints_code(tmp_path):
    """`ckpt_path=last` and auto_resume read the time each checkpoint of the folder was saved: a file dropped there
    is read weights-only too (load_checkpoint's check came after)."""
    from test_safe_loading import _CreatesFile

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    torch.save({"global_step": 1}, folder / "last.ckpt")
    torch.save({"global_step": 9, "x": _CreatesFile(tmp_path / "ran")}, folder / "step0000009.ckpt")
    resolve_ckpt_path("last", folder)
    resolve_ckpt_path(None, folder, auto_resume=True)
    assert not (tmp_path / "ran").exists()


def test_resolve_ckpt_path(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(None, tmp_path / "checkpoints", auto_resume=True) is None
    with pytest.warns(UserWarning, match=r"ckpt_path=last: .*checkpoints does not exist \(working directory .*\), so "
                                         r"this starts from scratch; to resume a run, set paths.output_dir"):
        assert resolve_ckpt_path("last", tmp_path / "checkpoints") is None  # (a mistyped or relative run folder)
    last.parent.mkdir()
    torch.save({"global_step": 5}, last)
    assert resolve_ckpt_path(None, tmp_path / "checkpoints", auto_resume=True) == str(last)
    assert resolve_ckpt_path(None, tmp_path / "checkpoints", auto_resume=False) is None
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") == str(last)
    monkeypatch.setenv("HOME", str(tmp_path))  # `~` as ldm-sample, ldm-export and ldm-eval read it
    assert resolve_ckpt_path("~/checkpoints/last.ckpt", Path("elsewhere")) == str(last)
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*missing.ckpt"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), tmp_path / "checkpoints")


def test_resolve_ckpt_path_skips_damaged_and_missing_last(tmp_path):
    """last.ckpt cut short (or not a checkpoint) or missing: the newest intact periodic checkpoint, by time."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for step in (2, 4, 6):
        path = directory / f"step{step:07d}.ckpt"
        torch.save({"global_step": step}, path)
        os.utime(path, (step, step))
    newest = directory / "step0000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:-100])  # torn: the zip directory at its end is gone
    last = directory / "last.ckpt"
    last.write_bytes(b"")
    assert checkpoint_damage(last) is not None and checkpoint_damage(newest) is not None
    assert resolve_ckpt_path(None, tmp_path / "checkpoints", auto_resume=True) == str(directory / "step0000004.ckpt")
    last.unlink()
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") == str(directory / "step0000004.ckpt")
    for path in directory.iterdir():
        path.write_bytes(b"not a zip")
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") is None  # nothing intact: start from scratch


def test_an_unreadable_last_checkpoint_is_called_damaged_not_older(tmp_path, caplog):
    """A last.ckpt whose time cannot be read sorts below every checkpoint that records one, so it was never checked
    and the log called it older."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    torch.save({"global_step": 2, "ldm": {"saved_at": 2.0}}, directory / "step0000002.ckpt")
    (directory / "last.ckpt").write_bytes(b"")
    with caplog.at_level(logging.INFO):
        assert resolve_ckpt_path("last", directory) == str(directory / "step0000002.ckpt")
    assert "last.ckpt is damaged (" in caplog.text and "older" not in caplog.text


def test_resume_takes_the_newest_checkpoint_even_over_last_and_checks_every_byte(tmp_path):
    """A last.ckpt older than the periodic checkpoints (save_last=false after a run stopped on a signal) does not win;
    a checkpoint whose bytes were damaged inside (not cut short: its zip directory is whole) fails its CRC-32 and the
    next newest is taken."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    for name, step in (("last.ckpt", 3), ("step0000004.ckpt", 4), ("step0000006.ckpt", 6)):
        torch.save({"global_step": step, "w": torch.arange(4096.0)}, directory / name)
        os.utime(directory / name, (step, step))
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") == str(directory / "step0000006.ckpt")
    newest = directory / "step0000006.ckpt"
    data = bytearray(newest.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(64)  # zeroed inside the tensor data
    newest.write_bytes(bytes(data))
    os.utime(newest, (6, 6))
    assert "CRC-32" in checkpoint_damage(newest)
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") == str(directory / "step0000004.ckpt")


def test_resume_orders_checkpoints_by_the_time_stored_inside_them(tmp_path):
    """A run directory copied with `cp -r` gets new modification times in copy order; the time each checkpoint stores
    (`ldm.saved_at`) still names the newest, and checkpoints of older code (no stored time, here copied last) count
    as older than any that stores one: the run was continued past the upgrade."""
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    files = {"step0000002.ckpt": None, "step0000004.ckpt": 40.0, "last.ckpt": 60.0, "step0000006.ckpt": 60.0}
    for mtime, (name, stored) in enumerate(reversed(files.items())):  # the newest copied first
        torch.save({"global_step": 0, **({"ldm": {"saved_at": stored}} if stored else {})}, directory / name)
        os.utime(directory / name, (100 + mtime, 100 + mtime))
    assert resolve_ckpt_path("last", directory) == str(directory / "last.ckpt")  # last.ckpt first among equals
    (directory / "last.ckpt").unlink()
    assert resolve_ckpt_path("last", tmp_path / "checkpoints") == str(directory / "step0000006.ckpt")


def test_leftover_temp_files_are_removed(tmp_path):
    directory = tmp_path / "checkpoints"
    directory.mkdir()
    (directory / ".last.ckpt.x1y2.tmp").write_bytes(b"partial")
    (directory / "step0000002.ckpt").write_bytes(b"kept")
    remove_stale_temp_files(directory)
    assert [p.name for p in directory.iterdir()] == ["step0000002.ckpt"]


def test_run_id_is_stable_per_directory(tmp_path):
    a, b = tmp_path / "train" / "slurm-123", tmp_path / "train" / "slurm-124"
    assert run_id(str(a)) == run_id(str(a)) != run_id(str(b))
    assert run_id(str(a)).startswith("slurm-123-")
    assert run_id(str(tmp_path / "other" / ".." / "train" / "slurm-123")) == run_id(str(a))
    # a run directory copied or moved (cp -r) keeps the id its W&B folders carry, the first segment's: it took a new
    # one from its new path, and its resumed steps went to a second W&B run
    (a / "wandb" / "offline-run-20261205_120249-r1-ac75fe7c").mkdir(parents=True)
    (a / "wandb" / "offline-run-20261206_080000-r1-ac75fe7c").mkdir()
    (a / "wandb" / "latest-run").mkdir()
    assert run_id(str(a)) == "r1-ac75fe7c"


def test_rng_state_round_trip_survives_weights_only_load(tmp_path):
    import random

    import numpy as np

    state = capture_rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.save(state, tmp_path / "rng.pt")
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and (expected[1] == got[1]).all() and expected[2] == got[2]


def test_rng_state_gives_each_rank_its_stream_and_each_step_the_next_draws():
    """RngState's training stream: rank r starts from fold_seed(seed, r) (the ranks' dropout differs), each step goes
    on from the state the step before left (not the same draws every step), and on resume each rank takes its own
    saved state back. (The trainer's rank is all the callback reads of it.)"""
    def started(rank: int) -> RngState:
        callback = RngState(seed=7)
        callback.setup(SimpleNamespace(global_rank=rank), None, "fit")
        return callback

    def draws(callback: RngState, rank: int) -> torch.Tensor:
        """One training step's draws on `rank`: restored at its start, captured at its end."""
        trainer = SimpleNamespace(global_rank=rank, world_size=2)
        callback.on_train_batch_start(trainer, None, None, 0)
        drawn = torch.rand(4)
        callback.on_train_batch_end(trainer, None, None, None, 0)
        return drawn

    ranks = [started(0), started(1)]
    step1 = [draws(callback, rank) for rank, callback in enumerate(ranks)]
    torch.rand(100)  # a validation or a loader between the steps: not seen by training's stream
    step2 = [draws(callback, rank) for rank, callback in enumerate(ranks)]
    assert not torch.equal(step1[0], step1[1]) and not torch.equal(step1[0], step2[0])
    saved = [callback.state_dict()["per_rank"][0] for callback in ranks]  # (one process: each rank's own state)
    expected = [draws(callback, rank) for rank, callback in enumerate(ranks)]  # step 3 of the run never stopped
    for rank in (1, 0):
        resumed = RngState(seed=7)
        resumed.setup(SimpleNamespace(global_rank=rank), None, "fit")
        resumed.load_state_dict({"per_rank": saved})  # (Lightning restores callbacks after their setup)
        assert torch.equal(draws(resumed, rank), expected[rank])


def test_a_second_ctrl_c_stops_at_once(capsys: pytest.CaptureFixture):
    """The first Ctrl-C of a fit asks for last.ckpt at the end of the step; a second one raises KeyboardInterrupt at
    once (Lightning's shutdown), for a step that takes minutes or hangs; after fit Ctrl-C is Python's again."""
    callback = SlurmRequeue()
    callback.setup(None, None, "fit")  # installs the handlers (nothing of the trainer is read)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert callback.stop_pending and "Ctrl-C again: stop now" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        callback.teardown(None, None, "fit")
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_slurm_job_id(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "")  # set but empty: no job to requeue
    assert slurm_job_id() is None
    monkeypatch.setenv("SLURM_JOB_ID", "101")
    assert slurm_job_id() == "101"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_id() == "100_3"


def test_requeue_settings_are_checked():
    """signal_name=KILL read "OSError: [Errno 22] Invalid argument" when the run started, USR3 a KeyError, and
    requeue=maybe counted as true."""
    from ldm.config import ConfigError
    from ldm.slurm import SlurmRequeue

    for name in ("KILL", "USR3", "SIGSTOP", 10):
        with pytest.raises(ConfigError, match=rf"signal_name={name!r} is not a signal a process can catch: .* USR1"):
            SlurmRequeue(signal_name=name)
    with pytest.raises(ConfigError, match=r"callbacks\.slurm_requeue\.requeue='maybe' must be true or false"):
        SlurmRequeue(requeue="maybe")
    assert SlurmRequeue(signal_name="sigusr2").signum == signal.SIGUSR2


# -- NaN guard and requeue inside a real (single-process) run ---------------------------------------------------------


def _record(out: Path) -> dict[int, dict[str, float]]:
    return {int(k): v for k, v in load_json(out / "record" / "steps-rank0.json")["steps"].items()}


def test_nan_guard_skips_then_stops_without_overwriting_last(shapes_shards, tmp_path, caplog):
    """NaN in the batch at step 1: skipped, weights unchanged (the discriminator's BatchNorm statistics, which its
    forward had updated, too: they stayed NaN for good); at steps 4 and 5 (K=2 in a row): the run stops with the
    message, and last.ckpt stays the one written at step 3 (none at step 6, a checkpoint step)."""
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=8, every=3) + [
        "model.net.ch=16", "callbacks.nan_guard.max_consecutive=2", "model.loss.disc_start=0", "model.ema_decay=0.9",
        "+callbacks.nan._target_=scale_helpers.NanInjector", "+callbacks.nan.steps=[1,4,5]",
        "+callbacks.recorder._target_=scale_helpers.StepRecorder", f"+callbacks.recorder.dirpath={out}/record",
    ]
    with pytest.raises(TrainingDiverged, match=r"2 training steps in a row .*max_consecutive=2"), \
            caplog.at_level("WARNING", logger="ldm.callbacks.nan_guard"):
        train(compose_train(overrides))
    # logged, not warned: each step's own message stayed in Python's warning registry for good
    assert caplog.text.count("NaN guard: non-finite loss or gradients at step") == 3
    steps = _record(out)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]           # key: global step after the batch
    assert steps[2]["weights"] == steps[1]["weights"]   # the NaN batch (step 1 -> 2) changed nothing
    # the EMA included (at step 1 it equals the weights, its first update a copy: a pull towards them shows at 4 -> 5)
    assert steps[5]["ema"] == steps[4]["ema"] != steps[3]["ema"]
    assert steps[3]["weights"] != steps[2]["weights"]   # the next one trains again
    assert steps[6]["weights"] == steps[4]["weights"]   # two skipped in a row, then stopped
    assert steps[6]["train/nan_skipped"] == 3
    # the running total at every logged step (logged only at a skip, Lightning wrote it again at each logged step to
    # the epoch's end, and a resumed run did not): index n = the step after global step n
    with open(out / "csv" / "metrics.csv") as f:
        totals = {int(r["step"]): float(r["train/nan_skipped"]) for r in csv.DictReader(f)
                  if r.get("train/nan_skipped")}
    assert totals == {0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 3}, totals
    assert math.isnan(steps[2]["train/grad_norm"])       # the guard logs the norm it checked, before clipping
    assert all(0 < steps[s]["train/grad_norm"] < math.inf for s in (1, 3))
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    running = {k: v for k, v in last["state_dict"].items() if "running_" in k}
    assert running and all(torch.isfinite(v).all() for v in running.values()), "BatchNorm statistics put back"
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step0000003.ckpt"]
    # no validation after the halt (its step 6 was due): the latent statistics stay last.ckpt's, as the val rows
    assert load_json(out / "checkpoints" / "latent_stats.json")["step"] == 3
    assert [int(row["step"]) for row in csv.DictReader(open(out / "csv" / "metrics.csv")) if row["val/latent_std"]] \
        == [2]
    assert not (out / "export").exists()  # a halted run exports nothing (an earlier segment's export stays)


class Unsteady(L.LightningModule):
    """(w - 1)^2, but at the global steps `infinite` names a finite loss (0) whose gradient is not finite, and at
    those `nan` names a NaN loss."""

    def __init__(self, infinite: tuple[int, ...] = (), nan: tuple[int, ...] = ()):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.infinite, self.nan = infinite, nan

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        step = self.trainer.global_step
        if step in self.infinite:
            return (self.w - self.w.detach()).abs().sum().sqrt()  # sqrt at 0: an infinite slope
        return (self.w - 1).pow(2).sum() * (math.nan if step in self.nan else 1.0)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit_guarded(module: Unsteady, guard: NanGuard, max_steps: int, tmp_path: Path, ckpt_path: Path | None = None):
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[guard])
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader([torch.zeros(1)] * 8, batch_size=None),
                ckpt_path=ckpt_path)
    return trainer


def test_nan_guard_skips_a_finite_loss_whose_gradients_are_not(tmp_path: Path):
    module, guard = Unsteady(infinite=(1,)), NanGuard()
    weights = []
    module.on_train_batch_end = lambda *args: weights.append(module.w.detach().clone())
    fit_guarded(module, guard, 3, tmp_path)
    assert guard.skipped_total == 1 and torch.isfinite(module.w).all()
    assert torch.equal(weights[1], weights[0]) and not torch.equal(weights[2], weights[1])


def test_nan_guard_counts_go_on_across_a_resume(tmp_path: Path):
    """NaN at steps 1 and 2, the run stopped at 3, resumed: a third at step 3 is the third in a row (max_consecutive=3),
    and the total goes on from the checkpoint's (train/nan_skipped restarted at 0 after a requeue otherwise)."""
    first = fit_guarded(Unsteady(nan=(1, 2)), guard := NanGuard(max_consecutive=3), 3, tmp_path)
    assert (guard.skipped_total, guard.consecutive, guard.halted) == (2, 2, False)
    first.save_checkpoint(tmp_path / "last.ckpt")
    resumed = fit_guarded(Unsteady(nan=(3,)), guard := NanGuard(max_consecutive=3), 6, tmp_path,
                          ckpt_path=tmp_path / "last.ckpt")
    assert guard.halted and resumed.global_step == 4 and guard.skipped_total == 3

def clipped_grad_norms(model: str, shards: Path, tmp_path: Path, precision: str, trainer: str = "cpu",
                       steps: int = 3) -> list[float]:
    """The gradient norm after each of `steps` steps of the tiny autoencoder or LDM clipped to a norm of 1e-4, far
    below their gradients' norm."""
    overrides = tiny_overrides(shards, tmp_path / "run", max_steps=steps, every=steps, trainer=trainer) + [
        f"trainer.precision={precision}",
        "+callbacks.grad_norms._target_=scale_helpers.GradNormProbe", f"+callbacks.grad_norms.dirpath={tmp_path}"]
    if model == "ldm":
        overrides += tiny_ldm_overrides(tiny_autoencoder_export(tmp_path / "autoencoder")) + [
            "trainer.gradient_clip_val=1e-4", "model.val_num_steps=2"]
    else:
        overrides += ["model.grad_clip=1e-4"]  # both optimizers; the discriminator's starts later
    train(compose_train(overrides))
    return load_json(tmp_path / "grad-norms.json")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("model", ["autoencoder", "ldm"])
def test_gradients_are_clipped_in_every_precision_with_fused_adam(model, precision, shapes_shards, tmp_path,
                                                                   single_torch_thread):
    """Lightning's own clipping refuses fused optimizers under mixed precision: every bf16 run with clipping stopped
    at its first step (tests/test_gpu.py runs this on a GPU, fp16 too)."""
    norms = clipped_grad_norms(model, shapes_shards, tmp_path, precision)
    assert norms == pytest.approx([1e-4] * 3, rel=1e-3)


def test_clipping_scales_gradients_over_the_limit_alone_or_clamps_each_value(tmp_path):
    """Norm clipping scales the gradients down to the limit, never up: those under it stay bit for bit (a clip
    coefficient left uncapped made it a normalisation, which the run above, clipped far below every norm, could not
    tell); `value` clamps each element."""
    from ldm.modules.optim import clip_gradients

    module = L.LightningModule()
    module.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(0)
    drawn = [torch.randn(p.shape, generator=generator) for p in module.parameters()]

    def clipped(clip_val: float, algorithm: str = "norm") -> list[torch.Tensor]:
        for p, g in zip(module.parameters(), drawn):
            p.grad = g.clone()  # new tensors: the norm is computed afresh
        clip_gradients(module, optimizer, clip_val, algorithm)
        return [p.grad for p in module.parameters()]

    norm = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in drawn])))
    assert all(torch.equal(a, b) for a, b in zip(clipped(norm * 1.5), drawn))
    half = clipped(norm / 2)
    assert float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in half]))) == pytest.approx(norm / 2, rel=1e-5)
    assert all(torch.allclose(a, b / 2, rtol=1e-5, atol=1e-7) for a, b in zip(half, drawn))
    assert all(torch.equal(a, b.clamp(-0.3, 0.3)) for a, b in zip(clipped(0.3, "value"), drawn))
    # the modules' hooks pass trainer.gradient_clip_algorithm on (value clipping was norm clipping there)
    from ldm.modules.contrastive import ContrastiveModule
    from ldm.modules.latent_diffusion import LatentDiffusionModule

    for hook in (LatentDiffusionModule.configure_gradient_clipping, ContrastiveModule.configure_gradient_clipping):
        for p, g in zip(module.parameters(), drawn):
            p.grad = g.clone()
        hook(module, optimizer, 0.3, "value")
        assert all(torch.equal(p.grad, g.clamp(-0.3, 0.3)) for p, g in zip(module.parameters(), drawn))


@pytest.mark.parametrize("before, after", [(torch.channels_last, torch.contiguous_format),
                                           (torch.contiguous_format, torch.channels_last)])
def test_a_resume_that_switches_channels_last_steps_as_the_run_would_have(tmp_path, before, after):
    """The fused AdamW reads parameter and moments element for element, and torch restores the moments with their
    saved strides: after `channels_last` was switched on resume, conv weights stepped with other elements' moments
    (0.15 off after one step at lr 0.1). `adam`'s optimizers lay the loaded moments out as their parameters."""
    torch.manual_seed(0)
    start, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(3)]

    def run(layouts: tuple[torch.memory_format, torch.memory_format]) -> torch.Tensor:
        weight = torch.nn.Parameter(start.clone().to(memory_format=layouts[0]))
        optimizer = adam(torch.optim.AdamW, [weight], "32-true", lr=0.1)
        assert optimizer.param_groups[0]["fused"]
        for grad in grads[:2]:
            weight.grad = grad.to(memory_format=layouts[0])
            optimizer.step()
        torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")  # as a checkpoint holds it: strides kept
        resumed = torch.nn.Parameter(weight.detach().clone().to(memory_format=layouts[1]))
        optimizer = adam(torch.optim.AdamW, [resumed], "32-true", lr=0.1)
        optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
        resumed.grad = grads[2].to(memory_format=layouts[1])
        optimizer.step()
        return resumed.detach()

    torch.testing.assert_close(run((before, after)), run((before, before)), rtol=0, atol=1e-6)


def test_gradient_norm_is_computed_once_per_step_and_never_stale():
    """The NaN guard's norm is the one clipping scales by (a second call in the same step returns the same tensor);
    after the optimizer's step, even with the same gradient tensors (zeroed in place and accumulated again), and with
    new gradients after zero_grad, the next call computes it afresh."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7)),
              torch.nn.Parameter(torch.randn(2))]
    optimizer = torch.optim.AdamW(params)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False)
    params[0].grad, params[1].grad = torch.randn(5, 3), torch.randn(7)  # params[2] has no gradient

    def reference() -> float:
        return torch.cat([p.grad.double().flatten() for p in params if p.grad is not None]).norm().item()

    first = gradient_norm(trainer, optimizer)
    assert first.item() == pytest.approx(reference(), rel=1e-6)
    assert gradient_norm(trainer, optimizer) is first            # cached: the same step
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    params[1].grad.add_(1.0)                                     # the same tensors, the next step's values
    assert gradient_norm(trainer, optimizer).item() == pytest.approx(7**0.5, rel=1e-6)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert gradient_norm(trainer, optimizer) is None
    params[2].grad = torch.full((2,), 4.0)                       # new tensors
    assert gradient_norm(trainer, optimizer).item() == pytest.approx(4 * 2**0.5, rel=1e-6)
    # one cache-clearing hook for the optimizer's whole life: one a step made every step slower (6 ms at step 20k)
    for _ in range(20):
        gradient_norm(trainer, optimizer)
        optimizer.step()
    assert len(optimizer._optimizer_step_post_hooks) == 1  # note: torch's, no public count


def test_requeue_signal_saves_and_calls_scontrol(shapes_shards, tmp_path, monkeypatch):
    """In-process: USR1 (sent by the test itself) -> last.ckpt at the next step boundary -> scontrol requeue JOBID."""
    bin_dir, log = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=50, every=100) + [
        "model.net.ch=16", "+callbacks.signal._target_=scale_helpers.SignalAtStep",
        "+callbacks.signal.step=2",
    ]
    train(compose_train(overrides))
    assert log.read_text().split() == ["requeue", "4242"]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # the signal arrived during step 3; saved at its end, then stopped


def test_the_requeue_signal_outside_fit_is_held(shapes_shards, tmp_path):
    """SLURM's USR1 outside fit ended the process (its default action): a job that had trained and exported
    everything ended as failed (status 138; W&B run open, run lock left). Before fit it is acted on at the first
    step's end (save, requeue); after fit the run finishes, and a sweep stops before its next job (it went on, with
    the time limit near). In a subprocess: the default action would end pytest."""
    bin_dir, log = fake_scontrol(tmp_path)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    early, late = tmp_path / "early", tmp_path / "late"
    signalled = ["model.net.ch=16", "+callbacks.signal._target_=scale_helpers.SignalAtStep"]
    result = run_cli(tiny_overrides(shapes_shards, early, max_steps=50, every=100)
                     + [*signalled, "+callbacks.signal.during=construction"], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGUSR1 outside a training step: held" in result.stderr
    assert log.read_text().split() == ["requeue", "4242"]
    assert torch.load(early / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1
    # after fit, in a sweep's first job: the job finishes (its export), and the sweep stops before the next
    sweep = [o for o in tiny_overrides(shapes_shards, late, max_steps=2, every=100) if "output_dir" not in o]
    result = run_cli(["-m", f"hydra.sweep.dir={late}", "model.lr=1e-3,2e-3", *sweep, *signalled,
                      "+callbacks.signal.during=teardown"], env=env)
    assert result.returncode == 128 + signal.SIGUSR1, result.stderr[-3000:]
    assert "SIGUSR1 during the previous job: the sweep stops" in result.stderr
    assert (late / "0" / "export" / "model.safetensors").exists() and not (late / "0" / "train.lock").exists()
    assert not (late / "1" / "checkpoints").exists()
    assert log.read_text().split() == ["requeue", "4242"]  # none more


def test_a_requeue_at_a_validation_step_comes_after_the_save_that_follows_the_validation(shapes_shards, tmp_path,
                                                                                        monkeypatch):
    """USR1 during step 2, where validation is due: last.ckpt is saved, the validation runs, last.ckpt is saved again
    with what it measured, and only then is the job requeued (scontrol requeue ends the running job)."""
    bin_dir, log = fake_scontrol(tmp_path)
    out = tmp_path / "run"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n'
                                      f'cp "{out}/checkpoints/last.ckpt" "{tmp_path}/at_requeue.ckpt"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    overrides = tiny_overrides(shapes_shards, out, max_steps=50, every=2) + [
        "model.net.ch=16", "+callbacks.signal._target_=scale_helpers.SignalAtStep", "+callbacks.signal.step=1"]
    train(compose_train(overrides))
    assert log.read_text().split() == ["requeue", "4242"]
    at_requeue = torch.load(tmp_path / "at_requeue.ckpt", weights_only=True)
    assert at_requeue["global_step"] == 2 and at_requeue["latent_stats"]["step"] == 2


def test_sigterm_during_validation_saves_at_the_next_step_boundary(shapes_shards, tmp_path):
    """Preemption (SIGTERM) while validation runs: Lightning's own handler used to end the run at the next validation
    batch, before any save, with exit status 0. Now the run finishes validation, trains the step it is in, saves
    last.ckpt at its end and stops; the same command then resumes from it."""
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=50, every=2) + [
        "model.net.ch=16", "trainer.limit_val_batches=2", "+callbacks.signal._target_=scale_helpers.SignalAtStep",
        "+callbacks.signal.step=2", "+callbacks.signal.signal_name=SIGTERM", "+callbacks.signal.during=validation"]
    train(compose_train(overrides))
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # validated after step 2, trained step 3, saved at its end


def test_the_log_row_of_a_stop_step_holds_that_steps_gradient_norm(shapes_shards, tmp_path):
    """Lightning writes a row at the step a stop signal ends, due or not; the NaN guard logged the norm only at due
    steps, so that row held the norm of the last step logged (at a validation step; none elsewhere)."""

    def grad_norms(out: Path, extra: list[str]) -> dict[int, str]:
        overrides = tiny_overrides(shapes_shards, out, max_steps=4, every=2) + ["model.net.ch=16", *extra]
        train(compose_train(overrides))
        with open(out / "csv" / "metrics.csv") as f:
            return {int(row["step"]): row["train/grad_norm"] for row in csv.DictReader(f) if row["train/grad_norm"]}

    every_step = grad_norms(tmp_path / "every", [])
    stopped = grad_norms(tmp_path / "stopped", [
        "trainer.max_steps=50", "trainer.log_every_n_steps=3", "+callbacks.signal._target_=scale_helpers.SignalAtStep",
        "+callbacks.signal.step=3", "+callbacks.signal.signal_name=SIGTERM"])  # stops at step 4, a validation step
    assert sorted(stopped) == [2, 3] and {step: every_step[step] for step in stopped} == stopped


# -- sbatch scripts ----------------------------------------------------------------------------------------------------


def test_sbatch_scripts_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is missing under CI (.ci/run installs it with apt-get)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in (REPO / "slurm").glob("*.sbatch"))
    assert len(scripts) >= 3
    result = subprocess.run(["shellcheck", "-x", *scripts, "slurm/env.sh"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in scripts:
        text = (REPO / script).read_text()
        assert "#SBATCH --requeue" in text
        if "train" in script:
            assert "#SBATCH --signal=USR1@" in text and "paths=slurm" in text


# -- speed switches ----------------------------------------------------------------------------------------------------


def test_module_switches_channels_last_and_compile_hook():
    import lightning as L
    from omegaconf import OmegaConf

    from ldm.cli.train import apply_module_switches
    from ldm.config import ConfigError

    class WithHook(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.compiled = False

        def compile_networks(self):
            self.compiled = True

    module = WithHook()
    apply_module_switches(module, OmegaConf.create({"compile": True, "channels_last": True}))
    assert module.compiled and module.conv.weight.is_contiguous(memory_format=torch.channels_last)

    class Nothing(L.LightningModule):
        pass

    with pytest.raises(ConfigError, match="compile=true"):
        apply_module_switches(Nothing(), OmegaConf.create({"compile": True, "channels_last": False}))


# -- the checkpoint callback -------------------------------------------------------------------------------------------


def test_checkpoint_keeps_the_newest_k_and_links_last(shapes_shards, tmp_path):
    """save_top_k=2 keeps the two newest periodic files; last.ckpt is the newest step's file (hard link, one write)."""
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=4, every=1) + [
        "model.net.ch=16", "callbacks.checkpoint.save_top_k=2", "trainer.limit_val_batches=0"]
    train(compose_train(overrides))
    checkpoints = out / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["last.ckpt", "step0000003.ckpt", "step0000004.ckpt"]
    assert (checkpoints / "last.ckpt").stat().st_ino == (checkpoints / "step0000004.ckpt").stat().st_ino
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 4


def test_validations_between_jumps_to_the_batches_lightning_validates_after():
    """The first validation after a start batch and the last before an end, computed by epochs, equal the batches
    for which Lightning's rule (`validation_due`: every val_check_batch batches across epochs, or after each
    val_check_batch-th batch of every check_val_every_n_epoch-th epoch) holds, batch by batch."""
    epoch = 5
    for every in (None, 1, 2, 3):
        for interval in (1, 2, 3, 5) if every else (1, 3, 7):
            trainer = SimpleNamespace(check_val_every_n_epoch=every, val_check_batch=interval,
                                      num_training_batches=epoch)

            def due(batch: int, every: int | None = every, interval: int = interval) -> bool:  # batch: from 1
                if every is None:
                    return batch % interval == 0
                return ((batch - 1) // epoch + 1) % every == 0 and ((batch - 1) % epoch + 1) % interval == 0

            for start in range(0, 20):
                first = next(b for b in range(start + 1, 200) if due(b))
                for end in range(start, 40):
                    last = max((b for b in range(start + 1, end + 1) if due(b)), default=None)
                    assert validations_between(trainer, start, end) == (first, last), (every, interval, start, end)
    unknown = SimpleNamespace(check_val_every_n_epoch=1, val_check_batch=float("inf"), num_training_batches=math.inf)
    assert validations_between(unknown, 0, 10) is None


def test_a_fit_that_raised_leaves_no_checkpoint_due_to_the_next(tmp_path):
    """The Python API's reuse of one callback: a fit raised in the validation of a periodic step, whose checkpoint
    was due at that validation's end; the next fit (checkpoints every 3 steps) wrote one at its validation of step 2
    as well."""
    from ldm.callbacks.checkpoint import Checkpoint

    class Linear(L.LightningModule):
        def __init__(self, raise_in_validation: bool):
            super().__init__()
            self.net, self.raise_in_validation = torch.nn.Linear(4, 1), raise_in_validation

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def validation_step(self, batch, batch_idx):
            if self.raise_in_validation:
                raise RuntimeError("out of memory in validation")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 4)), batch_size=2)
    checkpoint = Checkpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=2, save_last=False)

    def fit(raise_in_validation: bool, every: int, steps: int = 3) -> Linear:
        checkpoint.every_n_train_steps = every
        trainer = L.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=2, limit_val_batches=1,
                            num_sanity_val_steps=0, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[checkpoint])
        module = Linear(raise_in_validation)
        trainer.fit(module, loader, loader)
        return module

    with pytest.raises(RuntimeError, match="out of memory"):
        fit(raise_in_validation=True, every=2)
    fit(raise_in_validation=False, every=3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.ckpt")) == ["step0000003.ckpt"]
    # nor the step of another fit's last.ckpt: the next fit's end at that step is saved (it was taken as saved)
    checkpoint.save_last = True
    fit(raise_in_validation=False, every=2, steps=2)
    module = fit(raise_in_validation=False, every=5, steps=2)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())


def test_checkpoint_interval_must_be_whole_steps():
    from ldm.callbacks.checkpoint import Checkpoint
    from ldm.config import ConfigError

    with pytest.raises(ConfigError, match=r"every_n_train_steps=0.5 .*fraction of an epoch"):
        Checkpoint(every_n_train_steps=0.5)
    with pytest.raises(ConfigError, match="save_top_k=-2"):
        Checkpoint(save_top_k=-2)
    with pytest.raises(ConfigError, match="save_top_k=True"):  # (taken as k = 1)
        Checkpoint(save_top_k=True)
    with pytest.raises(ConfigError, match="every_n_train_steps=True"):  # (a checkpoint every step)
        Checkpoint(every_n_train_steps=True)
