"""Optimizer helpers shared by the LightningModules."""

from __future__ import annotations

import torch


def warmup_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 to the base learning rate over `warmup_steps` optimizer steps, then constant."""
    warmup_steps = max(int(warmup_steps), 0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
