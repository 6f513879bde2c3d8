"""Exact resume on CPU: N steps in one go == N/2 steps, stop, `ckpt_path=last`, N/2 more; bit for bit.

The interrupted run restarts in a fresh `train()` call (new module, datamodule and trainer) from `last.ckpt`, as a new
process would; losses of every step, weights, EMA, optimizer and scheduler states must be identical.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scale_helpers import compose_train, load_json, tiny_autoencoder_export, tiny_ldm_overrides, tiny_overrides

from ldm.cli.train import train

STEPS = 4  # every = STEPS // 2: the interrupted run stops (and checkpoints) right at a validation step


def run(shards: Path, out: Path, max_steps: int, extra: list[str]) -> dict[int, dict[str, float]]:
    overrides = tiny_overrides(shards, out, max_steps=max_steps, every=STEPS // 2) + extra + [
        "+callbacks.recorder._target_=scale_helpers.StepRecorder", f"+callbacks.recorder.dirpath={out}/record",
    ]
    train(compose_train(overrides))
    return {int(k): v for k, v in load_json(out / "record" / "steps-rank0.json")["steps"].items()}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    ca, cb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    assert ca["global_step"] == cb["global_step"] == STEPS
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for key in ca["state_dict"]:
        assert torch.equal(ca["state_dict"][key], cb["state_dict"][key]), f"weights differ: {key}"
    assert _flatten(ca["optimizer_states"]) == _flatten(cb["optimizer_states"])
    assert ca["lr_schedulers"] == cb["lr_schedulers"]
    assert ca["ldm"]["samples_seen"] == cb["ldm"]["samples_seen"] == STEPS * 4  # data.batch_size 4, one process
    assert ca["ldm"]["config"]["trainer"]["max_steps"] == STEPS


def _flatten(obj):
    """Nested optimizer state as comparable plain values (tensors as exact lists)."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: _flatten(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_flatten(v) for v in obj]
    return obj


def check_exact_resume(shards: Path, tmp_path: Path, extra: list[str]) -> None:
    full = run(shards, tmp_path / "full", STEPS, extra)
    first = run(shards, tmp_path / "split", STEPS // 2, extra)
    second = run(shards, tmp_path / "split", STEPS, extra + ["ckpt_path=last"])
    assert sorted(full) == list(range(1, STEPS + 1))
    assert sorted(first) == list(range(1, STEPS // 2 + 1)) and sorted(second) == list(range(STEPS // 2 + 1, STEPS + 1))
    resumed = {**first, **second}
    for step in full:
        assert full[step] == resumed[step], f"step {step}: {full[step]} != {resumed[step]}"
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt",
                           tmp_path / "split" / "checkpoints" / "last.ckpt")


def test_latent_diffusion_resume_is_exact(shapes_shards, tmp_path):
    """Noise from step_generator, AdamW, the warmup schedule and the data position all continue exactly."""
    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    check_exact_resume(shapes_shards, tmp_path, tiny_ldm_overrides(autoencoder) + ["model.ema_decay=null"])


@pytest.mark.slow
def test_latent_diffusion_resume_with_ema_is_exact(shapes_shards, tmp_path):
    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    check_exact_resume(shapes_shards, tmp_path, tiny_ldm_overrides(autoencoder))


@pytest.mark.slow
def test_autoencoder_resume_is_exact(shapes_shards, tmp_path):
    check_exact_resume(shapes_shards, tmp_path, ["model=autoencoder/kl_tiny", "model.net.ch=16",
                                                 "model.warmup_steps=4"])


@pytest.mark.slow
def test_autoencoder_auto_resume_with_gan_and_ema_is_exact(shapes_shards, tmp_path):
    """auto_resume (no ckpt_path) picks up last.ckpt; the discriminator step and the EMA are active."""
    extra = ["model=autoencoder/kl_tiny", "model.net.ch=16", "model.loss.disc_start=2", "model.ema_decay=0.9"]
    full = run(shapes_shards, tmp_path / "full", STEPS, extra)
    first = run(shapes_shards, tmp_path / "split", STEPS // 2, extra)
    second = run(shapes_shards, tmp_path / "split", STEPS, extra)  # auto_resume=true by default
    assert full == {**first, **second}
    assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "last.ckpt",
                           tmp_path / "split" / "checkpoints" / "last.ckpt")
