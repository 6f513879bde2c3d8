"""FSDP over two CPU processes (gloo) through the real CLI: the latent diffusion model trains as under DDP, and resumes
exactly.

Lightning refuses `FSDPStrategy` without a GPU, so these runs name `scale_helpers.CpuFSDPStrategy` (the same strategy,
with torch's FSDP told to stay on the CPU) in place of `trainer=fsdp`'s target; everything else is `trainer=fsdp`:
full-state-dict checkpoints, `use_orig_params`, FULL_SHARD.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from scale_helpers import (
    frozen_text_encoder_overrides,
    run_cli,
    tiny_autoencoder_export,
    tiny_ldm_overrides,
    tiny_overrides,
)

from ldm.modules.ema import make_ema
from ldm.nn.unet import UNet, unet_config
from ldm.pipeline import LatentDiffusionPipeline

STEPS = 4
CPU_FSDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "trainer.strategy._target_=scale_helpers.CpuFSDPStrategy", "+trainer.strategy.process_group_backend=gloo"]


def train(shards: Path, out: Path, trainer: str, frozen: dict, max_steps: int = STEPS,
          extra: tuple[str, ...] = ()) -> None:
    """The tiny LDM (frozen text encoder, EMA, clipping) over 2 processes; sample grids of the raw (sharded) UNet at
    each validation."""
    overrides = tiny_overrides(shards, out, max_steps=max_steps, every=2, trainer=trainer) + \
        tiny_ldm_overrides(frozen["autoencoder"]) + (CPU_FSDP if trainer == "fsdp" else []) + [
            *frozen["text"],
            "data.batch_size=2", "trainer.gradient_clip_val=1.0", "model.val_use_ema=false", "model.val_num_steps=4",
            "+callbacks.image_logger._target_=ldm.callbacks.image_logger.ImageLogger",
            f"+callbacks.image_logger.save_dir={out}/images", "+callbacks.image_logger.every_n_steps=0",
            *extra]
    result = run_cli(overrides, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def grad_norms(out: Path) -> list[float]:
    """`train/grad_norm` of each step, from the run's metrics.csv."""
    with open(out / "csv" / "metrics.csv", newline="") as f:
        return [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r.get("train/grad_norm")]


def moments(ckpt: dict) -> list[torch.Tensor]:
    """AdamW's moments in the optimizer's parameter order (the checkpoints of DDP and FSDP number them differently)."""
    state = ckpt["optimizer_states"][0]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    return [state["state"][i][key] for i in ids for key in ("exp_avg", "exp_avg_sq")]


@pytest.fixture(scope="module")
def runs(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fsdp")
    frozen = {"autoencoder": tiny_autoencoder_export(root / "ae"), "text": frozen_text_encoder_overrides(root / "text")}
    for trainer in ("ddp_cpu", "fsdp"):
        train(shapes_shards, root / trainer, trainer, frozen)
    return {"root": root, "frozen": frozen, "ddp": root / "ddp_cpu", "fsdp": root / "fsdp"}


def test_fsdp_over_two_processes_trains_as_ddp_does(runs: dict):
    """Same data, seeds and global batch: the weights, EMA and optimizer moments after 4 steps equal DDP's up to the
    rounding of the gradients' reduction; the export holds the EMA; the sample grids of the sharded UNet were drawn."""
    ddp, fsdp = checkpoint(runs["ddp"]), checkpoint(runs["fsdp"])
    assert fsdp["global_step"] == ddp["global_step"] == STEPS
    assert fsdp["state_dict"].keys() == ddp["state_dict"].keys()  # whole tensors under DDP's names
    for key, value in ddp["state_dict"].items():
        assert fsdp["state_dict"][key].shape == value.shape, key
        torch.testing.assert_close(fsdp["state_dict"][key], value, rtol=0, atol=1e-5, msg=key)
    assert any(k.startswith("ema.") for k in ddp["state_dict"])
    for ours, theirs in zip(moments(fsdp), moments(ddp), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-9)
    # the logged gradient norm (what clipping scaled by) is the whole model's under FSDP too, not one rank's shard
    fsdp_norms, ddp_norms = grad_norms(runs["fsdp"]), grad_norms(runs["ddp"])
    assert len(ddp_norms) == STEPS and all(n > 0 for n in ddp_norms)
    assert fsdp_norms == pytest.approx(ddp_norms, rel=1e-4)

    exported = LatentDiffusionPipeline.from_pretrained(runs["fsdp"] / "export")
    ema_unet = {k.removeprefix("ema.module."): v for k, v in fsdp["state_dict"].items() if k.startswith("ema.module.")}
    for key, value in exported.unet.state_dict().items():
        assert torch.equal(value, ema_unet[key]), key
    grids = sorted(p.name for p in (runs["fsdp"] / "images" / "val").glob("*.png"))
    assert grids == ["samples_step0000002.png", "samples_step0000004.png"]


@pytest.mark.slow
def test_fsdp_resume_is_exact(shapes_shards: Path, runs: dict):
    """Stopped after 2 steps and resumed to 4 (sharded optimizer state reloaded from the full checkpoint): the same
    checkpoint, bit for bit, as the run that was never stopped."""
    out = runs["root"] / "fsdp-resumed"
    train(shapes_shards, out, "fsdp", runs["frozen"], max_steps=2)
    train(shapes_shards, out, "fsdp", runs["frozen"], extra=("ckpt_path=last",))
    full, resumed = checkpoint(runs["fsdp"]), checkpoint(out)
    assert resumed["global_step"] == STEPS
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for ours, theirs in zip(moments(resumed), moments(full), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.slow
def test_fsdp_without_ema_exports_the_gathered_unet(shapes_shards: Path, runs: dict):
    """No EMA: the export (every rank gathers the sharded UNet, rank 0 writes) holds the trained UNet."""
    out = runs["root"] / "fsdp-no-ema"
    train(shapes_shards, out, "fsdp", runs["frozen"], max_steps=2, extra=("model.ema_decay=null",))
    trained = {k.removeprefix("pipeline.unet."): v for k, v in checkpoint(out)["state_dict"].items()
               if k.startswith("pipeline.unet.")}
    exported = LatentDiffusionPipeline.from_pretrained(out / "export").unet.state_dict()
    assert exported.keys() == trained.keys()
    for key, value in exported.items():
        assert torch.equal(value, trained[key]), key


@pytest.mark.slow
def test_fsdp_refuses_a_trainable_text_encoder_over_several_processes(shapes_shards: Path, runs: dict):
    """Only the UNet is sharded: a text encoder trained beside it would drift apart on each process."""
    out = runs["root"] / "fsdp-trainable-text"
    result = run_cli(tiny_overrides(shapes_shards, out, max_steps=2, every=2, trainer="fsdp")
                     + tiny_ldm_overrides(runs["frozen"]["autoencoder"]) + CPU_FSDP, timeout=600)
    assert result.returncode != 0
    assert "trainer=fsdp over 2 processes shards the UNet alone, and a trainable text encoder would drift apart on " \
           "each process: set model.conditioner.trainable=false" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (out / "checkpoints" / "last.ckpt").exists()


def test_the_ema_follows_a_unet_whose_buffers_fsdp_cast_to_bf16():
    """`trainer=fsdp` in bf16-mixed: FSDP computes in bf16 and casts a network's buffers for good (the UNet's
    upsampler held its constant 0/1 taps as one), so the EMA, a whole fp32 copy, averages the fp32 parameters and
    copies the buffers into fp32 ones (averaging a bf16 buffer into an fp32 one stopped every GPU run at its first
    step)."""
    torch.manual_seed(0)
    unet = UNet(unet_config("tiny"))
    unet.register_buffer("constant", torch.tensor([0.0, 1.0, 0.5]))  # the UNet itself holds none now
    ema = make_ema(unet, decay=0.5)
    taps = {k: v.clone() for k, v in ema.module.named_buffers()}
    assert taps  # the test needs a network with buffers
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    for b in unet.buffers():  # as FSDP's MixedPrecision(buffer_dtype=bfloat16) leaves them
        b.data = b.data.to(torch.bfloat16)
    ema.update_parameters(unet)  # the first update copies, the second averages
    ema.update_parameters(unet)
    for (name, averaged), trained in zip(ema.module.named_parameters(), unet.parameters(), strict=True):
        assert averaged.dtype == torch.float32 and torch.equal(averaged, trained), name
    for name, buffer in ema.module.named_buffers():
        assert buffer.dtype == torch.float32 and torch.equal(buffer, taps[name]), name


@pytest.mark.slow
def test_fsdp_in_bf16_mixed_precision_trains_and_exports(shapes_shards: Path, runs: dict):
    """`trainer=fsdp`'s own precision, bf16-mixed: FSDP's MixedPrecision casts the sharded UNet's parameters and
    buffers to bf16 for compute (on CPU too), with the EMA, validation grids and export alongside."""
    out = runs["root"] / "fsdp-bf16"
    train(shapes_shards, out, "fsdp", runs["frozen"], max_steps=2, extra=("trainer.precision=bf16-mixed",))
    state = checkpoint(out)["state_dict"]
    ema = {k: v for k, v in state.items() if k.startswith("ema.module.")}
    assert ema and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ema.values())
    assert (out / "export" / "model.safetensors").is_file()
