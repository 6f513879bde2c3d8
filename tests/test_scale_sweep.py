"""Sweeps through the real CLI: Hydra multirun with the submitit local launcher, and a resumable Optuna study."""

from __future__ import annotations

import sqlite3

import pytest
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


@pytest.mark.slow
def test_optuna_study_survives_a_failed_trial_and_resumes(shapes_shards, tmp_path):
    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    root = tmp_path / "new_root"  # created for the study's SQLite file (SQLite would not)
    common = ["-m", "hparams_search=ldm_optuna", f"paths.root_dir={root}", "hydra.sweeper.n_trials=1",
              *sweep_overrides(shapes_shards, max_steps=2), *tiny_ldm_overrides(autoencoder)]
    first = run_cli([*common, f"hydra.sweep.dir={tmp_path / 'sweep1'}"], timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    # the same study continues (load_if_exists); its trial, with a precision Lightning does not know (not a config
    # mistake ldm-train checks: Lightning raises when it builds the Trainer), fails: recorded as failed, and the sweep
    # still ends normally
    failed = run_cli([*common, f"hydra.sweep.dir={tmp_path / 'sweep2'}", "trainer.precision=bogus"], timeout=600)
    assert failed.returncode == 0, failed.stderr[-3000:]
    assert "trial failed (" in failed.stdout and "bogus" in failed.stdout
    with sqlite3.connect(root / "ldm_optuna.sqlite") as db:
        states = [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]
    assert states == ["COMPLETE", "FAIL"]
    best = OmegaConf.load(tmp_path / "sweep2" / "optimization_results.yaml")  # the first trial's
    assert best.best_value > 0


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
