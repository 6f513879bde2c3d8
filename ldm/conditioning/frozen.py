"""Frozen encoders: no gradients, and eval mode (no dropout) whatever `.train()` their parent receives."""

from __future__ import annotations


class FrozenMixin:
    """For encoders with a `trainable` flag: `freeze()` switches off their gradients when it is false, and they stay
    in eval mode from then on; a trainable one is put in train mode (transformers loads models in eval mode, which
    would fine-tune them without their dropout until some callback calls `.train()`)."""

    trainable: bool

    def freeze(self) -> None:
        if not self.trainable:
            self.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)
