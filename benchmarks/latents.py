"""Diffusion training step on images against the same step on ldm-encode's latent shards, interleaved in one process.

    python benchmarks/latents.py                  # CPU, the quickstart model, batch 32; results/latents-cpu.json
    python benchmarks/latents.py --model sd15     # SD 1.5's UNet, KL-f8, CLIP ViT-L/14, 256 px, batch 1 (CPU: ~3 min)
    python benchmarks/latents.py --device cuda    # on a GPU (sd15: the experiment's batch 32 and bf16 autocast)

`--model quickstart`: the quickstart's stage-2 model (experiment=quickstart_ldm: the UNet, its frozen KL-f2
autoencoder and frozen byte text encoder) on 32 px `shapes` shards. `--model sd15`: experiment=sd15_256 (Stable
Diffusion 1.5's 859M-parameter UNet on the latents of the LDM paper's KL-f8 autoencoder, conditioned on CLIP
ViT-L/14's frozen text tower, with EMA) on 256 px `shapes` shards. Random weights everywhere (speed does not depend
on their values; CLIP gets a small byte-level BPE vocabulary, its tower is CLIP-L's 12 layers of width 768: 85.5M
parameters, as CLIP-L's 123M less its 49,408-token embedding). Both train on shards written to a temp dir and on
their latents written by `ldm-encode` (with the text encoder's outputs). One step: the pipeline's loss, backward,
AdamW, EMA update. Image and latent steps alternate, so both see the same machine load; the figure is the ratio of
their medians. The loaders are timed alone (samples/s, num_workers=0): one pass over each shard set, and for the
latents also a second pass with `data.cache_in_memory=true` (what the quickstart reads after its first epoch).
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
from arguments import device as device_type
from arguments import output_file, positive_int
from common import experiment, random_autoencoder, random_byte_text_encoder

from ldm import config as configs
from ldm.cli.data import write_dataset
from ldm.cli.encode import encode
from ldm.data.datamodule import WebDataModule
from ldm.modules.optim import fusable
from ldm.nn.autoencoder import DiagonalGaussianDistribution
from ldm.seeding import step_generator


def shapes_shards(root: Path, num_samples: int, resolution: int) -> Path:
    """`shapes` image shards at `resolution` under `root/shapes`."""
    write_dataset({"source": "shapes", "output_dir": str(root / "shapes"), "num_samples": num_samples,
                   "val_samples": 0, "resolution": resolution, "seed": 0, "samples_per_shard": 64})
    return root / "shapes"


def quickstart_inputs(root: Path, num_samples: int) -> tuple[Path, Path, dict]:
    """(32 px image shards, KL-f2 autoencoder export, byte text encoder node) shaped as the quickstart's."""
    text = {"kind": "byte", "name_or_path": str(random_byte_text_encoder(root))}
    return shapes_shards(root, num_samples, 32), random_autoencoder(root, "quickstart_vae", 1.0), text


def sd15_inputs(root: Path, num_samples: int) -> tuple[Path, Path, dict]:
    """(256 px image shards, the LDM paper's KL-f8 autoencoder export, CLIP ViT-L/14's text tower node)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    shards = shapes_shards(root, num_samples, 256)
    autoencoder = random_autoencoder(root, "kl_f8", 0.18215)  # SD's VAE scale
    # A byte-level BPE vocabulary without merges (CLIP's own is not on disk offline); 77 tokens per prompt either way.
    clip = root / "clip"
    clip.mkdir()
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (clip / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (clip / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(clip), model_max_length=77)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)  # openai/clip-vit-large-patch14's text tower
    CLIPTextModel(config).save_pretrained(clip)
    tokenizer.save_pretrained(clip)
    return shards, autoencoder, {"kind": "clip", "name_or_path": str(clip)}


# --model: (experiment, writes the inputs, batch size on CPU (None: the experiment's), timed steps of each kind)
MODELS = {"quickstart": ("quickstart_ldm", quickstart_inputs, None, 10), "sd15": ("sd15_256", sd15_inputs, 1, 3)}


def loader_batches(shards: str, batch_size: int, resolution: int, passes: int = 1) -> tuple[list[dict], list[float]]:
    """Every batch of the first pass over `shards`, and the loader's samples/s in each of `passes` passes (after the
    first from memory: `data.cache_in_memory=true`)."""
    dm = WebDataModule(train_shards=shards, batch_size=batch_size, resolution=resolution, num_workers=0, seed=0,
                       pin_memory=False, cache_in_memory=passes > 1)
    dm.setup("fit")
    loader, passes_read, rates = dm.train_dataloader(), [], []
    for _ in range(passes):
        start = time.perf_counter()
        passes_read.append(list(loader))
        rates.append(len(passes_read[-1]) * batch_size / (time.perf_counter() - start))
    return passes_read[0], rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="quickstart", choices=sorted(MODELS))
    parser.add_argument("--device", type=device_type, default="cpu")
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed steps of each kind, after 2 warm-up pairs (default: 10 quickstart, 3 sd15)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="default: the experiment's (sd15 on CPU: 1)")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--output", type=output_file, default=None,
                        help="JSON file (default: benchmarks/results/latents-[sd15-]<device>.json)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = args.device
    name, write_inputs, cpu_batch_size, repeats = MODELS[args.model]
    repeats = args.repeats or repeats  # (both >= 1 when given)
    batch_size = args.batch_size or (cpu_batch_size if device.type == "cpu" else None)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        overrides = [] if batch_size is None else [f"data.batch_size={batch_size}"]
        batch_size = experiment(name, overrides).data.batch_size
        shards, autoencoder, text_encoder = write_inputs(root, num_samples=batch_size * (repeats + 2))
        start = time.perf_counter()
        encode({"shards": str(shards / "train-*.tar"), "autoencoder_path": str(autoencoder), "progress": False,
                "output_dir": str(root / "latents"), "accelerator": device.type, "text_encoder": text_encoder})
        encode_seconds = time.perf_counter() - start
        cfg = experiment(name, [*overrides, f"model.autoencoder_path={autoencoder}",
                                f"model.conditioner.name_or_path={text_encoder['name_or_path']}"])
        resolution = cfg.data.resolution
        images, (image_rate,) = loader_batches(str(shards / "train-*.tar"), batch_size, resolution)
        latents, (latent_rate, cached_rate) = loader_batches(str(root / "latents" / "train-*.tar"), batch_size,
                                                             resolution, passes=2)
        module = configs.instantiate(cfg.model, "model").to(device)

    if cfg.get("channels_last"):
        module.to(memory_format=torch.channels_last)
    module.train()
    pipeline = module.pipeline
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fusable(params))  # as ldm-train builds it
    # The experiment's precision on a GPU (sd15_256: bf16-mixed, as Lightning runs it: the step under autocast), fp32
    # on the CPU (no bf16 instructions on some CPUs; the trainer=cpu default).
    precision = cfg.trainer.precision if device.type == "cuda" else "32-true"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16"))

    def step(batch: dict, index: int) -> float:
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        inputs = DiagonalGaussianDistribution(batch["moments"]) if "moments" in batch else batch["image"]
        with autocast:
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
        warmup = " (warm-up)" if i < 2 else ""
        print(f"pair {i}{warmup}: images {t_images:.3f} s, latents {t_latents:.3f} s", flush=True)
        if i >= 2:  # warm-up pairs left out
            times["images"].append(t_images)
            times["latents"].append(t_latents)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model, "experiment": name, "device": str(device), "threads": args.threads,
        "torch": torch.__version__, "machine": platform.processor(), "precision": precision,
        "batch_size": batch_size, "repeats": len(times["images"]),
        "step_seconds_images": medians["images"], "step_seconds_latents": medians["latents"],
        "ratio_latents_to_images": medians["latents"] / medians["images"],
        "loader_samples_per_sec_images": image_rate, "loader_samples_per_sec_latents": latent_rate,
        "loader_samples_per_sec_latents_in_memory": cached_rate,
        "encode_samples_per_sec": len(images) * batch_size / encode_seconds,
    }
    suffix = device.type if args.model == "quickstart" else f"{args.model}-{device.type}"
    print(json.dumps(result, indent=2))
    out = args.output or Path(__file__).resolve().parent / "results" / f"latents-{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
