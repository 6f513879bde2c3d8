"""The global RNG streams of training (torch CPU and CUDA, numpy, python) saved per rank and restored on resume.

Training noise comes from `ldm.seeding.step_generator`, which needs no state. What still draws from the global
generators (dropout, a posterior sample, an augmentation in the main process) must continue on resume exactly where
the uninterrupted run was. Lightning restores none of these, so this callback does, with one more rule: the stream
that training steps see is isolated from everything between two steps. Its state is captured at the end of each
training batch and put back at the start of the next one, so validation, dataloader iterators (which draw a base seed
from the global generator when they are created) and checkpoint saving never shift it, and a run resumed from a
checkpoint written at any of those points continues with the same stream as the run that was never stopped.

Each rank's stream starts from `fold_seed(seed, rank)` when fit begins (after the model was built from the common
seed, so weights still start equal on all ranks), so dropout differs between ranks. The checkpoint holds one state
per rank (gathered to rank 0); each rank takes its own back on resume.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ldm.seeding import fold_seed


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states of this process."""
    # note: numpy's state goes in as tensors and ints, so `torch.load(weights_only=True)` reads the checkpoint.
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():  # (is_available() first costs 50 us a call on a CUDA build without a GPU)
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNG states of this process from `capture_rng_state()`'s output."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_rng(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class RngState(L.Callback):
    """Save every rank's training RNG state in checkpoints and continue it on resume (see the module docstring).

    Args:
        seed: the run's seed; rank r's training stream starts from fold_seed(seed, r). None: leave the generators as
            they are at the start of fit.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._train_state: dict[str, Any] | None = None  # this rank's stream, as the last training batch left it
        self._loaded: list[dict[str, Any]] | None = None  # per-rank states from a checkpoint, not yet applied

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.seed is not None:
            seed_rng(fold_seed(self.seed, trainer.global_rank))
            self._train_state = capture_rng_state()

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._loaded is not None:
            rank = trainer.global_rank
            if rank < len(self._loaded):
                self._train_state = self._loaded[rank]
            else:
                rank_zero_warn(f"the checkpoint holds RNG states for {len(self._loaded)} ranks, this run has "
                               f"{trainer.world_size}; ranks without a saved state continue from the seed")
            self._loaded = None
        if self._train_state is not None:
            restore_rng_state(self._train_state)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._train_state = capture_rng_state()

    @override
    def state_dict(self) -> dict[str, Any]:
        # note: Lightning builds the checkpoint on every rank and rank 0 writes it, so this gather is collective.
        state = self._train_state if self._train_state is not None else capture_rng_state()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, state)
        else:
            states = [state]
        return {"per_rank": states}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = list(state_dict["per_rank"])
