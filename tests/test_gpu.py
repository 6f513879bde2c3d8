"""The GPU path on a CUDA GPU: both stages trained through `ldm-train` in bf16-mixed (throughput line with MFU and
peak memory, exact resume) and with gradient clipping in bf16- and fp16-mixed, `compile=true`, the flash-attention
kernel, our UNet against diffusers', DDP and FSDP on one node, `ldm-encode` and `ldm-sample` on the device.

Skipped where torch sees no CUDA GPU (CI has none); `make test-gpu` runs them (tiny models: a few minutes, most of it
process starts and compilation). `python benchmarks/gpu.py` then measures the SD 1.5 UNet (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision
from convert_helpers import SD1_UNET, diffusers_unet, unet_inputs
from scale_helpers import (
    frozen_text_encoder_overrides,
    run_cli,
    tiny_autoencoder_export,
    tiny_ldm_overrides,
    tiny_overrides,
)
from test_encode import read_shard
from test_scale_machinery import clipped_grad_norms

from ldm.callbacks.throughput import peak_flops
from ldm.convert.load import load_unet_diffusers
from ldm.data import latents
from ldm.nn.unet import UNet, unet_config

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make test-gpu)")]

PROMPTS = ("[a large red circle in the center on a white background, "
           "a large blue square in the center on a black background]")


def train_losses(run: Path) -> dict[int, float]:
    """{step: train/loss} from a run's metrics.csv."""
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def checkpoint_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_autoencoder_export(tmp_path_factory.mktemp("autoencoder"))


def ldm_overrides(shards: Path, run: Path, autoencoder: Path, steps: int, every: int | None = None,
                  trainer: str = "gpu") -> list[str]:
    """`steps` steps of the tiny LDM, validation (2 sampling steps) and a checkpoint every `every` (default: at the
    end)."""
    return tiny_overrides(shards, run, max_steps=steps, every=every or steps, trainer=trainer) + \
        tiny_ldm_overrides(autoencoder) + ["model.val_num_steps=2"]


@pytest.fixture(scope="module")
def ldm_run(shapes_shards: Path, autoencoder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """4 bf16-mixed steps of the tiny LDM on one GPU: (run directory, the process's output)."""
    run = tmp_path_factory.mktemp("ldm") / "run"
    result = run_cli(ldm_overrides(shapes_shards, run, autoencoder, steps=4))
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result.stdout + result.stderr


def test_the_ldm_trains_in_bf16_and_logs_throughput_mfu_and_memory(ldm_run):
    run, output = ldm_run
    assert "bf16" in output  # Lightning: "Using bf16 Automatic Mixed Precision (AMP)"
    assert re.search(r"throughput step 4: [\d.]+ images/s .*peak memory [\d.]+ GiB", output), output[-3000:]
    assert re.search(r"throughput summary: 4 steps, 16 images", output)
    if peak_flops(torch.device("cuda"), "bf16-mixed")[0] is not None:  # a GPU of the peak table
        assert re.search(r"TFLOP/s per device, MFU [\d.]+% of \d+ TFLOP/s \(bf16\)", output), output[-3000:]
    losses = train_losses(run)
    assert sorted(losses) == [0, 1, 2, 3] and all(0 < v < 10 for v in losses.values())
    state = checkpoint_state(run)
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert (run / "export" / "model.safetensors").is_file()


def test_a_gpu_run_resumes_where_it_stopped(ldm_run, shapes_shards: Path, autoencoder: Path, tmp_path: Path):
    """The same command twice: 2 steps, then auto_resume to 4; the losses of steps 0-3 equal the straight run's."""
    straight, _ = ldm_run
    run = tmp_path / "run"
    for steps in (2, 4):
        result = run_cli(ldm_overrides(shapes_shards, run, autoencoder, steps=steps, every=2))
        assert result.returncode == 0, result.stderr[-3000:]
    resumed, full = train_losses(run), train_losses(straight)
    assert sorted(resumed) == [0, 1, 2, 3]
    for step in resumed:  # bf16 kernels may pick other algorithms after a restart: close, not bit-equal
        assert resumed[step] == pytest.approx(full[step], rel=2e-2), (step, resumed, full)


def test_compile_runs_and_matches_eager(ldm_run, shapes_shards: Path, autoencoder: Path, tmp_path: Path):
    eager, _ = ldm_run
    run = tmp_path / "run"
    result = run_cli(ldm_overrides(shapes_shards, run, autoencoder, steps=4) + ["compile=true"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compile: torch.compile on the UNet" in result.stdout + result.stderr
    compiled, reference = train_losses(run), train_losses(eager)
    assert compiled[0] == pytest.approx(reference[0], rel=2e-2)  # same batch, noise and weights: step 0


@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_ddp_and_fsdp_on_one_node(trainer, ldm_run, shapes_shards: Path, autoencoder: Path, tmp_path: Path):
    """DDP and FSDP (the UNet sharded, the text encoder frozen) on every GPU of the node (at most 2), NCCL. The
    checkpoint is a full one, as a one-GPU run writes it."""
    frozen_text = frozen_text_encoder_overrides(tmp_path / "text") if trainer == "fsdp" else []
    run = tmp_path / "run"
    result = run_cli(ldm_overrides(shapes_shards, run, autoencoder, steps=2, trainer=trainer) + frozen_text
                     + [f"trainer.devices={min(2, torch.cuda.device_count())}"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    state, reference = checkpoint_state(run), checkpoint_state(ldm_run[0])
    unet = ("pipeline.unet.", "ema.")  # whole tensors under their usual names (the runs' text encoders differ)
    assert {k: v.shape for k, v in state.items() if k.startswith(unet)} == \
        {k: v.shape for k, v in reference.items() if k.startswith(unet)}
    assert all(0 < v < 10 for v in train_losses(run).values())
    assert (run / "export" / "model.safetensors").is_file()


def test_the_autoencoder_and_its_discriminator_train_in_bf16(shapes_shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    result = run_cli(tiny_overrides(shapes_shards, run, max_steps=4, every=4, trainer="gpu")
                     + ["model.loss.disc_start=2", "channels_last=true"])
    assert result.returncode == 0, result.stderr[-3000:]
    with open(run / "csv" / "metrics.csv", newline="") as f:
        d_loss = {int(r["step"]): float(r["train/d_loss"]) for r in csv.DictReader(f) if r.get("train/d_loss")}
    assert d_loss[0] == d_loss[1] == 0 and 0 < d_loss[2] < 10 and 0 < d_loss[3] < 10  # the GAN from disc_start on
    assert (run / "export" / "latent_stats.json").is_file()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
@pytest.mark.parametrize("model", ["autoencoder", "ldm"])
def test_gradients_are_clipped_in_mixed_precision(model, precision, shapes_shards: Path, tmp_path: Path):
    """Fused Adam in bf16; under fp16 (GradScaler) unfused, so that the gradients are unscaled before clipping. A step
    whose fp16 gradients overflowed is the scaler's to skip (its gradients are not finite): it starts at a scale of
    2^16, which the autoencoder's loss (summed over pixels, as CompVis') overflows for its first 8 steps here."""
    steps = 12 if precision == "16-mixed" else 3
    norms = clipped_grad_norms(model, shapes_shards, tmp_path, precision, trainer="gpu", steps=steps)
    stepped = [n for n in norms if math.isfinite(n)]
    assert len(norms) == steps and len(stepped) >= 2 and stepped == pytest.approx([1e-4] * len(stepped), rel=1e-3)
    assert norms[-len(stepped):] == stepped  # skipped while the scale comes down, never once it fits


def test_the_unets_attention_runs_on_the_flash_kernel():
    """With only the flash backend allowed, SDPA raises instead of falling back: every attention layer of a UNet
    (self and cross, 64-wide heads) must hand it bf16 q / k / v it accepts, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    unet = UNet(unet_config("small", context_dim=64)).cuda()
    x, t, context = (v.cuda() for v in unet_inputs(64, batch=2, size=16))
    with torch.autocast("cuda", torch.bfloat16):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = unet(x, t, context)
            flash.float().square().mean().backward()
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            math = unet(x, t, context)
    assert flash.dtype == torch.bfloat16
    assert (flash.float() - math.float()).abs().max() <= 0.05 * math.float().abs().max()


def test_our_unet_equals_diffusers_on_the_gpu(tmp_path: Path):
    """fp32 without TF32: equal to 1e-4; bf16 autocast: no further from the fp32 output than diffusers' bf16 is."""
    theirs = diffusers_unet(SD1_UNET)
    theirs.save_pretrained(tmp_path / "unet")
    config, state = load_unet_diffusers(tmp_path / "unet")
    ours = UNet(config)
    ours.load_state_dict(state)
    ours, theirs = ours.cuda().eval(), theirs.cuda().eval()
    x, t, context = (v.cuda() for v in unet_inputs(SD1_UNET["cross_attention_dim"], size=16))
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad():
            reference = theirs(x, t, encoder_hidden_states=context).sample
            assert (ours(x, t, context) - reference).abs().max() < 1e-4
            with torch.autocast("cuda", torch.bfloat16):
                ours_bf16 = ours(x, t, context).float()
                theirs_bf16 = theirs(x, t, encoder_hidden_states=context).sample.float()
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    ours_error, theirs_error = ((v - reference).abs().mean().item() for v in (ours_bf16, theirs_bf16))
    assert ours_error <= 1.5 * theirs_error + 1e-4, (ours_error, theirs_error)


def test_encode_on_the_gpu_writes_the_cpu_latents(shapes_shards: Path, autoencoder: Path, tmp_path: Path):
    for accelerator in ("cuda", "cpu"):
        result = run_cli([f"shards='{shapes_shards}/val-*.tar'", f"autoencoder_path={autoencoder}",
                          f"output_dir={tmp_path / accelerator}", f"accelerator={accelerator}", "progress=false"],
                         module="ldm.cli.encode")
        assert result.returncode == 0, result.stderr[-3000:]
    gpu, cpu = (read_shard(tmp_path / a / "val-000000.tar") for a in ("cuda", "cpu"))
    assert [s["__key__"] for s in gpu] == [s["__key__"] for s in cpu] and gpu
    for a, b in zip(gpu, cpu):  # TF32 convolutions on the GPU, fp16 storage on both
        got, want = (torch.from_numpy(latents.from_npy(s[latents.MOMENTS]).astype("float32")) for s in (a, b))
        assert (got - want).abs().max() <= 2e-2 * want.abs().max()


def test_sampling_on_the_gpu_is_deterministic(ldm_run, tmp_path: Path):
    run, _ = ldm_run
    for name in ("a", "b"):
        result = run_cli([f"ckpt_path={run / 'export'}", f"prompts={PROMPTS}", "sampler=dpmpp_2m", "num_steps=4",
                          "guidance_scale=3.0", "seed=5", "num_images_per_prompt=2", "device=cuda",
                          f"output_dir={tmp_path / name}"], module="ldm.cli.sample")
        assert result.returncode == 0, result.stderr[-3000:]
    files = sorted(p.name for p in (tmp_path / "a").glob("prompt*.png"))
    assert len(files) == 4
    for name in files:
        a, b = (torchvision.io.read_image(str(tmp_path / d / name)).int() for d in ("a", "b"))
        assert (a - b).abs().max() <= 1
