"""Optimizer helpers shared by the LightningModules."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler

from ldm.config import ConfigError

LR_SCHEDULES = ("constant", "cosine", "linear")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                 total_steps: float) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules: linear warmup from 0 over `warmup_steps` optimizer steps, then `schedule`: constant,
    or a cosine or linear decay to 0 at `total_steps` (the trainer's `estimated_stepping_batches`)."""
    if schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    if not math.isfinite(total_steps):
        raise ConfigError(f"model.lr_schedule={schedule} decays to 0 at the last step, which is unknown here: set "
                          f"trainer.max_steps, or model.lr_schedule=constant")
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=int(total_steps))
