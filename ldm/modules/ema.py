"""Exponential moving average of a network's weights, through torch's own AveragedModel.

The average lives inside the LightningModule (`self.ema`), so it is saved in every checkpoint, restored on resume
and available to `load_from_checkpoint` without a callback.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model` (parameters and buffers); call `.update_parameters(model)` after each step."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema
