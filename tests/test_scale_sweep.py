"""Sweeps through the real CLI: Hydra multirun with the submitit local launcher, and a resumable Optuna study."""

from __future__ import annotations

import json
import os
import signal
import sqlite3

import pytest
import torch
from omegaconf import OmegaConf
from scale_helpers import compose_train, run_cli, tiny_autoencoder_export, tiny_ldm_overrides, tiny_overrides


def sweep_overrides(shards, max_steps: int) -> list[str]:
    """tiny_overrides without a fixed run directory: each job of the sweep gets its own."""
    return [o for o in tiny_overrides(shards, shards, max_steps=max_steps, every=max_steps)
            if not o.startswith("paths.output_dir=")]


@pytest.mark.slow
def test_multirun_local_launcher_gives_each_job_its_own_run_directory(shapes_shards, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "model.net.ch=16",
                      "model.lr=1e-3,2e-3", *sweep_overrides(shapes_shards, max_steps=2)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in jobs] == ["0", "1"]
    for job, lr in zip(jobs, (1e-3, 2e-3)):
        config = OmegaConf.load(job / "config.yaml")
        assert config.model.lr == lr and config.paths.output_dir == str(job)
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert (job / "csv" / "metrics.csv").is_file()
    # ckpt_path=last resumes each job in its directory (it was refused, "a new timestamped directory", and the fix it
    # named, paths.output_dir, is ignored in a multirun: now said in a warning)
    ignored = tmp_path / "ignored"
    result = run_cli(["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", "model.net.ch=16",
                      "model.lr=1e-3,2e-3", *[o.replace("max_steps=2", "max_steps=3")
                                              for o in sweep_overrides(shapes_shards, max_steps=2)],
                      "ckpt_path=last", f"paths.output_dir={ignored}", "optimized_metric=train/rec_loss"],
                     timeout=600)  # (what is reported may change: the same job, resumed)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not ignored.exists()
    for job in jobs:  # (the local launcher's jobs run in processes of their own: their output is in their logs)
        assert f"paths.output_dir={ignored} is ignored in a multirun (-m)" in (job / "train.log").read_text()
        assert torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


def _trial_states(root) -> list[str]:
    with sqlite3.connect(root / "ldm_optuna.sqlite") as db:
        return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]


@pytest.mark.slow
def test_optuna_study_survives_a_failed_trial_and_resumes(shapes_shards, tmp_path):
    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    root = tmp_path / "new_root"  # created for the study's SQLite file (SQLite would not)
    sabotage = tmp_path / "sabotage"  # what the next trial does wrong (the command line must stay the same)
    common = ["-m", "hparams_search=ldm_optuna", f"paths.root_dir={root}", "hydra.sweeper.n_trials=1",
              "+callbacks.sabotage._target_=scale_helpers.Sabotage", f"+callbacks.sabotage.path={sabotage}",
              *sweep_overrides(shapes_shards, max_steps=2), *tiny_ldm_overrides(autoencoder)]
    # a new study whose only trial fails: Optuna has no best trial to report (a page of traceback ending in its
    # "Record does not exist"): one line, status 1
    sabotage.write_text("raise")
    none = run_cli([*common, f"paths.root_dir={tmp_path / 'failing_root'}", f"hydra.sweep.dir={tmp_path / 'sweep0'}"],
                   timeout=600)
    assert none.returncode == 1 and "Record does not exist" not in none.stderr, none.stderr[-3000:]
    assert none.stderr.strip().splitlines()[-1].startswith(
        "ldm-train: error: no trial of the Optuna sweep completed (each one's error is above), so it has no best trial")
    sabotage.write_text("")
    first = run_cli([*common, f"hydra.sweep.dir={tmp_path / 'sweep1'}"], timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    # the same study continues (load_if_exists); its trial fails: recorded as failed, and the sweep ends normally
    sabotage.write_text("raise")
    failed = run_cli([*common, f"hydra.sweep.dir={tmp_path / 'sweep2'}"], timeout=600)
    assert failed.returncode == 0, failed.stderr[-3000:]  # (the study holds a completed trial: not a failed sweep)
    assert "trial failed (RuntimeError: sabotaged)" in failed.stdout
    assert "ldm-train: 1 of 1 jobs of the sweep failed: " in failed.stderr
    assert _trial_states(root) == ["COMPLETE", "FAIL"]
    best = OmegaConf.load(tmp_path / "sweep2" / "optimization_results.yaml")  # the first trial's
    assert best.best_value > 0
    # a trial whose val/loss is nan fails too; handed to Optuna as nan, it ended the whole sweep with a traceback
    # and left the trial RUNNING
    sabotage.write_text("nan")
    diverged = run_cli([*common, f"hydra.sweep.dir={tmp_path / 'sweep3'}"], timeout=600)
    assert diverged.returncode == 0, diverged.stderr[-3000:]
    assert "trial failed (val/loss is nan)" in diverged.stdout
    # continued into the first invocation's sweep directory, the new trial's job 0 finds trial 0's checkpoint: it
    # resumed it under the new trial's parameters; now the sweep stops, naming the parameter that differs
    sabotage.write_text("")
    same_dir = run_cli([*common, f"hydra.sweep.dir={tmp_path / 'sweep1'}"], timeout=600)
    assert same_dir.returncode == 2, same_dir.stderr[-3000:]
    assert "was written by another job with this sweep directory and job number (0)" in same_dir.stderr
    assert "model.lr: " in same_dir.stderr and "new hydra.sweep.dir" in same_dir.stderr
    assert _trial_states(root) == ["COMPLETE", "FAIL", "FAIL", "RUNNING"]  # the refused trial never ran


def test_a_study_continued_with_other_fixed_settings_is_refused(tmp_path):
    """A command with another batch size joined the stored study: its sampler learnt from the other settings' scores
    and its optimization_results.yaml reported their best trial."""
    import optuna

    root = tmp_path / "root"
    root.mkdir()
    study = optuna.create_study(study_name="ldm_optuna", storage=f"sqlite:///{root / 'ldm_optuna.sqlite'}")
    space = {"model.lr": optuna.distributions.LogUniformDistribution(1e-5, 3e-3),
             "model.ema_decay": optuna.distributions.CategoricalDistribution([0.99, 0.995, 0.999])}
    trial = study.ask(space)  # the search space of hparams_search=ldm_optuna
    for key, value in {"hparams_search": "ldm_optuna", "paths.root_dir": str(root), "data.batch_size": "4"}.items():
        trial.set_user_attr(key, value)  # as the sweeper records the command's fixed settings
    study.tell(trial, 1.0)
    stuck = study.ask()  # newer, never scored (a stopped job, or one refused after training): not compared with
    for key, value in {"hparams_search": "ldm_optuna", "paths.root_dir": str(root), "data.batch_size": "8"}.items():
        stuck.set_user_attr(key, value)
    result = run_cli(["-m", "hparams_search=ldm_optuna", f"paths.root_dir={root}", "data.batch_size=2"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "holds trials run with other fixed settings or search space (data.batch_size: '4' there, '2' here)" \
        in result.stderr
    assert "hydra.sweeper.study_name=NAME" in result.stderr and "Traceback" not in result.stderr
    assert len(optuna.load_study(study_name="ldm_optuna", storage=study._storage).trials) == 2
    # the same fixed settings, another search space (a study begun before cond_drop_prob left the default space):
    # old trials that searched it mixed with new ones run at the default
    result = run_cli(["-m", "hparams_search=ldm_optuna", f"paths.root_dir={root}", "data.batch_size=4",
                      "model.conditioner.cond_drop_prob=interval(0.0, 0.2)"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert ("holds trials run with other fixed settings or search space (searched: ['model.ema_decay', 'model.lr'] "
            "there, ['model.conditioner.cond_drop_prob', 'model.ema_decay', 'model.lr'] here)") in result.stderr
    # ... or other choices for a searched key: Optuna raised inside the first trial (a traceback, a RUNNING trial)
    result = run_cli(["-m", "hparams_search=ldm_optuna", f"paths.root_dir={root}", "data.batch_size=4",
                      "model.ema_decay=choice(0.9, 0.99)"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "(model.ema_decay: searched as CategoricalDistribution(choices=(0.99, 0.995, 0.999)) there, " \
           "CategoricalDistribution(choices=(0.9, 0.99)) here)" in result.stderr
    assert len(optuna.load_study(study_name="ldm_optuna", storage=study._storage).trials) == 2
    # ... also when no trial completed (Optuna compares with every trial that drew the key, failed ones included)
    failed_root = tmp_path / "failed"
    failed_root.mkdir()
    failed = optuna.create_study(study_name="ldm_optuna", storage=f"sqlite:///{failed_root / 'ldm_optuna.sqlite'}")
    failed.tell(failed.ask(space), state=optuna.trial.TrialState.FAIL)
    result = run_cli(["-m", "hparams_search=ldm_optuna", f"paths.root_dir={failed_root}",
                      "model.ema_decay=choice(0.9, 0.99)"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "(model.ema_decay: searched as CategoricalDistribution" in result.stderr


def test_a_key_the_command_line_fixes_is_not_searched():
    """The sweeper leaves a key the command line gives a value out of its search space: counted as searched, a study
    that fixes model.lr could not be continued (its trials never searched it), and model.lr was named as a searched
    key in its jobs' messages."""
    from ldm.sweeps import sweep_space

    params = {"model.lr": "tag(log, interval(1e-5, 3e-3))", "model.ema_decay": "choice(0.99, 0.995)"}
    fixed, space = sweep_space(["model.lr=1e-4", "+model.seed_offset=interval(0, 1)"], params)
    assert fixed == {"model.lr": "0.0001"} and sorted(space) == ["+model.seed_offset", "model.ema_decay"]


def test_fixed_settings_are_compared_as_values_not_as_spelled():
    """`run_name='abc'` after a study run with `run_name=abc` (the same job config) was refused as another setting."""
    from ldm.sweeps import setting_values

    recorded = {"run_name": "abc", "+trainer.foo": "1", "model.lr": "0.001", "data.resolution": "[32, 32]"}
    same = {"run_name": "'abc'", "++trainer.foo": "1", "model.lr": "1e-3", "data.resolution": "[32,32]"}
    assert setting_values(recorded) == setting_values(same)
    assert setting_values(recorded) != setting_values({**same, "model.lr": "2e-3"})
    assert setting_values(recorded) != setting_values({**same, "run_name": "'abd'"})


@pytest.mark.parametrize("entry", ["model.lr=tag(log, interval(0, 1e-3))", "model.lr=interval(1e-3, 1e-4)"])
def test_a_search_space_optuna_rejects_is_refused_naming_the_key(entry, tmp_path):
    result = run_cli(["-m", "hparams_search=ldm_optuna", f"paths.root_dir={tmp_path}", entry])
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"the search space entry '{entry}' is not a distribution Optuna accepts" in result.stderr
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("*.sqlite"))


def test_values_the_model_refuses_fail_their_job_alone(shapes_shards, tmp_path):
    """An Optuna point (here a grid's) that the model refuses ended the whole sweep, whose later points were never
    tried: once the sweep's first job has built the command's model, a ConfigError is the job's own values'."""
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", f"hydra.sweep.dir={sweep}", "model.net.ch=16", "model.lr=1e-3,-1,2e-3",
                      *sweep_overrides(shapes_shards, max_steps=1)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial failed (ConfigError: model.lr=-1.0 must be > 0)" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert [(sweep / job / "export").is_dir() for job in "012"] == [True, False, True]
    assert result.stderr.strip().splitlines()[-1] == (f"ldm-train: 1 of 3 jobs of the sweep failed: {sweep / '1'} "
                                                      f"(ConfigError: model.lr=-1.0 must be > 0)")
    assert json.loads((sweep / "1" / "sweep_job.json").read_text())["error"] == "ConfigError: model.lr=-1.0 must be > 0"
    # the refused value first: taken for a mistake in the command, it ended the sweep (exit 2) before the others ran
    sweep = tmp_path / "first"
    result = run_cli(["-m", f"hydra.sweep.dir={sweep}", "model.net.ch=16", "model.lr=-1,1e-3",
                      *sweep_overrides(shapes_shards, max_steps=1)], timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trial failed (ConfigError: model.lr=-1.0 must be > 0)" in result.stdout
    assert [(sweep / job / "export").is_dir() for job in "01"] == [False, True]
    # no job completed: exit status 1 (it was 0, and `ldm-train -m ... && ldm-eval ...` went on)
    sweep = tmp_path / "none"
    result = run_cli(["-m", f"hydra.sweep.dir={sweep}", "model.net.ch=16", "model.lr=-1,-2",
                      *sweep_overrides(shapes_shards, max_steps=1)], timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"ldm-train: 2 of 2 jobs of the sweep failed: {sweep}")
    # a sweep of one job into that directory: the earlier failures (job 1's folder too) are not this sweep's
    result = run_cli(["-m", f"hydra.sweep.dir={sweep}", "model.net.ch=16", "model.lr=1e-3",
                      *sweep_overrides(shapes_shards, max_steps=1)], timeout=600)
    assert result.returncode == 0 and "jobs of the sweep failed" not in result.stderr, result.stderr[-3000:]


def test_a_mistake_in_the_command_stops_the_sweep_at_its_first_job(shapes_shards, tmp_path):
    """Shards that do not exist failed every job of a grid (a traceback each, exit 0) and spent every Optuna trial
    (then Optuna's "Record does not exist" traceback, exit 1); a single run said it in one line, exit 2."""
    overrides = [o if not o.startswith("data.val_shards=") else f"data.val_shards={tmp_path}/nowhere/val-*.tar"
                 for o in sweep_overrides(shapes_shards, max_steps=1)]
    result = run_cli(["-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", "model.net.ch=16", "model.lr=1e-3,2e-3",
                      *overrides], timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "no shard file matches" in result.stderr and "Traceback" not in result.stdout + result.stderr
    assert "trial failed" not in result.stdout and not (tmp_path / "sweep" / "1").exists()


def test_the_swept_keys_reach_the_jobs_so_a_refused_point_fails_its_trial_alone(tmp_path, monkeypatch, capsys):
    """Optuna's first trial drew model.unet.head_dim=12 (the README's example), which the model refused: taken for
    a mistake in the command, it ended the whole sweep and left the trial RUNNING, in every invocation. A grid's
    keys too: a refused value ended the sweep when it came first, failed its job alone when it came later."""
    from ldm.cli.train import SWEPT_ENV, HandSweptKeys, names_swept_key
    from ldm.sweeps import CheckOptunaSweep

    monkeypatch.setenv(SWEPT_ENV, "[]")  # (restored afterwards: the callback sets it for the jobs it launches)
    config = OmegaConf.create({"optimized_metric": "val/loss", "hydra": {
        "sweeper": {"params": {"model.lr": "tag(log, interval(1e-5, 1e-3))", "model.ema_decay": "choice(0.9, 0.99)"},
                    "study_name": "s", "storage": f"sqlite:///{tmp_path / 's.sqlite'}"},
        "overrides": {"task": ["model.unet.head_dim=choice(8, 12)", "data.batch_size=4", "model.ema_decay=0.9",
                               "+model.seed_offset=1,2",  # and one naming a job's value (no job yet: unresolvable)
                               "run_name=lr${model.lr}_job${hydra:job.num}"]}}})
    monkeypatch.setenv(SWEPT_ENV, json.dumps(["data.batch_size"]))  # an earlier sweep's, of this process: not
    with monkeypatch.context() as broken:  # kept should these keys fail to parse (Hydra only warns of the failure)
        broken.setattr("ldm.cli.train.swept_keys", lambda config: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            HandSweptKeys().on_multirun_start(config)
    assert os.environ[SWEPT_ENV] == "[]"
    HandSweptKeys().on_multirun_start(config)
    assert json.loads(os.environ[SWEPT_ENV]) == ["model.lr", "model.seed_offset", "model.unet.head_dim"]
    assert names_swept_key("model.unet: width 64 of level 2 is not divisible by head_dim=12")
    assert names_swept_key("model.lr=-1.0 must be > 0")
    assert not names_swept_key("data.batch_size=0 must be >= 1")
    assert not names_swept_key("model.lr_schedule='x' is not one of [...]")
    assert not names_swept_key("model.warmup_lr=2 ...")  # another key's last part
    assert not names_swept_key("model.ema_decay=0.9 ...")  # fixed by the command line
    monkeypatch.setenv(SWEPT_ENV, json.dumps(["model.conditioner.width"]))  # a word of the message's prose
    assert not names_swept_key("model.unet: width 32 of level 1 is not divisible by head_dim=12")
    # an Optuna sweep with nothing to optimize: every trial trained, then failed ("Return value must be
    # float-castable"), and the sweep ended in Optuna's traceback
    CheckOptunaSweep().on_multirun_start(config)
    with pytest.raises(SystemExit) as stop:
        CheckOptunaSweep().on_multirun_start(OmegaConf.merge(config, {"optimized_metric": None}))
    assert stop.value.code == 2 and "optimized_metric=null: an Optuna sweep" in capsys.readouterr().err


@pytest.mark.slow
def test_a_stop_signal_ends_the_sweep_and_the_same_grid_run_again_resumes_it(shapes_shards, tmp_path):
    """SIGTERM stopped only the running job, whose part-trained val/loss went to the sweeper as its result (Optuna:
    a complete trial, perhaps the best), and the sweep went on with the next job. Run again into its directory, the
    same grid resumes its jobs: a finished one logs nothing (that ended the sweep: "optimized_metric was not
    logged"), the stopped one goes on from its last.ckpt."""
    sweep = tmp_path / "sweep"
    # job 0 is never signalled, job 1 at the start of step 2
    command = ["-m", f"hydra.sweep.dir={sweep}", "model.net.ch=16", "optimized_metric=val/rec_loss",
               "+callbacks.stop._target_=scale_helpers.SignalAtStep", "+callbacks.stop.step=100,2",
               "+callbacks.stop.signal_name=SIGTERM", *sweep_overrides(shapes_shards, max_steps=6)]
    result = run_cli(command, timeout=600)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "SIGTERM: the sweep stops; this job" in result.stdout + result.stderr

    def step(job: str) -> int:
        return torch.load(sweep / job / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]

    assert step("0") == 6 and step("1") == 3  # sent as the batch of step 2 starts: saved at the end of that step

    again = run_cli(command, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "the job resumed a finished run and logged nothing: no val/rec_loss to report" in again.stdout
    assert step("1") == 6

    # a signal in a job's final validation: the job finishes (its result reported), and the sweep stops after it
    late = tmp_path / "late"
    result = run_cli(["-m", f"hydra.sweep.dir={late}", "model.net.ch=16", "model.lr=1e-3,2e-3",
                      "+callbacks.stop._target_=scale_helpers.SignalAtStep", "+callbacks.stop.step=6",
                      "+callbacks.stop.during=validation", "+callbacks.stop.signal_name=SIGINT",
                      *sweep_overrides(shapes_shards, max_steps=6)], timeout=600)
    assert result.returncode == 128 + signal.SIGINT, result.stderr[-3000:]
    assert "SIGINT during the previous job: the sweep stops" in result.stderr
    assert (late / "0" / "export").is_dir() and not (late / "1" / "checkpoints").exists()

    # a checkpoint given as ckpt_path (not found in the job's directory) may be resumed with other values
    branch = run_cli(["-m", f"hydra.sweep.dir={tmp_path / 'branch'}", "model.net.ch=16", "model.lr=1e-4,3e-4",
                      f"ckpt_path={sweep / '0' / 'checkpoints' / 'last.ckpt'}",
                      *sweep_overrides(shapes_shards, max_steps=7)], timeout=600)
    assert branch.returncode == 0, branch.stderr[-3000:]


def test_sweep_configs_compose():
    cfg = compose_train(["hparams_search=ldm_optuna", "hydra/launcher=slurm"])
    assert cfg.optimized_metric == "val/loss"


def test_a_continued_study_draws_new_trials_reproducibly(tmp_path):
    """Each sweep invocation builds a new sampler over the stored study: seeded alike, a TPE sampler drew the first
    invocation's trials again; ours moves its seed on with the study's trials (the same history, the same draws)."""
    import optuna

    from ldm.sweeps import ContinuingTPESampler

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def invocation(storage: str) -> list[float]:
        study = optuna.create_study(study_name="s", storage=storage, load_if_exists=True,
                                    sampler=ContinuingTPESampler(seed=0, n_startup_trials=5))
        study.optimize(lambda trial: trial.suggest_float("lr", 1e-5, 1e-2, log=True), n_trials=2)
        return [t.params["lr"] for t in study.trials[-2:]]

    first, again = (invocation(f"sqlite:///{tmp_path / name}.db") for name in ("a", "b"))
    assert first == again  # reproducible
    continued = invocation(f"sqlite:///{tmp_path / 'a'}.db")
    assert not set(continued) & set(first)


def test_a_metric_from_an_earlier_validation_than_the_last_step_is_said():
    """An Optuna trial of 5 steps validating every 2 reported step 4's val/loss as its score, for step 5's weights,
    without a word."""
    import warnings

    from ldm.cli.train import warn_stale_optimized_metric

    base = ["optimized_metric=val/loss", "trainer.val_check_interval=2"]
    with pytest.warns(UserWarning, match=r"optimized_metric=val/loss will be the last validation's, after batch 4 of "
                                         r"5 \(trainer\.val_check_interval=2\), not the final weights'"):
        warn_stale_optimized_metric(compose_train([*base, "trainer.max_steps=5"]))
    with pytest.warns(UserWarning, match=r"after batch 8 of 10"):  # Lightning's interval counts batches
        warn_stale_optimized_metric(compose_train([*base, "trainer.max_steps=5", "trainer.accumulate_grad_batches=2",
                                                   "trainer.val_check_interval=4"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for extra in (["trainer.max_steps=4"], ["trainer.max_steps=5", "optimized_metric=null"]):
            warn_stale_optimized_metric(compose_train([*base, *extra]))
