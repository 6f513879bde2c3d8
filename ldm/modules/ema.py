"""Exponential moving average of a network's weights, through torch's own AveragedModel.

The average lives inside the LightningModule (`self.ema`), so it is saved in every checkpoint, restored on resume
and available to `load_from_checkpoint` without a callback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of `model`'s parameters; call `.update_parameters(model)` after each step. Its buffers are not
    averaged but copied from the model's at each update (into their own dtype): those of these networks are
    constants (no batch norm), and FSDP's mixed precision casts the trained network's buffers to bf16 (averaging them
    into the fp32 copy fails)."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)
    ema.requires_grad_(False)
    return ema


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
