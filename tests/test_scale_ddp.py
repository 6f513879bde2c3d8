"""Two-process DDP on CPU (trainer=ddp_cpu, gloo) through the real CLI: per-rank noise, a NaN on one rank, K in a row.

The same launcher path as multi-GPU `trainer=ddp`: Lightning re-runs `python -m ldm.cli.train ...` for rank 1 with
the parent's run directory.
"""

from __future__ import annotations

import pytest
import torch
from scale_helpers import (
    fake_scontrol,
    load_json,
    run_cli,
    tiny_autoencoder_export,
    tiny_ldm_overrides,
    tiny_overrides,
)


@pytest.mark.slow
def test_ddp_cpu_latent_diffusion_noise_per_rank_and_nan_guard(shapes_shards, tmp_path):
    out = tmp_path / "run"
    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    overrides = tiny_overrides(shapes_shards, out, max_steps=8, every=3, trainer="ddp_cpu")
    result = run_cli(overrides + tiny_ldm_overrides(autoencoder) + [
        "data.batch_size=2", "callbacks.nan_guard.max_consecutive=2",
        # a NaN batch on rank 1 only, at step 1 (skipped alone) and at steps 4 and 5 (two in a row: stop)
        "+callbacks.nan._target_=scale_helpers.NanInjector", "+callbacks.nan.steps=[1,4,5]", "+callbacks.nan.ranks=[1]",
        "+callbacks.recorder._target_=scale_helpers.StepRecorder", f"+callbacks.recorder.dirpath={out}/record",
        "+callbacks.noise._target_=scale_helpers.NoiseProbe", f"+callbacks.noise.dirpath={out}/record",
    ], timeout=600)
    assert result.returncode != 0, result.stdout[-3000:]
    assert "2 training steps in a row had a non-finite loss" in result.stderr, result.stderr[-3000:]
    assert "global batch size 4 = data.batch_size 2 x 2 processes (1 nodes)" in result.stdout + result.stderr

    ranks = [load_json(out / "record" / f"steps-rank{r}.json")["steps"] for r in (0, 1)]
    for steps in ranks:
        assert sorted(int(k) for k in steps) == [1, 2, 3, 4, 5, 6]
        assert steps["2"]["weights"] == steps["1"]["weights"]  # skipped on this rank too
        assert steps["6"]["weights"] == steps["4"]["weights"]
        assert steps["3"]["weights"] != steps["2"]["weights"]
    for step in ("1", "2", "3", "4", "5", "6"):
        assert ranks[0][step]["weights"] == ranks[1][step]["weights"]  # the ranks never drift apart
    assert ranks[0]["3"]["train/loss"] == ranks[1]["3"]["train/loss"]  # logged: the mean over both ranks' batches

    noise = [[c for c in load_json(out / "record" / f"noise-rank{r}.json") if c["training"]] for r in (0, 1)]
    for r, calls in enumerate(noise):
        assert [c["step"] for c in calls] == [0, 1, 2, 3, 4, 5]
        assert all(c["rank"] == c["true_rank"] == r for c in calls)
    for c0, c1 in zip(*noise):
        assert c0["seed"] == c1["seed"] and c0["fingerprint"] != c1["fingerprint"]

    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # written at step 3, not overwritten when the guard stopped at step 6
    assert len(last["callbacks"]["RngState"]["per_rank"]) == 2


def test_ddp_cpu_autoencoder_with_its_discriminator_stays_in_sync(shapes_shards, tmp_path):
    """Two backward passes per batch (autoencoder, then discriminator) under DDP: ldm-train turns on DDP's search for
    unused parameters, which it would otherwise stop at the second step for; the ranks' weights stay equal."""
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=3, every=3, trainer="ddp_cpu")
    result = run_cli(overrides + [
        "data.batch_size=2", "model.net.ch=16", "model.loss.disc_start=1",
        "+callbacks.recorder._target_=scale_helpers.StepRecorder", f"+callbacks.recorder.dirpath={out}/record",
    ], env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainer.strategy.find_unused_parameters=true: AutoencoderModule" in result.stdout + result.stderr
    ranks = [load_json(out / "record" / f"steps-rank{r}.json")["steps"] for r in (0, 1)]
    assert sorted(int(k) for k in ranks[0]) == [1, 2, 3]
    for step in ("1", "2", "3"):
        assert ranks[0][step]["weights"] == ranks[1][step]["weights"]
        # the logged figures are the global batch's on both ranks (each rank's own differ: other images)
        assert {k: v for k, v in ranks[0][step].items() if k.startswith("train/")} == \
            {k: v for k, v in ranks[1][step].items() if k.startswith("train/")}
    assert ranks[0]["3"]["weights"] != ranks[0]["2"]["weights"]
    assert ranks[0]["3"]["train/d_loss"] > 0  # the discriminator trained from step 1
    # the images of both ranks: 3 steps x 2 x 2
    assert "throughput summary: 3 steps, 12 images in " in (out / "train.log").read_text()
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["ldm"]["samples_seen"] == 12


@pytest.mark.slow
def test_a_sigterm_on_one_rank_of_a_slurm_job_stops_without_requeue(shapes_shards, tmp_path):
    """A cancel or a preemption's SIGTERM can reach another rank first: every rank saves and stops at the same step,
    as for SIGTERM (the ranks vote on which signal came), and the job is not requeued (it was, as if SIGUSR1)."""
    import os

    bin_dir, log = fake_scontrol(tmp_path)
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=50, every=100, trainer="ddp_cpu") + [
        "model.net.ch=16", "+callbacks.signal._target_=scale_helpers.SignalAtStep", "+callbacks.signal.step=2",
        "+callbacks.signal.signal_name=SIGTERM", "+callbacks.signal.ranks=[1]"]
    result = run_cli(overrides, env={"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"},
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM: saved" in result.stderr + result.stdout and "requeued" not in result.stderr + result.stdout
    assert not log.exists() or log.read_text() == ""
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
