"""Diffusion training step on images against the same step on ldm-encode's latent shards, interleaved in one process.

    python benchmarks/latents.py                  # CPU, the quickstart model, batch 32; results/latents-cpu.json
    python benchmarks/latents.py --device cuda    # on a GPU

The quickstart's stage-2 model (experiment=quickstart_ldm: the UNet, its frozen KL-f2 autoencoder and frozen byte text
encoder, random weights: speed does not depend on their values) trains on `shapes` shards written to a temp dir, and
on their latents written by `ldm-encode` (with the text encoder's outputs). One step: the pipeline's loss, backward,
AdamW, EMA update. Image and latent steps alternate, so both see the same machine load; the figure is the ratio of
their medians. The loaders are timed alone (samples/s, num_workers=0): one pass over each shard set, and for the latents
also a second pass with `data.cache_in_memory=true` (what the quickstart reads after its first epoch).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm import config as configs
from ldm.cli.common import CONF_DIR
from ldm.cli.data import write_dataset
from ldm.cli.encode import encode
from ldm.conditioning import ByteTextEncoder
from ldm.data.datamodule import WebDataModule
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussianDistribution
from ldm.seeding import step_generator


def experiment(name: str, overrides: list[str]) -> dict:
    configs.register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={name}", "data.train_shards=unused", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def write_inputs(root: Path, num_samples: int) -> tuple[Path, Path, Path]:
    """(image shards, autoencoder export, text encoder export) shaped as the quickstart's."""
    write_dataset({"source": "shapes", "output_dir": str(root / "shapes"), "num_samples": num_samples,
                   "val_samples": 0, "resolution": 32, "seed": 0, "samples_per_shard": 64})
    vae = experiment("quickstart_vae", [])["model"]["net"]
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(configs.to_dataclass(AutoencoderConfig, vae)).save_pretrained(
        root / "vae", latent_stats={"scale_factor": 1.0})
    text = experiment("quickstart_clip", [])["model"]["text"]
    encoder = ByteTextEncoder(text["width"], text["num_layers"], text["num_heads"], text["max_length"])
    return root / "shapes", autoencoder, encoder.save_pretrained(root / "clip")


def loader_batches(shards: str, batch_size: int, passes: int = 1) -> tuple[list[dict], list[float]]:
    """Every batch of the first pass over `shards`, and the loader's samples/s in each of `passes` passes (after the
    first from memory: `data.cache_in_memory=true`)."""
    dm = WebDataModule(train_shards=shards, batch_size=batch_size, num_workers=0, seed=0, pin_memory=False,
                       cache_in_memory=passes > 1)
    dm.setup("fit")
    loader, passes_read, rates = dm.train_dataloader(), [], []
    for _ in range(passes):
        start = time.perf_counter()
        passes_read.append(list(loader))
        rates.append(len(passes_read[-1]) * batch_size / (time.perf_counter() - start))
    return passes_read[0], rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind (after 2 warm-up pairs)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shards, autoencoder, text = write_inputs(root, num_samples=32 * (args.repeats + 2))
        start = time.perf_counter()
        encode({"shards": str(shards / "train-*.tar"), "autoencoder_path": str(autoencoder), "progress": False,
                "output_dir": str(root / "latents"), "accelerator": device.type,
                "text_encoder": {"kind": "byte", "name_or_path": str(text)}})
        encode_seconds = time.perf_counter() - start
        cfg = experiment("quickstart_ldm", [f"model.autoencoder_path={autoencoder}",
                                            f"model.conditioner.name_or_path={text}"])
        batch_size = cfg["data"]["batch_size"]
        images, (image_rate,) = loader_batches(str(shards / "train-*.tar"), batch_size)
        latents, (latent_rate, cached_rate) = loader_batches(str(root / "latents" / "train-*.tar"), batch_size, 2)
        module = configs.instantiate(OmegaConf.create(cfg["model"]), "model").to(device)

    if cfg.get("channels_last"):
        module.to(memory_format=torch.channels_last)
    module.train()
    pipeline = module.pipeline
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(batch: dict, index: int) -> float:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        inputs = DiagonalGaussianDistribution(batch["moments"]) if "moments" in batch else batch["image"]
        conditions = pipeline.conditioner.batch_conditions(batch)
        loss = pipeline.loss(inputs, conditions, step_generator(0, 0, index, device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if module.ema is not None:
            module.ema.update_parameters(pipeline.unet)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    times: dict[str, list[float]] = {"images": [], "latents": []}
    for i, (image_batch, latent_batch) in enumerate(zip(images, latents)):
        t_images, t_latents = step(image_batch, i), step(latent_batch, i)
        if i >= 2:  # warm-up pairs left out
            times["images"].append(t_images)
            times["latents"].append(t_latents)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": str(device), "threads": args.threads, "torch": torch.__version__, "machine": platform.processor(),
        "batch_size": batch_size, "repeats": len(times["images"]),
        "step_seconds_images": medians["images"], "step_seconds_latents": medians["latents"],
        "ratio_latents_to_images": medians["latents"] / medians["images"],
        "loader_samples_per_sec_images": image_rate, "loader_samples_per_sec_latents": latent_rate,
        "loader_samples_per_sec_latents_in_memory": cached_rate,
        "encode_samples_per_sec": len(images) * batch_size / encode_seconds,
    }
    out = Path(__file__).resolve().parent / "results" / f"latents-{device.type}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
