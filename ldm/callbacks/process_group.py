"""End torch.distributed's process group when fit ends, in every process that ran it.

torch asks for `destroy_process_group()` before a process exits: a gloo group left to the destructors at exit aborts
the process now and then ("terminate called without an active exception", SIGABRT; 4 of 120 two-process runs that
exit at different times, none of 80 with the group destroyed). Under `trainer.strategy=ddp_spawn` the ranks are
processes Lightning spawned, which exit right after fit without destroying the group they made, and the launcher
reports a finished run (or the NaN guard's halt) as "process 1 terminated with signal SIGABRT". Lightning skips the
teardown hooks when fit raises: `ldm.cli.train.train` ends the group of its own process then.
"""

from __future__ import annotations

import lightning as L
import torch
from typing_extensions import override


def end_process_group() -> None:
    """Destroy torch.distributed's default process group if one is up."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class EndProcessGroup(L.Callback):
    """`end_process_group()` at fit's end (the teardown hooks run after the last collective: the export's)."""

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        end_process_group()
