"""On resume, the optimizer settings of the config, not the checkpoint's: learning rate, betas, weight decay.

Lightning restores each optimizer's state on resume, its param groups' hyperparameters included, and each LR
scheduler's `base_lrs`: a run resumed with `model.lr=1e-5` (to lower the rate for the rest of a run, say) kept
training at the saved rate while its log and config.yaml said 1e-5. This callback records what the modules' freshly
built optimizers hold (`on_fit_start`, before the restore), and when the restored state differs (`on_train_start`,
after it) puts the configured values back, and sets each rate to the schedule at its restored position (`lr =
base_lr x lr_lambda(step)`, the schedule rebuilt from this run's `trainer.max_steps`), and says which changed. A resume
with the same config changes nothing, so exact resume holds.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

SETTINGS = ("initial_lr", "betas", "weight_decay")  # initial_lr: the base rate schedulers scale (lr when none)


class OptimizerSettings(L.Callback):
    """Apply the configured optimizer hyperparameters over those of a resumed checkpoint (see the module docstring)."""

    def __init__(self) -> None:
        self.configured: list[list[dict[str, Any]]] = []  # per optimizer, per param group: SETTINGS as built

    @staticmethod
    def _settings(group: dict[str, Any]) -> dict[str, Any]:
        values = {k: group[k] for k in SETTINGS if k in group}
        values.setdefault("initial_lr", group["lr"])
        return values

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.configured = [[self._settings(g) for g in opt.param_groups] for opt in trainer.optimizers]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        changed = []
        for index, (optimizer, configured) in enumerate(zip(trainer.optimizers, self.configured)):
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
            for i, (group, wanted) in enumerate(zip(optimizer.param_groups, configured)):
                restored = self._settings(group)
                diff = {k: (restored.get(k), v) for k, v in wanted.items() if restored.get(k) != v}
                changed += [f"optimizer {index} group {i} {k}: {old} -> {new}" for k, (old, new) in diff.items()]
                for key in ("betas", "weight_decay"):
                    if key in diff:
                        group[key] = wanted[key]
                if "initial_lr" in diff:
                    group["initial_lr"] = group["lr"] = wanted["initial_lr"]
                    for scheduler in schedulers:
                        scheduler.base_lrs[i] = wanted["initial_lr"]
                # The rate at the schedule's restored position. The schedule is rebuilt from this run's
                # trainer.max_steps: a resume into a longer run continues on the new curve from its first step.
                for scheduler in schedulers:
                    lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR
                    if lambdas is None:
                        continue
                    lr = scheduler.base_lrs[i] * lambdas[i](scheduler.last_epoch)
                    if lr != group["lr"] and "initial_lr" not in diff:
                        changed.append(f"optimizer {index} group {i} lr at step {scheduler.last_epoch}: "
                                       f"{group['lr']:.6g} -> {lr:.6g} (the schedule changed: its length, set by "
                                       f"trainer.max_steps, or max_epochs with the batches per step, or "
                                       f"model.lr_schedule, warmup_steps or lr_decay_steps)")
                    group["lr"] = lr
        if changed:
            rank_zero_warn(f"resumed with other optimizer settings than the checkpoint's; the config's apply from "
                           f"step {trainer.global_step}: {'; '.join(changed)}")
