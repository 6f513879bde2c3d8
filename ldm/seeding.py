"""Random number generation that depends on seeds only, never on batch size, GPU count or resume point.

Training noise comes from `step_generator(seed, rank, step)`: each rank draws different noise, and a resumed run draws
exactly what the uninterrupted run drew at that step. Sampling noise comes from `StackedRandomGenerator`, one
generator per image seed (EDM2, `generate_images.py`), so an image depends on its own seed only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


def fold_seed(*values: int) -> int:
    """Mix integers into one 63-bit seed (splitmix64 over the values), deterministic across processes."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, rank: int, step: int, device: torch.device | str = "cpu",
                   micro: int = 0) -> torch.Generator:
    """A generator for one training step on one rank: noise, timesteps and condition dropout draw from it.

    Args:
        micro: the micro-batch within the step under gradient accumulation (0: the first, and the only one
            without): draws depend on (step, micro), so a resume with another accumulation never repeats them.
    """
    return torch.Generator(device=device).manual_seed(fold_seed(seed, rank, step, *([micro] if micro else [])))


def check_seeds(key: str, seed: int, count: int) -> None:
    """Raise ConfigError naming `key` unless the seeds `seed` .. `seed + count - 1` (one per image) lie in [0, 2**63):
    `StackedRandomGenerator` takes seeds modulo 2**63, so a negative one would repeat another seed's images."""
    from ldm.config import ConfigError

    last = seed + count - 1
    if not 0 <= seed <= last < 1 << 63:
        raise ConfigError(f"{key}={seed}: the seeds {seed}..{last} (one per image) must lie in [0, 2**63); choose "
                          f"{'a seed >= 0' if seed < 0 else 'a smaller seed'}")


def keeps_global_rng(load: F) -> F:
    """Decorator for a function that loads a model: torch's global generator is as it found it. (Building the model
    initialises its weights at random before the saved ones replace them: a load would move a script's later draws,
    and a training run's new layers would start from weights that depend on the loaded parts' architecture.)"""
    @functools.wraps(load)
    def wrapper(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):  # models are built on the CPU
            return load(*args, **kwargs)
    return wrapper  # type: ignore[return-value]


class StackedRandomGenerator:
    """One torch.Generator per sample seed; `randn` stacks per-sample draws along the batch dimension."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(int(s) % (1 << 63)) for s in seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of `shape`; shape[0] must equal the number of seeds."""
        if shape[0] != len(self.generators):
            raise ValueError(f"batch dimension {shape[0]} != number of seeds {len(self.generators)}")
        return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=self.device, dtype=dtype)
                            for g in self.generators])

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype)
