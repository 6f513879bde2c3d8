"""fp32 products on CPU: BLAS (`F.linear`, MKL in torch's x86 wheels) against oneDNN's 1x1 convolution over the rows
(`ldm.nn.linear.Linear`'s own forward, its route forced at every size), forward + backward, at the shapes of the
benchmark and quickstart networks.

    python benchmarks/cpu_products.py --threads 1 2 --output benchmarks/results/cpu-products.json

Prints the machine's route rule (vendor, torch's CPU capability, `ONEDNN_PRODUCTS`) and, per shape (rows x in ->
out), the median time of each side over interleaved rounds and their ratio (oneDNN / BLAS, below 1: oneDNN faster);
`ldm.nn.linear.MIN_MACS` is where the ratio crosses 1 on the CPUs measured (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from arguments import output_file, positive_int

import ldm.nn.linear
from ldm.nn.linear import MIN_MACS, ONEDNN_PRODUCTS, Linear, cpu_vendor

# rows x in -> out: the benchmark UNet's attention and feed-forward (batch 8, 16x16 and 8x8 tokens, 77 context
# tokens), the quickstart's feed-forward and text encoder, and small products around and below MIN_MACS
SHAPES = [(2048, 128, 128), (2048, 128, 1024), (2048, 512, 128), (616, 768, 128), (512, 256, 256), (512, 256, 2048),
          (512, 1024, 256), (616, 768, 256), (2304, 64, 512), (512, 64, 512), (64, 512, 512), (128, 256, 256),
          (2048, 64, 64), (512, 256, 64), (512, 64, 64), (128, 64, 128), (32, 256, 256)]


def step(x: torch.Tensor, layer: Linear, grad: torch.Tensor, onednn: bool):
    """One forward + backward of `layer` on `x`: its own forward (oneDNN's route, forced in `main`) or F.linear."""
    def run() -> None:
        y = layer(x) if onednn else F.linear(x, layer.weight, layer.bias)
        y.backward(grad)
        x.grad = layer.weight.grad = layer.bias.grad = None
    return run


def median_ms(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=positive_int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=positive_int, default=5, help="interleaved rounds of --calls calls per side")
    parser.add_argument("--calls", type=positive_int, default=10)
    parser.add_argument("--output", type=output_file, default=None, help="JSON path (default: print only)")
    args = parser.parse_args()
    print(f"vendor {cpu_vendor()}, torch {torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}, "
          f"ONEDNN_PRODUCTS {ONEDNN_PRODUCTS}, MIN_MACS {MIN_MACS}")
    ldm.nn.linear.ONEDNN_PRODUCTS, ldm.nn.linear.MIN_MACS = True, 1  # `Linear`'s route at every size, on any CPU
    generator = torch.Generator().manual_seed(0)
    results = {"vendor": cpu_vendor(), "torch": torch.__version__,
               "capability": torch.backends.cpu.get_cpu_capability(), "rows": []}
    print("| threads | rows x in -> out | MACs / MIN_MACS | BLAS ms | oneDNN ms | oneDNN / BLAS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for M, K, N in SHAPES:
            x = torch.randn(M, K, generator=generator).requires_grad_()
            layer = Linear(K, N)
            grad = torch.randn(M, N, generator=generator)
            blas, onednn = step(x, layer, grad, False), step(x, layer, grad, True)
            for _ in range(3):
                blas(), onednn()
            pairs = [(median_ms(blas, args.calls), median_ms(onednn, args.calls)) for _ in range(args.rounds)]
            b, o = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[1] / p[0] for p in pairs)
            results["rows"].append({"threads": threads, "shape": [M, K, N], "blas_ms": b, "onednn_ms": o,
                                    "ratio": ratio})
            print(f"| {threads} | {M} x {K} -> {N} | {M * K * N / MIN_MACS:.2f} | {b:.3f} | {o:.3f} | "
                  f"**{ratio:.2f}** |", flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
