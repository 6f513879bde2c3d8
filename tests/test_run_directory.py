"""A run directory belongs to one run at a time (the lock), and keeps the logs of every segment of that run."""

from __future__ import annotations

import csv
import errno
import json
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf
from scale_helpers import compose_train, run_cli, tiny_overrides

from ldm.cli.run_lock import LOCK_NAME, RunDirectoryLocked, acquire, release, run_lock
from ldm.cli.train import train
from ldm.config import ConfigError
from ldm.loggers import AppendingCSVLogger

AUTOENCODER = ["model.net.ch=16"]


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def _write_lock(directory: Path, **holder) -> Path:
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "slurm_job_id": None,
                                "started": "2026-01-01 00:00:00", **holder}))
    return path


# -- the lock ----------------------------------------------------------------------------------------------------------


def test_second_holder_is_refused_naming_directory_holder_and_fix(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    path = acquire(tmp_path)
    holder = json.loads(path.read_text())
    assert holder["pid"] > 0 and holder["host"] == socket.gethostname()
    with pytest.raises(RunDirectoryLocked) as info:
        acquire(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, ConfigError) and "\n" not in message
    assert f"paths.output_dir={tmp_path}" in message and str(path) in message and "another paths.output_dir" in message
    release(path)
    assert not path.exists()
    release(acquire(tmp_path))  # free again


def test_the_lock_works_on_a_file_system_without_hard_links(tmp_path, monkeypatch):
    """exFAT and FAT32 (a drive shared between a Mac and Windows) refuse hard links with EPERM: ldm-data, ldm-train
    and ldm-encode stopped there with "Operation not permitted" on the lock file."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)

    def no_links(*_args: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # (this file system's answer on exFAT)
    path = acquire(tmp_path)
    assert json.loads(path.read_text())["pid"] == os.getpid()
    with pytest.raises(RunDirectoryLocked):
        acquire(tmp_path)
    release(path)
    assert sorted(tmp_path.iterdir()) == []  # no temp file left
    release(acquire(tmp_path))


def _start_together(directory: Path, won: Any, ready: Any, tried: Any) -> None:
    """A starter of a run (a child process): takes the lock once every starter is ready; one that won holds it until
    every starter has tried (a second would win after its release)."""
    ready.wait(60)
    try:
        path = acquire(directory)
    except RunDirectoryLocked:
        tried.wait(60)
        return
    won.put(os.getpid())
    tried.wait(60)
    release(path)


def test_of_starters_taking_over_a_stale_lock_at_once_one_wins(tmp_path, monkeypatch):
    """Each of two starters that read the same stale lock removed the lock file, the second removing the first's new
    one, and both ran: the takeover moves the stale file aside first and puts back a lock that is not it."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    fork = multiprocessing.get_context("fork")
    for _ in range(3):
        _write_lock(tmp_path, pid=_dead_pid())
        won = fork.Queue()
        ready, tried = fork.Barrier(6), fork.Barrier(6)
        starters = [fork.Process(target=_start_together, args=(tmp_path, won, ready, tried)) for _ in range(6)]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join(30)
        assert len([won.get() for _ in range(won.qsize())]) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # (no file moved aside left)


def test_stale_locks_are_taken_over_live_ones_are_not(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _write_lock(tmp_path, pid=_dead_pid())
    release(acquire(tmp_path))
    out = capsys.readouterr().out
    assert "taking over" in out and "is no longer running on this host" in out
    _write_lock(tmp_path, pid=_dead_pid(), host="another-host")  # cannot tell from here: refused
    with pytest.raises(RunDirectoryLocked, match="on host another-host"):
        acquire(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")  # a requeued job, possibly on another node: its own earlier run
    _write_lock(tmp_path, pid=_dead_pid(), host="another-host", slurm_job_id="4242")
    release(acquire(tmp_path))
    assert "earlier run of this SLURM job 4242" in capsys.readouterr().out
    # the same run of the job (the same restart count) on another node: a step running beside this one, not stale
    _write_lock(tmp_path, pid=1, host="another-host", slurm_job_id="4242", slurm_restart_count="0")
    with pytest.raises(RunDirectoryLocked, match="on host another-host"):
        acquire(tmp_path)
    _write_lock(tmp_path, pid=1, slurm_job_id="4242")  # same job, this host, alive: a second run inside the job
    with pytest.raises(RunDirectoryLocked):
        acquire(tmp_path)
    # requeued onto the same node, where the killed run's pid now belongs to another live process: the restart count
    # tells the runs apart (the lock stopped the requeued job)
    _write_lock(tmp_path, pid=1, slurm_job_id="4242", slurm_restart_count="0")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    path = acquire(tmp_path)
    assert "an earlier run (restart 0) of this SLURM job 4242" in capsys.readouterr().out
    assert json.loads(path.read_text())["slurm_restart_count"] == "1"
    release(path)
    (tmp_path / LOCK_NAME).write_text("")  # torn by a crash between create and write, a while ago
    os.utime(tmp_path / LOCK_NAME, (time.time() - 60, time.time() - 60))
    release(acquire(tmp_path))
    assert not (tmp_path / LOCK_NAME).exists()
    # ... and one being written: another starter's exclusive create where there are no hard links (exFAT), empty
    # until its record follows; it was taken over at once, and both runs went on
    (tmp_path / LOCK_NAME).write_text("")
    writer = threading.Timer(0.3, lambda: (tmp_path / LOCK_NAME).write_text(json.dumps(
        {"pid": 1, "host": socket.gethostname(), "started": "now"})))
    writer.start()
    with pytest.raises(RunDirectoryLocked, match="in use by another ldm-train .pid 1 on host"):
        acquire(tmp_path)
    writer.join()


def test_a_second_ldm_data_into_the_output_dir_is_refused(tmp_path, monkeypatch):
    """Two ldm-data runs into one output_dir: the second removed the first's staging folder as a killed run's (the
    first stopped with a FileNotFoundError, its work lost); now it is refused, naming the first."""
    from ldm.cli.data import write_dataset

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    out = tmp_path / "data"
    out.mkdir()
    (out / "data.lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "started": "then"}))
    with pytest.raises(RunDirectoryLocked, match=rf"output_dir={out} is in use by another ldm-data \(pid 1 .* "
                                                 r"choose another output_dir"):
        write_dataset({"output_dir": str(out), "num_samples": 8, "val_samples": 0, "resolution": 8})
    (out / "data.lock").unlink()
    write_dataset({"output_dir": str(out), "num_samples": 8, "val_samples": 0, "resolution": 8})
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "train-000000.tar"]


def test_other_ranks_do_not_take_the_lock(tmp_path, monkeypatch):
    _write_lock(tmp_path, pid=1)  # held by a live process (init) on this host
    for variable in ("LOCAL_RANK", "RANK", "SLURM_PROCID", "NODE_RANK"):
        monkeypatch.setenv(variable, "1")
        with run_lock(tmp_path) as lock:  # rank > 0 of the run that holds it: passes, touches nothing
            assert lock is None
        monkeypatch.delenv(variable)
    with pytest.raises(RunDirectoryLocked):
        with run_lock(tmp_path):
            pass


def test_torchrun_ranks_wait_for_their_launchs_lock(tmp_path, monkeypatch):
    """Under torchrun, rank 0 of ldm-encode was refused a folder another live encode held, while rank 1 had already
    removed that run's temp files and written its shards there: the other ranks now wait until the lock is their
    launch's, or absent."""
    from ldm.cli.run_lock import launch_id, read_lock, wait_for_launch_lock

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    _write_lock(tmp_path, pid=1).rename(tmp_path / "encode.lock")  # another run's, live (init's pid)
    wait_for_launch_lock(tmp_path, "ldm-encode", timeout_s=0)  # outside torchrun: as before
    for name, value in {"TORCHELASTIC_RUN_ID": "none", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
                        "TORCHELASTIC_RESTART_COUNT": "0"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RunDirectoryLocked, match=r"output_dir=.* is in use by another ldm-encode \(pid 1 .* rank 0 of "
                                                 r"this launch did not take it over within 0 s"):
        wait_for_launch_lock(tmp_path, "ldm-encode", timeout_s=0)
    (tmp_path / "encode.lock").unlink()
    wait_for_launch_lock(tmp_path, "ldm-encode", timeout_s=0)  # none held (or rank 0 done)
    path = acquire(tmp_path, "ldm-encode")  # as rank 0 takes it
    # a static single-node launch's id (`none`, loopback) is this host's alone: another host's is another launch
    assert read_lock(path)["launch"] == launch_id() == f"none:127.0.0.1@{socket.gethostname()}:29500:0::"
    wait_for_launch_lock(tmp_path, "ldm-encode", timeout_s=0)
    monkeypatch.setenv("MASTER_PORT", "29501")  # another launch on this node
    with pytest.raises(RunDirectoryLocked):
        wait_for_launch_lock(tmp_path, "ldm-encode", timeout_s=0)
    release(path)


def test_ldm_train_into_a_busy_directory_stops_at_start(shapes_shards, tmp_path):
    """The real CLI: a live holder (this test process) -> an error naming the directory, before anything is written.
    (Taking over a stale lock, and releasing it at the end of a run, are covered in-process above and below.)"""
    out = tmp_path / "run"
    (out / ".hydra" / "2026-01-01_00-00-00").mkdir(parents=True)
    holders = out / ".hydra" / "2026-01-01_00-00-00" / "config.yaml"
    holders.write_text("the live run's Hydra config\n")
    lock = _write_lock(out, pid=os.getpid())
    args = tiny_overrides(shapes_shards, out, max_steps=1, every=1) + AUTOENCODER
    busy = run_cli(args, timeout=300)
    assert busy.returncode != 0
    output = busy.stdout + busy.stderr
    assert f"paths.output_dir={out} is in use by another ldm-train" in output, output[-2000:]
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()
    assert holders.read_text() == "the live run's Hydra config\n"  # Hydra's files of each start in their own folder
    assert json.loads(lock.read_text())["pid"] == os.getpid()  # the holder's lock is left alone


# -- logs of every segment -------------------------------------------------------------------------------------------


def _train_rows(path: Path) -> list[dict[str, str]]:
    """The rows of training metrics, keyed by step, without timing columns (they differ between runs)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k == "step" or k.startswith("train/")} for row in rows
            if row.get("train/rec_loss")]


def test_resumed_run_appends_to_metrics_csv(shapes_shards, tmp_path, single_torch_thread):
    def run(out: Path, steps: int) -> None:
        train(compose_train(tiny_overrides(shapes_shards, out, max_steps=steps, every=2) + AUTOENCODER))

    run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)
    run(tmp_path / "split", 4)  # auto_resume from last.ckpt at step 2
    full, split = (_train_rows(tmp_path / d / "csv" / "metrics.csv") for d in ("full", "split"))
    assert [row["step"] for row in full] == ["0", "1", "2", "3"]
    assert split == full  # both segments, every step, the same numbers
    # the loggers get the resolved config, not the module's config beside it (W&B's table: config.lr and model.lr)
    logged = OmegaConf.load(tmp_path / "split" / "csv" / "hparams.yaml")
    assert {"model", "data", "trainer"} <= set(logged) and not {"config", "initialized"} & set(logged)


def test_csv_logger_widens_its_header_for_new_metrics(tmp_path):
    first = AppendingCSVLogger(str(tmp_path))
    first.log_metrics({"train/loss": 1.0}, step=0)
    first.finalize("success")
    second = AppendingCSVLogger(str(tmp_path), flush_logs_every_n_steps=1)
    second.log_metrics({"train/loss": 0.5}, step=1)
    second.log_metrics({"train/loss": 0.25, "val/psnr": 20.0}, step=2)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["train/loss"], r["val/psnr"]) for r in rows] == [("0", "1.0", ""), ("1", "0.5", ""),
                                                                          ("2", "0.25", "20.0")]
    with pytest.raises(ConfigError, match=r"flush_logs_every_n_steps='abc' must be a whole number >= 1"):
        AppendingCSVLogger(str(tmp_path), flush_logs_every_n_steps="abc")  # (a bare TypeError of '<')


def test_a_run_directory_holds_one_run(shapes_shards, tmp_path, single_torch_thread):
    """A wiring check (debug=fast_dev_run) in a run's directory resumed it, trained nothing and wrote a config.yaml
    and an export over the run's; a fresh start there (auto_resume=false, which a refusal suggested) mixed two runs'
    checkpoints and logs; rerunning a finished run with another value trained nothing yet rewrote config.yaml and the
    export."""
    out = tmp_path / "run"
    base = tiny_overrides(shapes_shards, out, max_steps=2, every=2) + AUTOENCODER + [
        "+callbacks.image_logger._target_=ldm.callbacks.image_logger.ImageLogger",
        f"+callbacks.image_logger.save_dir={out / 'images'}", "+callbacks.image_logger.every_n_steps=1"]
    train(compose_train(base))
    assert len(list((out / "images").rglob("*.png"))) == 9  # 3 grids each: train at steps 1 and 2, val at step 2
    written = {path: path.read_bytes() for path in [out / "config.yaml", *sorted((out / "export").iterdir()),
                                                    *sorted((out / "checkpoints").iterdir()),
                                                    *sorted((out / "images").rglob("*.png")),
                                                    *sorted((out / "csv").iterdir())]}

    stamps = {path: path.stat().st_mtime_ns for path in written}
    train(compose_train([*base, "debug=fast_dev_run", "trainer.max_steps=4"]))
    assert train(compose_train([*base, "model.lr=5e-4"])) == {}  # at max_steps already: nothing to train
    assert {path: path.read_bytes() for path in written} == written
    assert {path: path.stat().st_mtime_ns for path in written} == stamps  # not even written again (an export
    # written again under the command's settings, another prediction type say, no longer matched its weights)
    exported = {path: path.read_bytes() for path in written if path.parent.name == "export"}
    shutil.rmtree(out / "export")  # (a run killed after its last checkpoint, before its export): written again
    train(compose_train(base))
    assert {path: path.read_bytes() for path in exported} == exported
    # ... and one torn by a failed write (a full disk: the folder and the weights, no config.json): it was taken for
    # written ("stays as the earlier segment wrote it"), and every reader asked for the run to be finished
    (out / "export" / "config.json").unlink()
    train(compose_train(base))
    assert {path: path.read_bytes() for path in exported} == exported
    assert sorted((out / "checkpoints").iterdir()) == [p for p in written if p.parent.name == "checkpoints"]
    assert sorted((out / "images").rglob("*.png")) == [p for p in written if p.suffix == ".png"]

    with pytest.raises(ConfigError, match=r"debug=fast_dev_run .* ckpt_path=last would restore a run past that "
                                          r"batch and check nothing"):
        train(compose_train([*base, "debug=fast_dev_run", "ckpt_path=last"]))
    with pytest.raises(ConfigError, match=r"checkpoints holds the checkpoints of an earlier run \(newest: "
                                          r"last\.ckpt\); a fresh start there would mix"):
        train(compose_train([*base, "auto_resume=false"]))
    with pytest.raises(ConfigError, match=r"another paths\.output_dir$"):  # the old advice, auto_resume=false, gone
        train(compose_train([*base, "model.net.ch=32"]))


def test_lightning_messages_and_warnings_reach_the_run_log(tmp_path, monkeypatch):
    """train.log missed every resume, stop, save and export message (Lightning's logger does not pass records on to
    the root logger, whose file handler Hydra sets up) and every warning."""
    import logging
    import warnings

    from lightning.pytorch.utilities import rank_zero_info

    from ldm.cli.train import lightning_into_run_log

    monkeypatch.setattr(logging.getLogger("lightning.pytorch"), "propagate", False)  # as in ldm-train's process
    root, handler = logging.getLogger(), logging.FileHandler(tmp_path / "train.log")
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with lightning_into_run_log(tmp_path / "elsewhere"):  # another run's log: left alone
                rank_zero_info("a message of another run")
            with lightning_into_run_log(tmp_path / "sub" / ".."):  # the same folder, spelt with `..`
                rank_zero_info("auto_resume: resuming from somewhere")
                warnings.warn("a warning of the run", UserWarning, stacklevel=1)
            rank_zero_info("after the run")
            warnings.warn("a warning after the run", UserWarning, stacklevel=1)
    finally:
        root.removeHandler(handler)
        handler.close()
    text = (tmp_path / "train.log").read_text()
    assert "auto_resume: resuming from somewhere" in text and "UserWarning: a warning of the run" in text
    assert "after the run" not in text and "another run" not in text


def test_a_run_ended_by_max_epochs_and_resumed_trains_and_writes_nothing(shapes_shards, tmp_path,
                                                                           single_torch_thread):
    """Lightning runs the loop of a run resumed at the end of its max_epochs (it closes the restored epoch) without a
    batch: last.ckpt and the export were written again under the new command's settings, and no warning spoke of the
    steps of this resumed run (there are none)."""
    out = tmp_path / "run"
    base = [*tiny_overrides(shapes_shards, out, max_steps=-1, every=3), *AUTOENCODER, "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3"]
    train(compose_train(base))
    kept = {path: path.read_bytes() for path in [*sorted((out / "checkpoints").iterdir()),
                                                 *sorted((out / "export").iterdir())]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(compose_train([*base, "model.lr=5e-4"]))
    assert {path: path.read_bytes() for path in kept} == kept
    assert not [str(w.message) for w in caught if "no validation runs" in str(w.message)]


def test_the_run_directory_is_checked_before_hydra_creates_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture):
    """`CheckRunDirectory` (a Hydra callback of conf/train.yaml): a path under a file is refused in one line naming the
    key (Hydra printed its traceback); a leading `~` is expanded (Hydra made a folder named `~` in the working
    directory); nothing is created (a sweep that a later callback refused left an empty folder)."""
    from ldm.cli.common import CheckRunDirectory

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = OmegaConf.create({"hydra": {"run": {"dir": "~/runs/a"}, "sweep": {"dir": "~/runs/sweep"}}})
    OmegaConf.set_readonly(config.hydra, True)  # as Hydra hands it over
    CheckRunDirectory().on_run_start(config)
    assert config.hydra.run.dir == f"{tmp_path}/home/runs/a" and not (tmp_path / "home").exists()
    with pytest.raises(SystemExit):  # a multirun's jobs are composed from the overrides, which keep the ~
        CheckRunDirectory().on_multirun_start(config)
    assert "hydra.sweep.dir=~/runs/sweep: Hydra does not expand ~ in the jobs' folders of a multirun" in \
        capsys.readouterr().err
    held = OmegaConf.create({"paths": {"runs_dir": "~/runs"},  # named by the key that holds the ~ (not the sweep dir)
                             "hydra": {"sweep": {"dir": "${paths.runs_dir}/train/multirun/2026"}}})
    with pytest.raises(SystemExit):
        CheckRunDirectory().on_multirun_start(held)
    assert f"paths.runs_dir=~/runs: Hydra does not expand ~ in the jobs' folders of a multirun; give the full path " \
           f"({tmp_path}/home/runs)" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for run, problem in ((f"{tmp_path}/a_file/run", f"Not a directory: {tmp_path}/a_file"),
                         (f"{tmp_path}/dangling", f"a link that leads nowhere: {tmp_path}/dangling"),
                         (f"{tmp_path}/dangling/run", f"a link that leads nowhere: {tmp_path}/dangling")):
        with pytest.raises(SystemExit) as stopped:
            CheckRunDirectory().on_run_start(OmegaConf.create({"paths": {"output_dir": run},
                                                               "hydra": {"run": {"dir": "${paths.output_dir}"}}}))
        assert stopped.value.code == 2
        assert capsys.readouterr().err == (f"ldm-train: error: paths.output_dir={run} cannot be the run directory "
                                           f"({problem}); set paths.output_dir to a folder you can write\n")
    with pytest.raises(SystemExit):  # hydra.run.dir set itself is named as such
        CheckRunDirectory().on_run_start(OmegaConf.create({"hydra": {"run": {"dir": f"{tmp_path}/a_file/run"}}}))
    assert capsys.readouterr().err.startswith(f"ldm-train: error: hydra.run.dir={tmp_path}/a_file/run cannot be")
    # set apart from paths.output_dir (a Hydra habit): Hydra's record and the log went there, the checkpoints,
    # config and export to paths.output_dir, and a rerun never resumed
    with pytest.raises(SystemExit):
        CheckRunDirectory().on_run_start(OmegaConf.create({"paths": {"output_dir": str(tmp_path / "elsewhere")},
                                                           "hydra": {"run": {"dir": f"{tmp_path}/run"}}}))
    assert capsys.readouterr().err == (f"ldm-train: error: hydra.run.dir={tmp_path}/run is set apart from "
                                       f"paths.output_dir={tmp_path}/elsewhere, where the run's checkpoints, logs and "
                                       f"export go (and where a rerun looks for the run to resume): set "
                                       f"paths.output_dir={tmp_path}/run instead\n")
    CheckRunDirectory().on_run_start(OmegaConf.create({"paths": {"output_dir": str(tmp_path / "same")},  # one folder
                                                       "hydra": {"run": {"dir": f"{tmp_path}/same/"}}}))


def test_a_run_leaves_its_process_as_it_found_it(shapes_shards, tmp_path, single_torch_thread, monkeypatch):
    """A notebook's or script's next run: after a failed fit Lightning reinstalled the run's own signal handlers,
    which held its Trainer and model for good (one more with each failed run); Lightning's exit after an early
    Ctrl-C (status 1) left SIGINT ignored; an offline W&B run left WANDB_MODE=dryrun for every later run; the float32
    matmul switches stayed set."""
    import gc

    import lightning as L
    import torch

    from ldm.cli.train import process_state_kept

    stops = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)
    before = {s: signal.getsignal(s) for s in stops}

    def trainers() -> int:
        gc.collect()
        return sum(isinstance(o, L.Trainer) for o in gc.get_objects())

    alive = trainers()
    sabotage = tmp_path / "sabotage"
    sabotage.write_text("raise")
    with pytest.raises(RuntimeError, match="sabotaged"):
        train(compose_train([*tiny_overrides(shapes_shards, tmp_path / "run", max_steps=2, every=2), *AUTOENCODER,
                             "+callbacks.sabotage._target_=scale_helpers.Sabotage",
                             f"+callbacks.sabotage.path={sabotage}"]))
    assert {s: signal.getsignal(s) for s in stops} == before and trainers() == alive
    monkeypatch.delenv("WANDB_MODE", raising=False)
    precision = torch.get_float32_matmul_precision()
    with pytest.raises(KeyboardInterrupt):
        with process_state_kept():
            os.environ["WANDB_MODE"] = "dryrun"  # as an offline WandbLogger sets it
            torch.set_float32_matmul_precision("medium")
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                sys.exit(1)  # as Lightning answers a Ctrl-C early in fit
    assert "WANDB_MODE" not in os.environ and torch.get_float32_matmul_precision() == precision
    assert {s: signal.getsignal(s) for s in stops} == before


def test_a_second_command_in_one_process_is_told_as_the_first(tmp_path, monkeypatch, capsys):
    """After one command's main() in a process (a notebook), a mistake in the next exited with status 1, not 2 (the
    flag saying a task had started stayed set), and Hydra's logging handlers stayed on the first run's log file."""
    import logging

    from ldm.cli.data import main

    root = logging.getLogger()
    handlers = list(root.handlers)
    monkeypatch.chdir(tmp_path)
    for args, status in (([f"output_dir={tmp_path}/d", "num_samples=4", "val_samples=0", "resolution=16"], None),
                         ([f"output_dir={tmp_path}/e", "num_sampels=4"], 2)):
        monkeypatch.setattr(sys, "argv", ["ldm-data", *args])
        if status is None:
            main()
        else:
            with pytest.raises(SystemExit) as exited:
                main()
            assert exited.value.code == status and "num_sampels" in capsys.readouterr().err
        assert root.handlers == handlers
