"""Optimizer helpers shared by the LightningModules."""

from __future__ import annotations

import math
import weakref
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from transformers import get_scheduler, get_wsd_schedule

from ldm.config import ConfigError, check_choice, check_min, check_positive

LR_SCHEDULES = ("constant", "cosine", "linear", "wsd")
FUSED_DEVICES = ("cpu", "cuda")


def check_optimizer_config(config: Any) -> None:
    """Raise ConfigError naming the key when a module config's optimizer settings are out of range: `lr` (and an
    autoencoder's `disc_lr`, `grad_clip`) > 0, `weight_decay`, `warmup_steps` and `lr_decay_steps` >= 0, two `betas`
    in [0, 1), a known `lr_schedule`, `ema_decay` in (0, 1) or null."""
    check_choice("lr_schedule", config.lr_schedule, LR_SCHEDULES)
    check_positive(lr=config.lr, disc_lr=getattr(config, "disc_lr", None))
    clip = getattr(config, "grad_clip", None)
    if clip is not None and not 0 < clip < math.inf:
        finite = "a finite number " if clip == math.inf else ""
        raise ConfigError(f"grad_clip={clip} must be {finite}> 0, or null for no clipping")
    check_min(0, weight_decay=getattr(config, "weight_decay", 0.0), warmup_steps=config.warmup_steps,
              lr_decay_steps=config.lr_decay_steps)
    if len(config.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in config.betas):
        raise ConfigError(f"betas={config.betas} must hold two values in [0, 1)")
    decay = getattr(config, "ema_decay", None)
    if decay is not None and not 0.0 < decay < 1.0:
        raise ConfigError(f"ema_decay={decay} must lie in (0, 1) or be null")


def stepped(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer's step just taken had gradients to apply: False after a step the NaN guard skipped (it
    drops every gradient), whose EMA update must be skipped too."""
    return any(p.grad is not None for group in optimizer.param_groups for p in group["params"])


def fusable(params: list[torch.Tensor], precision: str = "32-true") -> bool:
    """Whether torch's fused Adam / AdamW kernel (one pass over every tensor instead of a Python loop of small ops)
    can step `params`: floating point, on the CPU or a CUDA device, and not under fp16 mixed precision (`precision`,
    the trainer's), where a fused step unscales the gradients itself, after `clip_gradients` would have clipped them
    still scaled. On the quickstart's CPU UNet it takes the optimizer step from 11.9 to 5.2 ms."""
    fp16_scaled = precision in ("16-mixed", "16")
    return not fp16_scaled and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)


def adam(kind: type[torch.optim.Optimizer], params: list[Any], precision: str, **kwargs: Any) -> torch.optim.Optimizer:
    """`kind` (torch's Adam or AdamW) over `params` (tensors, or param groups) as the modules build it: with the fused
    kernel where `fusable` allows it, and with the state a checkpoint restores laid out as each parameter is.

    torch's `load_state_dict` keeps the strides the state was saved with, and the fused kernel reads parameter,
    gradient and moments element for element: a run resumed with `channels_last` switched on or off (NHWC weights,
    NCHW moments, or the other way) stepped every conv weight with another element's moments (1.6e-3 off after one
    step at lr 1e-3). The moments are copied into their parameter's layout after loading."""
    tensors = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    optimizer = kind(params, fused=fusable(tensors, precision), **kwargs)
    optimizer.register_load_state_dict_post_hook(_state_laid_out_as_parameters)
    return optimizer


def _state_laid_out_as_parameters(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # p's strides, value's values


def gradient_norm(trainer: L.Trainer, optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The total 2-norm of the gradients of `optimizer`'s parameters (None when none has a gradient), computed once per
    optimizer step: the NaN guard checks it for non-finite values and logs it, `clip_gradients` scales by it. Under
    FSDP each rank holds a shard of every gradient, so the squared norms of the shards are summed over the ranks (a
    collective: every rank calls this at the same points; modules that train over several FSDP processes shard every
    trainable parameter, `fsdp_shards`).

    A second call returns the first's result while the gradients are the same tensors and until the optimizer steps
    (a post-step hook drops it), so gradients changed in place between the two calls, by a callback between the NaN
    guard and clipping, would be clipped by the norm from before the change."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    sharded = isinstance(trainer.strategy, FSDPStrategy) and trainer.world_size > 1
    if not grads and not sharded:
        return None
    refs, norm = _GRADIENT_NORMS.get(optimizer, ((), None))
    if norm is not None and len(refs) == len(grads) and all(ref() is g for ref, g in zip(refs, grads)):
        return norm
    norm = torch.nn.utils.get_total_norm(grads)  # 0 for no gradients
    if sharded:
        squares = norm.pow(2).to(trainer.strategy.root_device)  # of this rank's shards (cpu_offload: on the CPU)
        torch.distributed.all_reduce(squares)
        norm = squares.sqrt()
    if optimizer not in _HOOKED:  # note: once per optimizer (the hook empties _GRADIENT_NORMS every step)
        optimizer.register_step_post_hook(lambda opt, args, kwargs: _GRADIENT_NORMS.pop(opt, None))
        _HOOKED.add(optimizer)
    _GRADIENT_NORMS[optimizer] = ([weakref.ref(g) for g in grads], norm)
    return norm


# optimizer -> (weak references to its gradients, their total norm): from the first `gradient_norm` of a step to it
_GRADIENT_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# the optimizers whose step drops their entry there (a hook a step, registered anew each step, cost 6 ms a step at
# step 20,000 and grew without end)
_HOOKED: weakref.WeakSet = weakref.WeakSet()


def clip_gradients(module: L.LightningModule, optimizer: torch.optim.Optimizer, clip_val: float,
                   algorithm: str | None = "norm") -> None:
    """Clip the gradients of `optimizer`'s parameters, in every strategy and precision: `norm` scales them to a total
    norm of at most `clip_val` (the default; the norm is `gradient_norm`'s, over all FSDP shards, and not computed
    again after the NaN guard), `value` clamps each element to [-clip_val, clip_val]. Call it where Lightning has
    unscaled fp16 gradients: `configure_gradient_clipping` (automatic optimization) or `on_before_optimizer_step`
    (manual).

    note: instead of `LightningModule.clip_gradients`, whose mixed-precision plugin refuses fused optimizers even in
    bf16 (which has no scaler) and whose FSDP plugin refuses norm clipping.
    """
    check_positive(gradient_clip_val=clip_val)  # a negative bound would turn every step into ascent
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(params, clip_val)
        return
    norm = gradient_norm(module.trainer, optimizer)
    if norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip_val, norm)


def check_decay_steps(schedule: str, decay_steps: int | None) -> None:
    """Refuse lr_decay_steps with a schedule other than wsd, which ignores it. Where a run trains (`lr_scheduler`;
    ldm-train at start): a recorded config, a checkpoint's, loads as it was."""
    if decay_steps and schedule != "wsd":
        raise ConfigError(f"model.lr_decay_steps={decay_steps} applies to lr_schedule=wsd (the decay over the last "
                          f"steps); set model.lr_schedule=wsd, or leave model.lr_decay_steps out for "
                          f"lr_schedule={schedule}")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: float,
                 decay_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' schedules: linear warmup from 0 over `warmup_steps` optimizer steps, then `schedule`: constant,
    a cosine or linear decay to 0 at `total_steps` (the trainer's `estimated_stepping_batches`), or wsd
    (warmup-stable-decay: constant, then a linear decay to 0 over the last `decay_steps`)."""
    check_decay_steps(schedule, decay_steps)
    if schedule == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    if not math.isfinite(total_steps):
        raise ConfigError(f"model.lr_schedule={schedule} decays to 0 at the last step, which is unknown here: set "
                          f"trainer.max_steps, or model.lr_schedule=constant")
    if warmup_steps >= total_steps:
        steps = (f"model.warmup_steps={warmup_steps} outlasts the {int(total_steps)} steps this run trains "
                 f"(trainer.max_steps or max_epochs, or a debug preset's limit)")
        if schedule == "wsd":
            raise ConfigError(f"{steps}: lr_schedule=wsd has no step left to decay over; lower model.warmup_steps, or "
                              f"set model.lr_schedule=constant")
        rank_zero_warn(f"{steps}: lr_schedule={schedule} never leaves its warmup, the rate never reaches model.lr")
    if schedule == "wsd":
        if not 0 < decay_steps <= total_steps - warmup_steps:
            raise ConfigError(f"model.lr_decay_steps={decay_steps}: lr_schedule=wsd decays the LR over the last "
                              f"lr_decay_steps steps; set it between 1 and {int(total_steps) - warmup_steps} (the "
                              f"steps after warmup of the {int(total_steps)} this run trains: trainer.max_steps or "
                              f"max_epochs, or a debug preset's limit)")
        return get_wsd_schedule(optimizer, num_warmup_steps=warmup_steps, num_decay_steps=decay_steps,
                                num_training_steps=int(total_steps), decay_type="linear")
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=int(total_steps))
