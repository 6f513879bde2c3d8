"""Exponential moving average of a network's weights, through torch's own AveragedModel.

The average lives inside the LightningModule (`self.ema`), so it is saved in every checkpoint, restored on resume
and available to `load_from_checkpoint` without a callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: torch.nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An EMA copy of `model`'s parameters; call `.update_parameters(model)` after each step. Its buffers are not
    averaged but copied from the model's at each update (into their own dtype): those of these networks are
    constants (no batch norm), and FSDP's mixed precision casts the trained network's buffers to bf16 (averaging them
    into the fp32 copy fails).

    Args:
        model: the trained network.
        decay: the EMA's decay once warmed up.
        warmup: the update that follows n others (the first copies the weights) decays by min(decay, (1 + n) /
            (10 + n)), as diffusers' EMAModel ramps it (CompVis' LitEma runs one update ahead; 0.99 from about
            update 900, 0.9999 from about 90,000), so that the average follows
            the weights early on instead of holding the initial ones (0.9999 without it: 90% of them after 1000
            steps); the count is the AveragedModel's `n_averaged`, saved in checkpoints.
    """
    ema = AveragedModel(model, multi_avg_fn=EMAUpdate(decay, warmup), use_buffers=False)
    ema.requires_grad_(False)
    return ema


class EMAUpdate:
    """torch's EMA update (`get_ema_multi_avg_fn`) at `make_ema`'s decay; a class, not a closure, so that a module
    holding the EMA pickles (multiprocessing, `torch.save` of a whole module)."""

    def __init__(self, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup

    def __call__(self, ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: Any) -> None:
        decay = self.decay
        if self.warmup:
            n = int(num_averaged)  # updates so far (>= 1 here: the first one copies the weights)
            decay = min(decay, (1 + n) / (10 + n))
        get_ema_multi_avg_fn(decay)(ema_params, params, num_averaged)


@contextlib.contextmanager
def whole(network: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """`network` as a plain module with every parameter whole, for reading (EMA update, export): an FSDP unit gathers
    its shards for the duration (on every rank at once: a collective) and yields the module it wraps; any other
    network is already whole and comes back as it is."""
    if isinstance(network, FSDP):
        with FSDP.summon_full_params(network, writeback=False):
            yield network.module
    else:
        yield network
