"""Throughput of the pieces a training run spends its time in, on whatever device is given.

    python benchmarks/throughput.py                       # CPU, writes benchmarks/results/throughput-cpu.json
    python benchmarks/throughput.py --device cuda --sd15  # GPU, adds the SD 1.5 UNet at 256 px (32x32 latents)

Measures, each after warm-up, as the median of timed repeats (the data rows: one pass each, worker start-up included):
  data      WebDataModule train loader over `shapes` shards written to a temp dir (samples/s, by num_workers)
  vae       quickstart autoencoder train step: forward, L2 + KL loss, backward, Adam step (images/s)
  clip      quickstart contrastive step (byte text encoder + image tower, InfoNCE) at its batch size (pairs/s)
  unet      quickstart UNet + frozen byte text encoder train step on the quickstart autoencoder's latents
            (images/s); --sd15 adds SD 1.5's UNet
  sampling  quickstart UNet, DPM-Solver++(2M) 20 steps with guidance 3 (images/s), latents only

Model configs come from the experiment files (experiment=quickstart_vae / quickstart_clip / quickstart_ldm), with
their `channels_last` (NHWC weights) and the fused Adam / AdamW step `ldm-train` takes where it can, so the numbers
describe the networks and steps `make quickstart` runs (the losses are simpler: no EMA, no LPIPS or GAN).
Results: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from arguments import device as device_type
from arguments import output_file, positive_int
from common import experiment, random_byte_text_encoder
from omegaconf import OmegaConf

from ldm.conditioning import build_conditioner
from ldm.config import to_dataclass
from ldm.data.datamodule import WebDataModule
from ldm.data.shards import WriteConfig, write_shards
from ldm.diffusion import NoiseSchedule, ScheduleConfig, run_sampler, spaced_timesteps
from ldm.diffusion.sampling import Denoiser, guided_denoiser
from ldm.modules.contrastive import ContrastiveModule
from ldm.modules.optim import fusable
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.nn.unet import UNET_CONFIGS, UNet, UNetConfig
from ldm.seeding import StackedRandomGenerator


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of one call of `fn` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def experiment_config(name: str) -> dict:
    return OmegaConf.to_container(experiment(name), resolve=True)


def experiment_model(name: str) -> dict:
    return experiment_config(name)["model"]


def as_in_quickstart(module: torch.nn.Module, cfg: dict) -> torch.nn.Module:
    """`module` with the memory format of the experiment config `cfg` (`channels_last`: NHWC 4-D weights, as ldm-train
    converts)."""
    if cfg.get("channels_last"):
        module.to(memory_format=torch.channels_last)
    return module


def adam(kind: type[torch.optim.Optimizer], params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """`kind` (Adam, AdamW) over the trainable `params`, fused where ldm-train's modules fuse it (`fusable`)."""
    params = [p for p in params if p.requires_grad]  # a frozen encoder's are not
    return kind(params, lr=1e-4, fused=fusable(params))


def quickstart_latent_size() -> int:
    """Side of the quickstart autoencoder's latents."""
    return to_dataclass(AutoencoderConfig, experiment_model("quickstart_vae")["net"]).latent_resolution


def bench_data(batch_size: int) -> dict[str, float]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(WriteConfig(source="shapes", output_dir=tmp, num_samples=4096, val_samples=0, resolution=32,
                                 samples_per_shard=512))
        for workers in (0, 1, 2):
            dm = WebDataModule(train_shards=f"{tmp}/train-*.tar", resolution=32, batch_size=batch_size,
                               num_workers=workers, pin_memory=False)
            dm.setup("fit")
            start, n = time.perf_counter(), 0
            for batch in dm.train_dataloader():
                n += batch["image"].shape[0]
            results[f"num_workers={workers}"] = n / (time.perf_counter() - start)
    return results


def bench_vae(device: torch.device, batch_size: int, repeats: int) -> float:
    cfg = experiment_config("quickstart_vae")
    net = cfg["model"]["net"]
    model = as_in_quickstart(AutoencoderKL(to_dataclass(AutoencoderConfig, net)).to(device), cfg)
    opt = adam(torch.optim.Adam, list(model.parameters()))
    x = torch.rand(batch_size, 3, net["resolution"], net["resolution"], device=device) * 2 - 1

    def step() -> None:
        posterior = model.encode(x)
        recon = model.decode(posterior.sample())
        loss = (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch_size / timed(step, device, warmup=3, repeats=repeats)


def unet_step(unet: UNet, conditioner: torch.nn.Module | None, device: torch.device, batch_size: int, size: int,
              precision: torch.dtype | None) -> Callable[[], None]:
    encoder = list(conditioner.parameters()) if conditioner is not None else []
    opt = adam(torch.optim.AdamW, list(unet.parameters()) + encoder)
    x = torch.randn(batch_size, unet.config.in_channels, size, size, device=device)
    t = torch.randint(0, 1000, (batch_size,), device=device)
    prompts = ["a large red circle in the center on a white background"] * batch_size
    context = None if conditioner is not None else torch.randn(batch_size, 77, unet.config.context_dim, device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
            cond = conditioner(prompts) if conditioner is not None else {"context": context}
            loss = unet(x, t, **cond).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_unet(device: torch.device, batch_size: int, repeats: int, sd15: bool) -> dict[str, float]:
    cfg = experiment_config("quickstart_ldm")
    model = cfg["model"]
    unet = as_in_quickstart(UNet(to_dataclass(UNetConfig, model["unet"])).to(device), cfg)
    with tempfile.TemporaryDirectory() as root:  # the quickstart's frozen pretrained encoder, random weights
        text = {**model["conditioner"], "name_or_path": str(random_byte_text_encoder(Path(root))), "trainable": False}
        conditioner = build_conditioner(text).to(device)
    assert not conditioner.trainable
    size = quickstart_latent_size()
    step = unet_step(unet, conditioner, device, batch_size, size, None)
    results = {f"quickstart {unet.config.in_channels}x{size}x{size}": batch_size / timed(step, device, 3, repeats)}
    if sd15:
        big = UNet(UNET_CONFIGS["sd15"]).to(device)
        precision = torch.bfloat16 if device.type == "cuda" else None
        name = f"sd15 4x32x32 {'bf16' if precision is not None else 'fp32'}"
        results[name] = 8 / timed(unet_step(big, None, device, 8, 32, precision), device, 2, repeats)
    return results


def bench_contrastive(device: torch.device, repeats: int) -> float:
    cfg = experiment_config("quickstart_clip")
    model, batch_size = cfg["model"], cfg["data"]["batch_size"]
    module = as_in_quickstart(ContrastiveModule(model).to(device), cfg)
    opt = adam(torch.optim.AdamW, list(module.parameters()))
    side = model["image"]["resolution"]
    batch = {"image": torch.rand(batch_size, 3, side, side, device=device) * 2 - 1,
             "caption": [f"a large red circle in the center on a white background {i}" for i in range(batch_size)]}

    def step() -> None:
        loss, _ = module._loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch_size / timed(step, device, warmup=2, repeats=repeats)


@torch.no_grad()
def bench_sampling(device: torch.device, num_images: int, repeats: int) -> float:
    model = experiment_model("quickstart_ldm")
    unet = UNet(to_dataclass(UNetConfig, model["unet"])).to(device).eval()  # as ldm-sample / ldm-eval load it
    conditioner = build_conditioner(model["conditioner"], load_pretrained=False).to(device).eval()
    schedule = NoiseSchedule(to_dataclass(ScheduleConfig, model["diffusion"]["schedule"]))
    prompts = ["a large red circle in the center on a white background"] * num_images
    cond, uncond = conditioner(prompts), conditioner.unconditional(num_images, device)
    denoiser = Denoiser(guided_denoiser(lambda x, t, c: unet(x, t, **c), cond, uncond, 3.0), schedule,
                        model["diffusion"]["prediction"])
    timesteps = spaced_timesteps(20, schedule.num_train_timesteps, "trailing")
    size = quickstart_latent_size()

    def sample() -> None:
        rng = StackedRandomGenerator(range(num_images), device)
        run_sampler("dpmpp_2m", denoiser, rng.randn((num_images, unet.config.in_channels, size, size)), timesteps, rng)

    return num_images / timed(sample, device, warmup=1, repeats=repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_type, default="cpu")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--sd15", action="store_true", help="also time the SD 1.5 UNet (GPU recommended)")
    parser.add_argument("--out", type=output_file, default=None,
                        help="JSON file (default benchmarks/results/throughput-<device>.json)")
    args = parser.parse_args()
    device = args.device
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "data_samples_per_s": bench_data(args.batch_size),
        "vae_train_images_per_s": bench_vae(device, args.batch_size, args.repeats),
        "clip_train_pairs_per_s": bench_contrastive(device, args.repeats),
        "unet_train_images_per_s": bench_unet(device, args.batch_size, args.repeats, args.sd15),
        "sampling_images_per_s": bench_sampling(device, 16, max(args.repeats // 3, 2)),
    }
    print(json.dumps(results, indent=2))
    out = args.out or Path(__file__).parent / "results" / f"throughput-{device.type}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
