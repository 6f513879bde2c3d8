"""Command-line argument types the benchmarks share (argparse `type=`), so a bad value is one line, exit status 2."""

from __future__ import annotations

import argparse

import torch


def positive_int(text: str) -> int:
    """An integer >= 1 (repeats, rounds, steps, batch sizes, threads)."""
    value = int(text)  # a ValueError: argparse's "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def device(text: str) -> torch.device:
    """A torch device; CUDA only where one is visible."""
    try:
        parsed = torch.device(text)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device is visible here; run on a GPU machine, or leave "
                                         f"--device out for the CPU")
    return parsed
