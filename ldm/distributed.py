"""Which process this is and which device it runs on: the one rank / world-size lookup and the one device chooser.

    rank, world = rank_and_world(trainer)         # the trainer's, else torch.distributed's, else RANK / WORLD_SIZE
    device = choose_device("auto", key="device")  # cuda:<LOCAL_RANK> when CUDA is there, else cpu
    module.log_dict(mean_over_ranks(trainer, {"loss": loss, "accuracy": accuracy}))  # global-batch values
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ldm.config import ConfigError


def rank_and_world(trainer: Any = None) -> tuple[int, int]:
    """(global rank, world size), read in the main process: a Lightning trainer's when given, else the initialised
    torch.distributed group's, else the RANK / WORLD_SIZE a launcher exported, else (0, 1)."""
    if trainer is not None:
        return trainer.global_rank, trainer.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def mean_over_ranks(trainer: Any, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each scalar's mean over the ranks, in one all-reduce: a step's figures over its global batch when every rank
    holds an equal share of it (Lightning's `sync_dist=True` reduces each logged key by itself)."""
    device = trainer.strategy.root_device
    stacked = torch.stack([v.detach().to(device, torch.float32).reshape(()) for v in values.values()])
    if trainer.world_size > 1:
        stacked = trainer.strategy.reduce(stacked, reduce_op="mean")
    return dict(zip(values, stacked))


def choose_device(name: str, key: str = "device", index: int | None = None) -> torch.device:
    """`auto` (a CUDA device when CUDA is available, else cpu), `cpu`, `cuda` or `cuda:N`; a CUDA device without
    CUDA is a ConfigError naming `key`. `auto` and `cuda` take device `index` (default: LOCAL_RANK)."""
    index = int(os.environ.get("LOCAL_RANK", 0)) if index is None else index
    if name == "auto":
        return torch.device("cuda", index) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cuda":
        name = f"cuda:{index}"
    if not name.startswith(("cpu", "cuda")):
        raise ConfigError(f"{key}={name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name} but CUDA is not available; use {key}=cpu or {key}=auto")
    return torch.device(name)
