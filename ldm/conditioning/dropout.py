"""Condition dropout for classifier-free guidance (Ho & Salimans 2022): during training a fraction `cond_drop_prob`
of prompts become the empty prompt and of labels the null class, so one network learns both the conditional and the
unconditional model.

The draws come from a passed generator (the trainer's `ldm.seeding.step_generator`), so which samples are dropped
depends on the seed, rank and step only. One uniform number is drawn per sample whatever the probability, so runs
that differ only in `cond_drop_prob` consume the generator identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def drop_mask(batch_size: int, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean (B,) mask on the CPU, True where the condition is dropped.

    Args:
        batch_size: B.
        p: probability of dropping each condition, in [0, 1].
        generator: the source of randomness (on any device); None uses torch's global generator.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"cond_drop_prob={p} must lie in [0, 1]")
    device = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(batch_size, generator=generator, device=device)              # (B,)
    return (u < p).cpu()


def drop_prompts(prompts: Sequence[str], mask: torch.Tensor) -> list[str]:
    """Replace the masked prompts by the empty prompt."""
    return ["" if drop else prompt for prompt, drop in zip(prompts, mask.tolist(), strict=True)]


def drop_labels(labels: torch.Tensor, mask: torch.Tensor, null_class: int) -> torch.Tensor:
    """Replace the masked labels by `null_class`."""
    return torch.where(mask.to(labels.device), torch.full_like(labels, null_class), labels)
