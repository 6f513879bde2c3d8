"""The project's UNet training step against diffusers' `UNet2DConditionModel` of the same layout, same weights and
same inputs, interleaved in one process.

    python benchmarks/unet_vs_diffusers.py                     # CPU, 2 threads, fp32 and bf16 autocast
    python benchmarks/unet_vs_diffusers.py --device cuda       # on a GPU
    python benchmarks/unet_vs_diffusers.py --profile 3         # plus torch.profiler's op table of both sides
    python benchmarks/unet_vs_diffusers.py --products blas     # our fp32 CPU products through BLAS (ldm.nn.linear)

One step: forward, MSE loss against a fixed random target, backward (no optimizer step on either side; gradients
are dropped with `set_to_none`). Our UNet gets random weights (every parameter perturbed, so the zero-initialised
layers carry signal too); diffusers' gets the same weights through `ldm.convert.unet_to_diffusers`, and both outputs
are compared before timing. Steps alternate A B B A, so both sides see the same machine load; the figure is the
ratio of the medians (ours / diffusers', below 1: ours faster), with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from arguments import device as device_type
from arguments import non_negative_int, output_file, positive_int
from torch import nn

import ldm.nn.linear
from ldm.convert import unet_config_to_diffusers, unet_to_diffusers
from ldm.nn.unet import UNet, UNetConfig, count_parameters

# An SD 1-style layout at about 2% of SD 1.5's size (18.28M parameters): 3 levels, cross-attention to 77 CLIP-wide
# tokens at the two lower resolutions and in the middle, 8 heads.
LAYOUT = UNetConfig(model_channels=64, channel_mult=[1, 2, 4], num_res_blocks=1, attention_levels=[1, 2],
                    num_heads=8, context_dim=768)
CONTEXT_TOKENS = 77


def build_pair(config: UNetConfig, latent_size: int, device: torch.device,
               seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(ours, diffusers') with the same random weights, in train mode, on `device`."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ours = UNet(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ours.parameters():  # zero-initialised layers get weights too, so both outputs carry signal
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    theirs = UNet2DConditionModel(**unet_config_to_diffusers(config, sample_size=latent_size))
    theirs.load_state_dict(unet_to_diffusers(ours.state_dict(), config))
    return ours.to(device).train(), theirs.to(device).train()


def make_inputs(config: UNetConfig, batch: int, size: int, device: torch.device, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config.in_channels, size, size, generator=generator).to(device),
        "t": torch.randint(0, 1000, (batch,), generator=generator).to(device),
        "context": torch.randn(batch, CONTEXT_TOKENS, config.context_dim, generator=generator).to(device),
        "target": torch.randn(batch, config.output_channels, size, size, generator=generator).to(device),
    }


def step_fn(model: nn.Module, inputs: dict, diffusers: bool, autocast: torch.autocast | nullcontext):
    """One training step of `model` (forward, MSE loss, backward), as a closure."""
    def step() -> None:
        with autocast:
            if diffusers:
                out = model(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
            else:
                out = model(inputs["x"], inputs["t"], inputs["context"])
            loss = F.mse_loss(out.float(), inputs["target"])
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def compare(ours_step, theirs_step, device: torch.device, repeats: int, warmup: int) -> dict:
    """Interleaved timing, A B B A, so a load change hits both sides alike."""
    for _ in range(warmup):
        ours_step()
        theirs_step()
    ours, theirs = [], []
    for i in range(repeats):
        if i % 2 == 0:
            ours.append(timed(ours_step, device))
            theirs.append(timed(theirs_step, device))
        else:
            theirs.append(timed(theirs_step, device))
            ours.append(timed(ours_step, device))
    ratios = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {"ours_s": statistics.median(ours), "diffusers_s": statistics.median(theirs),
            "ratio": statistics.median(ours) / statistics.median(theirs),
            "ratio_of_pairs_median": statistics.median(ratios),
            "ours_all_s": ours, "diffusers_all_s": theirs}


def profile(step, label: str, steps: int, row_limit: int) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    step()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)
    return f"### {label} ({steps} steps)\n{table}"


def max_output_diff(ours: nn.Module, theirs: nn.Module, inputs: dict) -> float:
    with torch.no_grad():
        a = ours(inputs["x"], inputs["t"], inputs["context"])
        b = theirs(inputs["x"], inputs["t"], encoder_hidden_states=inputs["context"]).sample
    return (a - b).abs().max().item()


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", type=device_type, default="cpu")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--size", type=positive_int, default=32, help="latent height and width")
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed steps per side and precision")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true", help="both models and inputs in NHWC")
    parser.add_argument("--profile", type=non_negative_int, default=0, metavar="STEPS",
                        help="also profile STEPS steps of each side and print the op tables")
    parser.add_argument("--rows", type=positive_int, default=25, help="rows of each profile table")
    parser.add_argument("--products", choices=["auto", "blas", "onednn"], default="auto",
                        help="route of our UNet's fp32 CPU products (ldm.nn.linear); auto: this machine's")
    parser.add_argument("--output", type=output_file, default=None,
                        help="JSON path (default results/unet-vs-diffusers-<device>.json)")
    args = parser.parse_args()
    factor = 2 ** (len(LAYOUT.channel_mult) - 1)  # the UNet's downsampling
    if args.size % factor:
        parser.error(f"--size {args.size} must be a multiple of {factor}, the layout's downsampling")
    torch.set_num_threads(args.threads)
    device = args.device
    if args.products != "auto":
        ldm.nn.linear.ONEDNN_PRODUCTS = args.products == "onednn"
    products = "onednn" if ldm.nn.linear.ONEDNN_PRODUCTS else "blas"

    ours, theirs = build_pair(LAYOUT, args.size, device)
    inputs = make_inputs(LAYOUT, args.batch, args.size, device)
    if args.channels_last:
        ours, theirs = ours.to(memory_format=torch.channels_last), theirs.to(memory_format=torch.channels_last)
        inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    diff = max_output_diff(ours, theirs, inputs)
    print(f"layout: {count_parameters(ours):,} parameters, batch {args.batch}, {LAYOUT.in_channels}x{args.size}x"
          f"{args.size} latents, context {CONTEXT_TOKENS}x{LAYOUT.context_dim}, {args.threads} threads, "
          f"{device} ({ldm.nn.linear.cpu_vendor()}, our fp32 CPU products through {products}); "
          f"max |ours - diffusers| of the fp32 outputs: {diff:.3g}")

    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": str(device),
               "machine": platform.processor() or platform.machine(), "cpu_vendor": ldm.nn.linear.cpu_vendor(),
               "products": products, "torch": torch.__version__,
               "threads": args.threads, "batch": args.batch, "latent_size": args.size,
               "parameters": count_parameters(ours), "channels_last": args.channels_last,
               "max_abs_output_diff_fp32": diff, "runs": {}}
    for precision in args.precisions:
        autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext())
        ours_step = step_fn(ours, inputs, False, autocast)
        theirs_step = step_fn(theirs, inputs, True, autocast)
        before = load_average()
        run = compare(ours_step, theirs_step, device, args.repeats, args.warmup)
        run["load_average_before"], run["load_average_after"] = before, load_average()
        results["runs"][precision] = run
        print(f"{precision}: ours {run['ours_s'] * 1e3:.1f} ms, diffusers {run['diffusers_s'] * 1e3:.1f} ms per step "
              f"(medians of {args.repeats}); ours / diffusers = {run['ratio']:.3f} (median of pair ratios "
              f"{run['ratio_of_pairs_median']:.3f}); load average {before[0] if before else '?'} -> "
              f"{run['load_average_after'][0] if before else '?'}")
        if args.profile:
            print(profile(ours_step, f"ours, {precision}", args.profile, args.rows))
            print(profile(theirs_step, f"diffusers, {precision}", args.profile, args.rows))

    output = args.output or Path(__file__).parent / "results" / f"unet-vs-diffusers-{device.type}.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print("| precision | ours (ms) | diffusers (ms) | ours / diffusers |\n| --- | --- | --- | --- |")
    for precision, run in results["runs"].items():
        print(f"| {precision} | {run['ours_s'] * 1e3:.1f} | {run['diffusers_s'] * 1e3:.1f} | **{run['ratio']:.3f}** |")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
