"""The SD 1.5 UNet's training step on a GPU: with and without `torch.compile`, channels_last and gradient
checkpointing; images/s, MFU and peak memory.

    python benchmarks/gpu.py                  # 6 combinations, about 6 minutes on an H200 (each compile 2.5 min)
    python benchmarks/gpu.py --all            # all 8: compile with checkpointing too (3 min more each)
    python benchmarks/gpu.py --only compile=1,channels_last=1,checkpointing=0   # repeatable
    python benchmarks/gpu.py --dry-run        # no GPU needed: the tiny UNet on CPU, compile with the eager backend

`UNET_CONFIGS["sd15"]` (859.5M parameters, random weights) at 256 px: 4x32x32 latents, a 77x768 context, bf16
autocast (fp32 weights, as `trainer.precision=bf16-mixed`). One step: forward, MSE loss, backward, fused AdamW step.
Model FLOPs per step are counted once with torch's `FlopCounterMode` (forward + backward of the plain model:
checkpointing's recomputation is not model FLOPs, as MFU is defined); MFU divides them by the step time and the
device's dense bf16 peak from `ldm.callbacks.throughput.PEAK_FLOPS`. Peak memory is
`torch.cuda.max_memory_allocated` over the timed steps (weights, gradients and AdamW state included). Writes
benchmarks/results/gpu-<device>.json and prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import re
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from arguments import non_negative_int, positive_int
from torch.utils.flop_counter import FlopCounterMode

from ldm.callbacks.throughput import peak_flops
from ldm.io import atomic_write_text
from ldm.nn.unet import UNet, count_parameters, unet_config

SWITCHES = ("compile", "channels_last", "checkpointing")


@dataclasses.dataclass
class Setup:
    """What one run measures: the network, its inputs and the step counts."""

    unet: str = "sd15"          # a UNET_CONFIGS name
    batch: int = 32
    latent_size: int = 32       # 256 px / 8
    context_tokens: int = 77
    warmup: int = 3             # untimed steps after compilation
    steps: int = 10             # timed steps
    compile_backend: str = "inductor"


def parse_only(texts: list[str] | None, everything: bool = False) -> list[dict[str, bool]]:
    """The combinations to run (eager first): those named, each as `compile=1,channels_last=0,...`; else all 8 when
    `everything`, or the 6 that fit a 10-minute GPU session (compile with checkpointing left out: each of them
    compiles for about 3 minutes)."""
    combos = [dict(zip(SWITCHES, values, strict=True)) for values in itertools.product((False, True), repeat=3)]
    if not texts:
        return combos if everything else [c for c in combos if not (c["compile"] and c["checkpointing"])]
    chosen = []
    for text in texts:
        combo: dict[str, bool] = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            if key not in SWITCHES or value not in ("0", "1"):
                raise ValueError(f"--only {text!r}: expected {','.join(f'{s}=0|1' for s in SWITCHES)}")
            combo[key] = value == "1"
        missing = [s for s in SWITCHES if s not in combo]
        if missing:
            raise ValueError(f"--only {text!r} does not set {missing}")
        chosen.append(combo)
    return chosen


def make_inputs(model: UNet, setup: Setup, device: torch.device) -> dict[str, torch.Tensor]:
    c = model.config
    g = torch.Generator(device=device).manual_seed(0)
    shape = (setup.batch, c.in_channels, setup.latent_size, setup.latent_size)
    return {"x": torch.randn(shape, generator=g, device=device),
            "t": torch.randint(0, 1000, (setup.batch,), generator=g, device=device),
            "context": torch.randn(setup.batch, setup.context_tokens, c.context_dim, generator=g, device=device),
            "target": torch.randn(shape, generator=g, device=device)}


def loss_of(network: torch.nn.Module, inputs: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = network(inputs["x"], inputs["t"], inputs["context"])             # (B, 4, h, w)
    return F.mse_loss(out.float(), inputs["target"])


def count_flops(model: UNet, inputs: dict[str, torch.Tensor], device: torch.device) -> int:
    """Model FLOPs of one forward + backward (no checkpointing, not compiled)."""
    with FlopCounterMode(display=False) as counter:
        loss_of(model, inputs, device).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_combo(model: UNet, inputs: dict[str, torch.Tensor], setup: Setup, combo: dict[str, bool],
              device: torch.device) -> dict[str, Any]:
    """Time one combination; the model is switched in place (memory format, checkpointing) and restored."""
    fmt = torch.channels_last if combo["channels_last"] else torch.contiguous_format
    model.to(memory_format=fmt)
    model.config = dataclasses.replace(model.config, gradient_checkpointing=combo["checkpointing"])
    inputs = dict(inputs, x=inputs["x"].contiguous(memory_format=fmt))
    network: torch.nn.Module = model
    if combo["compile"]:
        torch._dynamo.reset()  # note: no code compiled for another combination is reused or counted against limits
        network = torch.compile(model, backend=setup.compile_backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step() -> None:
        loss_of(network, inputs, device).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    step()  # compiles when compiling
    synchronize(device)
    first_step = time.perf_counter() - start
    for _ in range(setup.warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(setup.steps):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    result = {**combo, "first_step_s": first_step, "step_s": statistics.median(times),
              "images_per_s": setup.batch / statistics.median(times),
              "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
    model.zero_grad(set_to_none=True)
    return result  # the optimizer's state and the compiled code go with this frame


def table(results: list[dict[str, Any]]) -> str:
    """Markdown rows of `results` (with the header)."""
    rows = ["| compile | channels_last | checkpointing | images/s | step (ms) | MFU | peak memory (GiB) "
            "| first step (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        switches = " | ".join("on" if r[s] else "off" for s in SWITCHES)
        if "error" in r:
            rows.append(f"| {switches} | {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "n/a"
        rows.append(f"| {switches} | {r['images_per_s']:.1f} | "
                    f"{1e3 * r['step_s']:.1f} | {mfu} | {memory} | {r['first_step_s']:.1f} |")
    return "\n".join(rows)


def write_results(path: Path, run: dict[str, Any]) -> None:
    """Write `run` to `path` atomically, keeping the rows of an earlier run of the same setup that this one did not
    measure (`--only` fills in missing rows without dropping the others)."""
    rows = run["results"]
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier.get("setup") == run["setup"]:
            measured = [{s: r[s] for s in SWITCHES} for r in rows]
            rows = [r for r in earlier["results"] if {s: r[s] for s in SWITCHES} not in measured] + rows
            rows.sort(key=lambda r: tuple(r[s] for s in SWITCHES))
    atomic_write_text(json.dumps({**run, "results": rows}, indent=2) + "\n", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per combination")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed steps per combination after the first")
    parser.add_argument("--only", action="append", default=None,
                        help="a combination to run, e.g. compile=1,channels_last=1,checkpointing=0 (repeatable)")
    parser.add_argument("--name", default=None, help="results/gpu-<name>.json (default: the device's name)")
    parser.add_argument("--all", action="store_true", help="all 8 combinations (about 12 minutes on an H200)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU: the tiny UNet on CPU, 8x8 latents, batch 2, torch.compile's eager backend; "
                             "checks the script's logic, its numbers mean nothing")
    args = parser.parse_args(argv)
    if args.only and args.all:
        parser.error("--only and --all: give one of them")
    try:
        combos = parse_only(args.only, args.all)
    except ValueError as err:
        parser.error(str(err))  # exit status 2

    if args.dry_run:
        device = torch.device("cpu")
        setup = Setup(unet="tiny", batch=2, latent_size=8, context_tokens=5, warmup=1, steps=2,
                      compile_backend="eager")
    else:
        if not torch.cuda.is_available():
            print("benchmarks/gpu.py measures a CUDA GPU and none is available here; run it on a GPU machine, or "
                  "pass --dry-run to check the script on CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        setup = Setup(batch=args.batch, warmup=args.warmup, steps=args.steps)
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts (norms' statistics, the loss) as ldm-train's tf32
        torch.backends.cudnn.allow_tf32 = True

    with torch.device(device):
        model = UNet(unet_config(setup.unet))
    inputs = make_inputs(model, setup, device)
    flops = count_flops(model, inputs, device)
    peak, dtype = peak_flops(device, "bf16-mixed")
    name = args.name or ("dry-run" if args.dry_run else
                         re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-"))
    print(f"{setup.unet} UNet, {count_parameters(model):,} parameters, batch {setup.batch}, "
          f"{model.config.in_channels}x{setup.latent_size}x{setup.latent_size} latents, bf16 autocast, {name}; "
          f"{flops / 1e9:,.1f} GFLOPs per step (forward + backward); peak "
          f"{'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s ({dtype})'}", flush=True)

    output = Path(__file__).resolve().parent / "results" / f"gpu-{name}.json"
    results = []
    for combo in combos:
        try:
            result = run_combo(model, inputs, setup, combo, device)
        except torch.OutOfMemoryError as err:
            result = {**combo, "error": f"out of memory ({str(err).splitlines()[0][:80]})"}
            model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next combination starts from the weights alone
        if "error" not in result:
            result["mfu"] = flops / result["step_s"] / peak if peak else None
        results.append(result)
        print(table([result]).splitlines()[-1], flush=True)
        if not args.dry_run:  # after every combination: a run stopped by a time limit keeps what it measured
            write_results(output, {
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": name,
                "torch": torch.__version__, "setup": dataclasses.asdict(setup), "parameters": count_parameters(model),
                "flops_per_step": flops, "peak_flops": peak, "peak_dtype": dtype, "results": results})

    print(table(results))
    print("dry run: nothing written" if args.dry_run else f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
