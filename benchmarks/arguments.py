"""Command-line argument types the benchmarks share (argparse `type=`), so a bad value is one line, exit status 2."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def positive_int(text: str) -> int:
    """An integer >= 1 (repeats, rounds, steps, batch sizes, threads)."""
    value = int(text)  # a ValueError: argparse's "invalid positive_int value"
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps, profiled steps)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be >= 0")
    return value


def output_file(text: str) -> Path:
    """A JSON file the run writes at its end, checked (its folder made) before anything is measured: a folder, or a
    path under a file, lost the whole run at its end."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name, e.g. {path / 'results.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot make the folder {path.parent} of {text}: {err.strerror}") from None
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path.parent} is not writable")
    return path


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
