"""Exact resume on CPU from every kind of checkpoint a run writes: the resumed run equals the uninterrupted one bit
for bit (losses of every step, weights, EMA, optimizer and scheduler states, data position, RNG states, samples seen).

Each case stops a run at one point, in its own directory, and resumes it there (or from a checkpoint of the full run)
to FULL_STEPS in a fresh `train()` call, as a new process would. With data.batch_size 16 the 64 training samples make
4 batches per epoch, so an epoch ends at step 4 and the full run spans two epochs.

  periodic       step0000002.ckpt, written at the end of step 2 (mid-epoch), of the full run
  validation     step0000003.ckpt written after validation at step 3 (every_n_train_steps=null), mid-run
  end_of_run     last.ckpt of a run with max_steps=3, off the checkpoint interval (2): the issue-16 bug
  epoch_end_run  last.ckpt of a run with max_steps=4: the end of the run is the end of an epoch
  epoch_end      step0000004.ckpt written at the end of the training epoch (save_on_train_epoch_end)
  sigusr1, sigterm, sigint   a signal during step 3: last.ckpt at the end of step 3, then the run stops
  should_stop    a callback stops the run after step 3 (trainer.max_time's Timer, EarlyStopping): last.ckpt there
  min_steps      a stop after step 1 that Lightning holds off to trainer.min_steps=4: last.ckpt at step 4
  epoch_end_stop a stop set at the end of the first epoch (step 4; the Timer looks there too): last.ckpt there
  torn_last      after a kill: last.ckpt cut short and a checkpoint temp file left; auto-resume takes the newest
                 intact checkpoint (step 4), removes the temp file, and writes no `-v1` duplicate
"""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from scale_helpers import (
    compose_train,
    fake_scontrol,
    load_json,
    tiny_autoencoder_export,
    tiny_ldm_overrides,
    tiny_overrides,
)

from ldm.checkpoints import CheckpointError
from ldm.cli.export import holds_autoencoder
from ldm.cli.train import train
from ldm.config import ConfigError
from ldm.convert import load_autoencoder_any

FULL_STEPS = 6
EVERY = 2
AUTOENCODER = ["model=autoencoder/kl_tiny", "model.net.ch=16", "model.warmup_steps=4"]
BATCH = ["data.batch_size=16"]  # 64 samples: 4 batches per epoch


def run(shards: Path, out: Path, max_steps: int, extra: list[str], every: int = EVERY) -> dict[int, dict[str, float]]:
    """Train to `max_steps` in `out` (resuming whatever `extra` says); the `train/*` metrics and weights per step."""
    overrides = tiny_overrides(shards, out, max_steps=max_steps, every=every) + BATCH + extra + [
        "+callbacks.recorder._target_=scale_helpers.StepRecorder", f"+callbacks.recorder.dirpath={out}/record",
    ]
    train(compose_train(overrides))
    return {int(k): v for k, v in load_json(out / "record" / "steps-rank0.json")["steps"].items()}


def _flatten(obj: Any) -> Any:
    """Nested checkpoint state as comparable plain values (tensors as exact lists)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _flatten(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v) for v in obj]
    return obj


def assert_same_checkpoint(a: Path, b: Path, step: int, samples_per_step: int = 16) -> None:
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert ca["global_step"] == cb["global_step"] == step
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), f"weights differ: {key}"
    assert _flatten(ca["optimizer_states"]) == _flatten(cb["optimizer_states"]), "optimizer states differ"
    assert ca["lr_schedulers"] == cb["lr_schedulers"], "LR scheduler states differ"
    assert ca["WebDataModule"] == cb["WebDataModule"], "data positions differ"
    assert _flatten(ca["callbacks"]["RngState"]) == _flatten(cb["callbacks"]["RngState"]), "RNG states differ"
    assert ca["callbacks"]["NanGuard"] == cb["callbacks"]["NanGuard"]
    assert ca["ldm"]["samples_seen"] == cb["ldm"]["samples_seen"] == step * samples_per_step


# -- the stop points -----------------------------------------------------------------------------------------------
# Each returns (the checkpoint to resume from: a path, or None for the run directory's own by auto_resume, the step
# it holds) after writing it into `out`; `full` is the uninterrupted run's directory.


def stop_periodic(shards, out, full, extra):
    return full / "checkpoints" / "step0000002.ckpt", 2


def stop_validation(shards, out, full, extra):
    run(shards, out, 5, extra + ["callbacks.checkpoint.every_n_train_steps=null"], every=3)
    return out / "checkpoints" / "step0000003.ckpt", 3


def stop_end_of_run(shards, out, full, extra):
    run(shards, out, 3, extra)
    return None, 3


def stop_epoch_end_run(shards, out, full, extra):
    run(shards, out, 4, extra, every=3)
    return None, 4


def stop_epoch_end(shards, out, full, extra):
    run(shards, out, 5, extra + ["callbacks.checkpoint.save_on_train_epoch_end=true"], every=100)
    return out / "checkpoints" / "step0000004.ckpt", 4


def _stop_on(signal_name: str):
    def stop(shards, out, full, extra):  # during step 3, off the checkpoint interval (2): last.ckpt is the signal's
        steps = run(shards, out, FULL_STEPS, extra + [
            "+callbacks.signal._target_=scale_helpers.SignalAtStep", "+callbacks.signal.step=2",
            f"+callbacks.signal.signal_name={signal_name}"])
        assert sorted(steps) == [1, 2, 3], f"{signal_name} did not stop the run after step 3: {sorted(steps)}"
        return None, 3
    return stop


def stop_should_stop(shards, out, full, extra):
    # trainer.max_time (Lightning's Timer) at step 3, mid-epoch: last.ckpt was written by on_train_end, after the
    # loop had counted the epoch as done, and the resumed run skipped the epoch's last batch
    steps = run(shards, out, FULL_STEPS, extra + ["+callbacks.stop._target_=scale_helpers.StopAtStep",
                                                 "+callbacks.stop.step=3"])
    assert sorted(steps) == [1, 2, 3]
    return None, 3


def test_early_stopping_resumes_exactly_from_validation_time_checkpoints(shapes_shards, tmp_path,
                                                                         single_torch_thread):
    """A periodic checkpoint is written at the end of its step, before that step's validation (as Lightning's
    ModelCheckpoint): EarlyStopping's count in it misses that validation. With `every_n_train_steps: null` the
    checkpoint comes after each validation, and a resumed run stops where the uninterrupted one did (the last.ckpt
    of the run it stopped holds the count of the validation that stopped it)."""
    early = ["+callbacks.es._target_=lightning.pytorch.callbacks.EarlyStopping", "+callbacks.es.monitor=val/rec_loss",
             "+callbacks.es.mode=max", "+callbacks.es.patience=1",  # stops at the second validation that drops
             "callbacks.checkpoint.every_n_train_steps=null"]
    full = run(shapes_shards, tmp_path / "full", 12, AUTOENCODER + early)
    run(shapes_shards, tmp_path / "split", 2, AUTOENCODER + early)
    resumed = run(shapes_shards, tmp_path / "split", 12, AUTOENCODER + early)
    assert max(full) < 12 and max(resumed) == max(full), (sorted(full), sorted(resumed))
    stopped = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    assert stopped["global_step"] == max(full)
    assert next(v for k, v in stopped["callbacks"].items() if k.startswith("EarlyStopping"))["wait_count"] == 1


def test_a_stop_inside_an_epoch_writes_no_epoch_end_checkpoint(shapes_shards, tmp_path, single_torch_thread):
    """save_on_train_epoch_end: Lightning calls on_train_epoch_end after a stop inside the epoch, which it counts as
    ended: the checkpoint written there replaced the signal's last.ckpt, and a run bounded by trainer.max_epochs
    resumed past the rest of the epoch (2 epochs of 4 steps ended at step 7, the epoch's last step never trained)."""
    out = tmp_path / "run"
    epochs = AUTOENCODER + ["trainer.max_epochs=2", "callbacks.checkpoint.save_on_train_epoch_end=true"]
    steps = run(shapes_shards, out, -1, epochs + ["+callbacks.signal._target_=scale_helpers.SignalAtStep",
                                                  "+callbacks.signal.step=2", "+callbacks.signal.signal_name=SIGINT"],
                every=100)
    assert sorted(steps) == [1, 2, 3]
    assert not list((out / "checkpoints").glob("step*.ckpt")), "an epoch-end checkpoint of the unfinished epoch"
    assert sorted(run(shapes_shards, out, -1, epochs, every=100)) == list(range(4, 9))
    assert sorted(p.name for p in (out / "checkpoints").glob("step*.ckpt")) == ["step0000004.ckpt",
                                                                                "step0000008.ckpt"]


@pytest.mark.parametrize("stop", ["step", "epoch_end"])
def test_a_stop_before_trainer_min_steps_writes_no_checkpoint_per_step(shapes_shards, tmp_path, monkeypatch, stop,
                                                                       single_torch_thread):
    """Lightning trains on to trainer.min_steps (min_epochs) with `should_stop` left set: last.ckpt was written at
    every step (and, for a stop at an epoch's end, at that epoch's end, counted twice)."""
    from ldm.callbacks.checkpoint import Checkpoint

    saved: list[int] = []
    save = Checkpoint.save

    def counting(self, trainer, periodic, requested=False):
        path = save(self, trainer, periodic, requested)
        saved.append(trainer.global_step) if path is not None else None
        return path

    monkeypatch.setattr(Checkpoint, "save", counting)
    if stop == "step":
        steps = run(shapes_shards, tmp_path / "run", 6, AUTOENCODER + [
            "+callbacks.stop._target_=scale_helpers.StopAtStep", "+callbacks.stop.step=1", "+trainer.min_steps=4"],
                    every=100)
        assert sorted(steps) == [1, 2, 3, 4] and saved == [4]
    else:  # stopped at the end of epoch 1 of 4 steps, held off to min_epochs=2
        steps = run(shapes_shards, tmp_path / "run", 12, AUTOENCODER + [
            "+callbacks.stop._target_=scale_helpers.StopAtEpochEnd", "+trainer.min_epochs=2"], every=100)
        assert sorted(steps) == list(range(1, 9)) and saved == [8]


def stop_min_steps(shards, out, full, extra):
    # a stop at step 1 that Lightning holds off to trainer.min_steps=4 (and the min_epochs=1 it sets with it): the
    # step-4 last.ckpt was written after the loop had closed the epoch
    steps = run(shards, out, FULL_STEPS, extra + ["+callbacks.stop._target_=scale_helpers.StopAtStep",
                                                 "+callbacks.stop.step=1", "+trainer.min_steps=4"])
    assert sorted(steps) == [1, 2, 3, 4]
    return None, 4


def stop_at_epoch_end(shards, out, full, extra):
    # a stop set in on_train_epoch_end (the Timer's other check): last.ckpt came from on_train_end, past the epoch
    steps = run(shards, out, FULL_STEPS, extra + ["+callbacks.stop._target_=scale_helpers.StopAtEpochEnd"], every=3)
    assert sorted(steps) == [1, 2, 3, 4]
    return None, 4


def stop_torn_last(shards, out, full, extra):
    run(shards, out, 5, extra)  # step0000002, step0000004 and last.ckpt (step 5)
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # cut short, as by a crash of the disk
    (checkpoints / ".last.ckpt.abc123.tmp").write_bytes(b"half a checkpoint")  # a write killed mid-way
    return None, 4


STOPS = {"periodic": stop_periodic, "validation": stop_validation, "end_of_run": stop_end_of_run,
         "epoch_end_run": stop_epoch_end_run, "epoch_end": stop_epoch_end, "sigusr1": _stop_on("SIGUSR1"),
         "sigterm": _stop_on("SIGTERM"), "sigint": _stop_on("SIGINT"), "should_stop": stop_should_stop,
         "min_steps": stop_min_steps, "epoch_end_stop": stop_at_epoch_end, "torn_last": stop_torn_last}
# in `make test`; the rest with `make test-all`
FAST = {"end_of_run", "epoch_end_run", "sigint", "should_stop", "min_steps", "epoch_end_stop", "torn_last"}


def check_resume(shards: Path, root: Path, stop: str, extra: list[str], full_name: str = "full") -> None:
    full_dir = root / full_name
    if not (full_dir / "record").exists():
        run(shards, full_dir, FULL_STEPS, extra)
    full = {int(k): v for k, v in load_json(full_dir / "record" / "steps-rank0.json")["steps"].items()}
    assert sorted(full) == list(range(1, FULL_STEPS + 1))

    out = root / f"{stop}-{full_name}"
    resume_from, saved_step = STOPS[stop](shards, out, full_dir, extra)
    first = {} if resume_from is not None and resume_from.is_relative_to(full_dir) else \
        {int(k): v for k, v in load_json(out / "record" / "steps-rank0.json")["steps"].items()}
    resumed = run(shards, out, FULL_STEPS, extra + ([f"ckpt_path={resume_from}"] if resume_from else []))
    assert sorted(resumed) == list(range(saved_step + 1, FULL_STEPS + 1)), f"resumed at the wrong step: {resumed}"
    for step in range(1, FULL_STEPS + 1):
        got = resumed.get(step, first.get(step, full[step]))
        assert got == full[step], f"{stop}: step {step}: {got} != {full[step]}"
    assert_same_checkpoint(full_dir / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt", FULL_STEPS)
    names = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".json"))
    assert not [n for n in names if "-v" in n or n.endswith(".tmp")], names  # no duplicates, no leftovers


@pytest.fixture(scope="module")
def autoencoder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("resume_autoencoder")


@pytest.fixture(scope="module")
def ldm_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume_ldm")
    tiny_autoencoder_export(root / "ae")
    return root


def _cases() -> list[Any]:
    return [pytest.param(stop, id=stop, marks=() if stop in FAST else pytest.mark.slow) for stop in STOPS]


@pytest.mark.parametrize("stop", _cases())
def test_autoencoder_resume_is_exact(shapes_shards, autoencoder_root, stop, single_torch_thread):
    check_resume(shapes_shards, autoencoder_root, stop, AUTOENCODER)


def test_default_callbacks_keep_resume_exact(shapes_shards, autoencoder_root, single_torch_thread):
    """The end-of-run case with every default callback (throughput, learning-rate monitor) as a user runs it."""
    check_resume(shapes_shards, autoencoder_root, "end_of_run", AUTOENCODER, full_name="full_default_callbacks")


@pytest.mark.parametrize("stop", [pytest.param(stop, id=stop, marks=() if stop == "end_of_run" else pytest.mark.slow)
                                  for stop in STOPS])
def test_latent_diffusion_resume_is_exact(shapes_shards, ldm_root, stop, single_torch_thread):
    """Noise from step_generator, AdamW, the warmup schedule and the data position all continue exactly, and so does
    the UNet's dropout, which draws from the global RNG streams that RngState saves and restores."""
    check_resume(shapes_shards, ldm_root, stop,
                 tiny_ldm_overrides(ldm_root / "ae") + ["model.ema_decay=null", "model.unet.dropout=0.1"])


@pytest.mark.slow
def test_latent_diffusion_resume_with_ema_is_exact(shapes_shards, tmp_path, single_torch_thread):
    tiny_autoencoder_export(tmp_path / "ae")
    check_resume(shapes_shards, tmp_path, "end_of_run", tiny_ldm_overrides(tmp_path / "ae"))


@pytest.mark.slow
def test_autoencoder_auto_resume_with_gan_and_ema_is_exact(shapes_shards, tmp_path, single_torch_thread):
    """The discriminator step (outside Lightning's step count) and the EMA are active across the resume."""
    check_resume(shapes_shards, tmp_path, "end_of_run",
                 ["model=autoencoder/kl_tiny", "model.net.ch=16", "model.loss.disc_start=2", "model.ema_decay=0.9"]
                )


def test_a_periodic_checkpoint_of_a_validation_step_is_written_after_that_validation(shapes_shards, tmp_path,
                                                                                     single_torch_thread):
    """Written before it (as Lightning's ModelCheckpoint), the checkpoint of a step with a scheduled validation lacked
    what that validation measured, and a run resumed from it (a SIGKILL during the validation, or ckpt_path=) never
    ran it: its metrics lost, stage 1's latent scale of an older step (12% apart) in the export."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    run(shapes_shards, full, 5, AUTOENCODER)  # validations at steps 2 and 4, checkpoints there
    assert torch.load(full / "checkpoints" / "step0000004.ckpt", weights_only=True)["latent_stats"]["step"] == 4
    run(shapes_shards, resumed, 5, AUTOENCODER + [f"ckpt_path={full}/checkpoints/step0000004.ckpt"])
    assert_same_checkpoint(full / "checkpoints" / "last.ckpt", resumed / "checkpoints" / "last.ckpt", 5)
    assert load_json(resumed / "export" / "latent_stats.json") == load_json(full / "export" / "latent_stats.json")


def test_missing_last_resumes_from_the_newest_periodic_checkpoint(shapes_shards, tmp_path, single_torch_thread):
    """auto_resume without last.ckpt (deleted, or never renamed into place) takes the newest step file; a copy of the
    run directory resumes from its newest checkpoint whatever the copies' modification times."""
    out = tmp_path / "run"
    run(shapes_shards, out, 4, AUTOENCODER, every=3)  # step0000003.ckpt, last.ckpt at 4
    (out / "checkpoints" / "last.ckpt").unlink()
    resumed = run(shapes_shards, out, 5, AUTOENCODER, every=3)
    assert sorted(resumed) == [4, 5]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5

    # Copied as `cp -r` does (new modification times, here the older checkpoint's the newest): the time stored in
    # each checkpoint still says which is newest.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, copy_function=shutil.copy)
    os.utime(copy / "checkpoints" / "step0000003.ckpt")
    assert sorted(run(shapes_shards, copy, 6, AUTOENCODER, every=3)) == [6]
    shutil.rmtree(out)
    shutil.rmtree(copy)


@pytest.mark.parametrize("save_last", [True, False])
def test_a_signal_at_the_last_step_lets_the_run_finish(shapes_shards, tmp_path, monkeypatch, save_last,
                                                       single_torch_thread):
    """SIGUSR1 (SLURM's time-limit warning) during the run's last step: nothing is left to train, so the job is not
    requeued (a requeued job would skip its final evaluation) and the run ends as usual, its last step in last.ckpt
    even with save_last=false (the time limit may cut the final evaluation and export short)."""
    bin_dir, log = fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    out = tmp_path / "run"
    steps = run(shapes_shards, out, 3, AUTOENCODER + ["+callbacks.signal._target_=scale_helpers.SignalAtStep",
                                                      "+callbacks.signal.step=2",
                                                      f"callbacks.checkpoint.save_last={save_last}"])
    assert sorted(steps) == [1, 2, 3] and not log.exists(), "requeued a finished run"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert (out / "export" / "latent_stats.json").is_file()  # the run finished: it exports


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["end_of_run", "sigint", "should_stop"])
def test_latent_diffusion_resume_with_gradient_accumulation_is_exact(shapes_shards, ldm_root, stop,
                                                                     single_torch_thread):
    """Checkpoints, signal stops and a callback's stop (trainer.max_time's Timer, at a micro-batch: it wrote
    last.ckpt after the loop had closed the epoch, the step's gradients lost) wait for the batch that steps:
    accumulated gradients never need saving."""
    extra = tiny_ldm_overrides(ldm_root / "ae") + ["model.ema_decay=null", "trainer.accumulate_grad_batches=2"]
    root = ldm_root / "accumulate"
    if not (root / "full" / "record").exists():
        run(shapes_shards, root / "full", FULL_STEPS, extra)
    out = root / stop
    signal = {"sigint": ["+callbacks.signal._target_=scale_helpers.SignalAtStep", "+callbacks.signal.step=1",
                         "+callbacks.signal.signal_name=SIGINT"],
              "should_stop": ["+callbacks.stop._target_=scale_helpers.StopAtStep", "+callbacks.stop.step=1",
                              "+callbacks.stop.after=1"]}.get(stop, [])  # the first micro-batch of step 2
    first = run(shapes_shards, out, 3 if stop == "end_of_run" else FULL_STEPS, extra + signal)
    assert max(first) == (3 if stop == "end_of_run" else 2)
    run(shapes_shards, out, FULL_STEPS, extra)
    assert_same_checkpoint(root / "full" / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt", FULL_STEPS,
                           samples_per_step=2 * 16)


def test_a_resume_with_another_accumulation_must_start_on_a_step_boundary(shapes_shards, ldm_root, tmp_path,
                                                                         single_torch_thread):
    """3 single-batch steps stop 3 batches into a 4-batch epoch: resumed with 2, Lightning logged every later step
    one behind global_step (two rows of one step) and made the first step of 1 batch; refused, naming the key. At an
    epoch's end (2 steps of 2) any k resumes, and the logged steps follow global_step."""
    extra = tiny_ldm_overrides(ldm_root / "ae") + ["model.ema_decay=null", "trainer.log_every_n_steps=1"]
    mid = tmp_path / "mid"
    run(shapes_shards, mid, 3, extra)
    with pytest.raises(ConfigError, match=r"trainer\.accumulate_grad_batches=2, where ckpt_path=.*last\.ckpt was "
                                          r"written with 1 at 3 batches into its epoch.*resume with "
                                          r"trainer\.accumulate_grad_batches=1 \(or a divisor of 3\)"):
        run(shapes_shards, mid, 4, extra + ["trainer.accumulate_grad_batches=2", "ckpt_path=last"])
    end = tmp_path / "end"
    run(shapes_shards, end, 2, extra + ["trainer.accumulate_grad_batches=2"])
    run(shapes_shards, end, 3, extra + ["trainer.accumulate_grad_batches=3", "ckpt_path=last"])
    assert torch.load(end / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    with open(end / "csv" / "metrics.csv") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert logged == [0, 1, 2]


@pytest.mark.parametrize("stop_after", [4, 3])
def test_a_signal_with_validation_time_checkpoints_resumes_exactly(shapes_shards, tmp_path, stop_after,
                                                                   single_torch_thread):
    """With a checkpoint after each validation (every_n_train_steps=null, quickstart_vae's; validation every 3
    steps), a signal that stops the run after step 4 (an epoch's last): Lightning validated once more after the stop
    and that validation's checkpoint replaced last.ckpt, which resumed a batch off (epoch 1's first batch trained
    twice) and logged every later step one too low. After step 3 the validation is the schedule's: it runs, and its
    checkpoint and logs are the uninterrupted run's."""
    extra = AUTOENCODER + ["callbacks.checkpoint.every_n_train_steps=null"]
    full = run(shapes_shards, tmp_path / "full", FULL_STEPS, extra, every=3)
    out = tmp_path / "stopped"
    first = run(shapes_shards, out, FULL_STEPS, extra + ["+callbacks.signal._target_=scale_helpers.SignalAtStep",
                                                         f"+callbacks.signal.step={stop_after - 1}",
                                                         "+callbacks.signal.signal_name=SIGTERM"], every=3)
    assert sorted(first) == list(range(1, stop_after + 1))
    assert (out / "checkpoints" / "step0000003.ckpt").exists()
    resumed = run(shapes_shards, out, FULL_STEPS, extra, every=3)
    assert sorted(resumed) == list(range(stop_after + 1, FULL_STEPS + 1))
    assert all(resumed[s] == full[s] for s in resumed)
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt",
                           FULL_STEPS)

    def logged_steps(run_dir: Path, key: str) -> list[int]:
        with open(run_dir / "csv" / "metrics.csv") as f:
            return [int(row["step"]) for row in csv.DictReader(f) if row.get(key)]

    for key in ("train/rec_loss", "val/rec_loss"):  # each step once, none missing
        assert logged_steps(out, key) == logged_steps(tmp_path / "full", key), key


def test_a_signal_at_a_validation_step_keeps_what_the_validation_measured(shapes_shards, tmp_path,
                                                                          single_torch_thread):
    """Periodic checkpoints (every 2 steps, as validation), a signal during step 4: last.ckpt is written at the end
    of step 4, and again after the validation the schedule holds there, so the latent statistics it measured reach
    the checkpoint; the resumed run's export (no validation after step 4) carries step 4's, as the uninterrupted
    run's does, not step 2's."""
    full = run(shapes_shards, tmp_path / "full", 5, AUTOENCODER)
    out = tmp_path / "stopped"
    signal = ["+callbacks.signal._target_=scale_helpers.SignalAtStep", "+callbacks.signal.step=3",
              "+callbacks.signal.signal_name=SIGTERM"]
    first = run(shapes_shards, out, 5, AUTOENCODER + signal)
    assert sorted(first) == [1, 2, 3, 4]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["latent_stats"]["step"] == 4
    assert not (out / "export").exists()  # a stop before the last step exports nothing: the model is not finished
    for read, key in ((lambda path: load_autoencoder_any(path, "model.autoencoder_path"), "model.autoencoder_path"),
                      (holds_autoencoder, "ckpt_path")):  # (stage 2, ldm-encode, model.init_from; ldm-export)
        with pytest.raises(CheckpointError, match=rf"{key}=\S+ is a run directory without an export .* run its "
                                                  rf"ldm-train command again to finish it, or give its checkpoint, "
                                                  rf"{key}=\S+/checkpoints/last.ckpt"):
            read(out)
    resumed = run(shapes_shards, out, 5, AUTOENCODER)
    assert sorted(resumed) == [5] and resumed[5] == full[5]
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt", out / "checkpoints" / "last.ckpt", 5)
    exported = [load_json(d / "export" / "latent_stats.json") for d in (tmp_path / "full", out)]
    assert exported[0]["step"] == 4 and exported[1] == exported[0]


def test_resuming_into_a_longer_run_follows_the_new_schedule_from_its_first_step(shapes_shards, tmp_path,
                                                                                 single_torch_thread):
    """A cosine schedule rebuilt for a larger trainer.max_steps: the first resumed step trained at the old schedule's
    rate (0 after a finished run), restored with the optimizer, and only the later ones on the new curve."""
    extra = AUTOENCODER + ["model.lr_schedule=cosine", "model.warmup_steps=2"]
    out = tmp_path / "run"
    run(shapes_shards, tmp_path / "fresh", 6, extra)
    run(shapes_shards, out, 4, extra)
    with pytest.warns(UserWarning, match=r"lr at step 4: .* \(the schedule changed: its length, set by "
                                         r"trainer\.max_steps, or max_epochs .* or model\.lr_schedule, "):
        run(shapes_shards, out, 6, extra)

    def rates(run_dir: Path) -> dict[int, float]:
        with open(run_dir / "csv" / "metrics.csv") as f:
            return {int(row["step"]): float(row["lr/autoencoder"]) for row in csv.DictReader(f)
                    if row.get("lr/autoencoder")}

    fresh, resumed = rates(tmp_path / "fresh"), rates(out)
    assert resumed[4] == pytest.approx(fresh[4]) and fresh[4] > 0  # step 5, the first after the resume
    assert resumed[5] == pytest.approx(fresh[5])


def test_save_top_k_prunes_the_checkpoint_a_run_resumed_from(shapes_shards, tmp_path, single_torch_thread):
    """The newest periodic checkpoint did not list itself (added to `kept` after the save), so each resume left one
    file more than save_top_k."""
    out = tmp_path / "run"
    run(shapes_shards, out, 4, AUTOENCODER + ["callbacks.checkpoint.save_top_k=1"])
    run(shapes_shards, out, 6, AUTOENCODER + ["callbacks.checkpoint.save_top_k=1"])
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step0000006.ckpt"]
    # A copy of the run directory (`cp -r`) prunes its own files: the kept list held absolute paths of the original.
    shutil.copytree(out, tmp_path / "copy")
    run(shapes_shards, tmp_path / "copy", 8, AUTOENCODER + ["callbacks.checkpoint.save_top_k=1"])
    assert sorted(p.name for p in (tmp_path / "copy" / "checkpoints").glob("*.ckpt")) == ["last.ckpt",
                                                                                         "step0000008.ckpt"]
    # A step saved twice (periodic, and the end of epoch 1 at step 4) is kept once: its second save did not prune it.
    run(shapes_shards, tmp_path / "twice", 5, AUTOENCODER + ["callbacks.checkpoint.save_top_k=1",
                                                             "callbacks.checkpoint.save_on_train_epoch_end=true"])
    assert sorted(p.name for p in (tmp_path / "twice" / "checkpoints").glob("*.ckpt")) == ["last.ckpt",
                                                                                          "step0000004.ckpt"]


def test_checkpoints_outside_the_run_directory_resume_and_a_bad_name_fails_at_start(shapes_shards, tmp_path,
                                                                                   single_torch_thread):
    """`callbacks.checkpoint.dirpath` elsewhere: the same command started over from step 0 and replaced the
    checkpoints there (resume looked in <paths.output_dir>/checkpoints only). A filename with a metric in it failed
    at the first checkpoint, after the steps before it had run."""
    from hydra.errors import InstantiationException

    elsewhere = [f"callbacks.checkpoint.dirpath={tmp_path / 'fast_disk'}"]
    run(shapes_shards, tmp_path / "run", 4, AUTOENCODER + elsewhere)
    assert sorted(run(shapes_shards, tmp_path / "run", 6, AUTOENCODER + elsewhere)) == [5, 6]
    assert torch.load(tmp_path / "fast_disk" / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 6
    from ldm.callbacks.checkpoint import Checkpoint

    assert Checkpoint(dirpath="~/fast_disk").dirpath == str(Path.home() / "fast_disk")  # where resume looks
    with pytest.raises(InstantiationException, match=r"callbacks\.checkpoint\.filename='step\{step\}-\{val/loss:"
                                                    r"\.3f\}': KeyError: 'val/loss'; a name takes the fields \{step\}"):
        run(shapes_shards, tmp_path / "bad", 4,
            AUTOENCODER + ["callbacks.checkpoint.filename='step{step}-{val/loss:.3f}'"])
    assert not (tmp_path / "bad" / "record").exists()


def test_resume_applies_the_configs_optimizer_settings(shapes_shards, tmp_path, single_torch_thread):
    """Lightning restores the optimizers' hyperparameters with their state: a run resumed with another model.lr,
    betas or weight decay now trains with the config's values, the warmup at its restored position; both of the
    autoencoder's optimizers (model.disc_lr: the discriminator's)."""
    out = tmp_path / "run"
    run(shapes_shards, out, 2, AUTOENCODER + ["model.lr=4e-4"])
    run(shapes_shards, out, 3, AUTOENCODER + ["model.lr=1e-2", "model.disc_lr=2e-3", "model.betas=[0.6,0.95]"])
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    (autoencoder,), (discriminator,) = (state["param_groups"] for state in last["optimizer_states"])
    assert autoencoder["initial_lr"] == 1e-2 and discriminator["initial_lr"] == 2e-3
    assert tuple(autoencoder["betas"]) == tuple(discriminator["betas"]) == (0.6, 0.95)
    assert [s["base_lrs"] for s in last["lr_schedulers"]] == [[1e-2], [2e-3]]  # warmup; the discriminator's constant
    assert autoencoder["lr"] == pytest.approx(1e-2 * 3 / 4)  # warmup_steps=4: 3 of 4 steps in


def test_a_validation_inside_an_accumulation_group_checkpoints_at_its_step(shapes_shards, ldm_root,
                                                                           single_torch_thread):
    """`trainer.val_check_interval` counts batches (Lightning's); with 3 accumulated batches and 4-batch epochs (each
    epoch ends on a partial group) validation every 3 batches falls inside a group at validations 2 and 3. Their
    checkpoints wait for the batch that steps, so resuming from one equals the uninterrupted run."""
    extra = tiny_ldm_overrides(ldm_root / "ae") + ["model.ema_decay=null", "trainer.accumulate_grad_batches=3",
                                                   "callbacks.checkpoint.every_n_train_steps=null"]
    full = run(shapes_shards, ldm_root / "validation_accumulate", FULL_STEPS, extra, every=3)
    checkpoints = ldm_root / "validation_accumulate" / "checkpoints"
    # validations after batches 3, 6, 9, 12 (steps end after batches 3, 4, 7, 8, 11, 12)
    assert sorted(p.name for p in checkpoints.glob("step*.ckpt")) == [f"step000000{s}.ckpt" for s in (1, 3, 5, 6)]
    out = ldm_root / "validation_accumulate_resumed"
    resumed = run(shapes_shards, out, FULL_STEPS, extra + [f"ckpt_path={checkpoints / 'step0000003.ckpt'}"], every=3)
    assert sorted(resumed) == [4, 5, 6] and all(resumed[s] == full[s] for s in resumed)
    assert_same_checkpoint(checkpoints / "last.ckpt", out / "checkpoints" / "last.ckpt", FULL_STEPS,
                           samples_per_step=2 * 16)  # 12 batches of 16 in 6 steps
