"""A small trainable text encoder over UTF-8 bytes: no vocabulary, no download (the LDM paper trains its text-to-image
transformer encoder from scratch, sec. 4.3.1; bytes as tokens follow ByT5, Xue et al. 2022).

A prompt becomes [BOS] + its UTF-8 bytes + [EOS], truncated to `max_length` and padded with PAD; padding is masked
out of the self-attention. The empty prompt is [BOS, EOS, PAD, ...], a valid input like any other.

The encoder is either trained with the UNet from scratch, or pretrained first on image-caption pairs
(`ldm.modules.contrastive`, a small CLIP) and loaded from its export with `from_pretrained`, frozen or fine-tuned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.conditioning.frozen import FrozenMixin
from ldm.config import SCHEMAS, ConfigError, check_min
from ldm.io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_export_destination,
    export_config,
    export_dir,
    is_export,
    load_export_weights,
    read_export,
    run_target,
    save_export,
)
from ldm.nn.attention import TransformerBlock
from ldm.seeding import keeps_global_rng

PAD, BOS, EOS = 256, 257, 258  # ids after the 256 byte values
VOCAB_SIZE = 259
# The run whose export holds a byte encoder, and the other runs' kinds, told by their config.yaml's model._target_.
CONTRASTIVE_TARGET = SCHEMAS["model/contrastive"]
RUN_KINDS = {SCHEMAS["model/autoencoder"]: "an autoencoder (stage 1)",
             SCHEMAS["model/ldm"]: "a latent diffusion (stage 2)"}


def bytes_read(prompt: str, max_length: int) -> bytes:
    """The UTF-8 bytes of `prompt` that an encoder of `max_length` tokens reads (BOS and EOS take two; a lone
    surrogate reads as `?`)."""
    return prompt.encode("utf-8", errors="replace")[: max_length - 2]


def byte_tokenize(prompts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, max_length) and the mask of real tokens (B, max_length), True for BOS, bytes and EOS.

    Prompts longer than max_length - 2 bytes are cut, possibly inside a multi-byte character; the encoder sees
    the bytes, so a cut character is only a partial token, never an error.
    """
    ids = torch.full((len(prompts), max_length), PAD, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        data = bytes_read(prompt, max_length)
        ids[i, : len(data) + 2] = torch.tensor([BOS, *data, EOS], dtype=torch.long)
    return ids, ids != PAD


@dataclass
class ByteEncoderConfig:
    """The architecture of a `ByteTextEncoder`; written to config.json by `save_pretrained`."""

    width: int = 512          # token width, the UNet's context_dim
    num_layers: int = 4       # transformer blocks
    num_heads: int = 8        # attention heads; width must divide by it
    max_length: int = 77      # tokens per prompt, including BOS and EOS
    dropout: float = 0.0      # dropout inside the blocks

    def __post_init__(self) -> None:
        check_min(1, width=self.width, num_layers=self.num_layers, num_heads=self.num_heads)
        if self.width % self.num_heads:
            raise ConfigError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} must leave room for BOS and EOS (>= 2)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={self.dropout} must lie in [0, 1)")


class ByteTextEncoder(FrozenMixin, nn.Module):
    """Byte embeddings + learned positions, pre-LN transformer blocks (SDPA), a final LayerNorm: the context
    (B, L, width) and, pooled over the prompt's real tokens (BOS to EOS), a prompt vector (B, width).

    Args:
        width, num_layers, num_heads, max_length, dropout: see `ByteEncoderConfig`.
        trainable: false freezes the encoder (no gradients, eval mode, run under no_grad): a pretrained one.
    """

    def __init__(self, width: int = 512, num_layers: int = 4, num_heads: int = 8, max_length: int = 77,
                 dropout: float = 0.0, trainable: bool = True):
        super().__init__()
        self.config = ByteEncoderConfig(width, num_layers, num_heads, max_length, dropout)  # checks the values
        self.trainable = trainable
        self.context_dim = self.pooled_dim = width
        self.max_length = max_length
        self.token_embed = nn.Embedding(VOCAB_SIZE, width)
        self.pos_embed = nn.Parameter(torch.zeros(max_length, width))
        self.blocks = nn.ModuleList(TransformerBlock(width, num_heads, width // num_heads, dropout=dropout)
                                    for _ in range(num_layers))
        self.norm = nn.LayerNorm(width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)
        self.freeze()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return byte_tokenize(prompts, self.max_length)[0]                      # (B, L)

    def cut(self, prompt: str) -> str:
        """The part of `prompt` beyond `max_length - 2` UTF-8 bytes, which the encoder never sees ("" when it
        fits; a character cut in two shows as U+FFFD)."""
        return prompt.encode("utf-8", errors="replace")[self.max_length - 2:].decode("utf-8", errors="replace")

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of prompts to the context (B, max_length, width) and the pooled vector (B, width)."""
        device = self.pos_embed.device
        ids, mask = byte_tokenize(prompts, self.max_length)
        encode = self.__dict__.get("_compiled_encode_tokens", self.encode_tokens)
        return encode(ids.to(device), mask.to(device))

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """torch.compile what follows the tokenizer (`encode_tokens`): compiled whole, the encoder recompiled for
        every batch of new prompts (their strings are constants to the compiler). As nn.Module's own, it is not
        copied into pickles or deep copies (an EMA copy would call the original's compiled method)."""
        self._compiled_encode_tokens = torch.compile(self.encode_tokens, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_compiled_encode_tokens", None)
        return state

    def encode_tokens(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The context (B, L, width) and pooled vector (B, width) of byte ids (B, L) and their mask (B, L)."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            h = self.token_embed(ids) + self.pos_embed                          # (B, L, D)
            for block in self.blocks:
                h = block(h, mask=mask)                                         # (B, L, D)
            h = self.norm(h)                                                    # (B, L, D)
            return h, masked_mean(h, mask)                                      # (B, L, D), (B, D)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json and model.safetensors into `directory` (created if missing), atomically; a folder that
        holds a model of another kind is refused (`ldm.io.check_export_destination`)."""
        check_export_destination(directory, asdict(self.config))
        return save_export(directory, asdict(self.config), self)

    @classmethod
    @keeps_global_rng
    def from_pretrained(cls, path: str | Path, trainable: bool = False, expected: ByteEncoderConfig | None = None,
                        config_key: str = "model.conditioner.name_or_path") -> ByteTextEncoder:
        """Load an encoder written by `save_pretrained`: its directory, or a run directory whose `export/` holds one.

        Args:
            trainable: fine-tune it; frozen by default.
            expected: the architecture the config asks for; a difference raises ConfigError naming the key.
            config_key: the config key that set `path`, named in errors.
        """
        pretraining = ("the export of a text-image pretraining run (ldm-train experiment=quickstart_clip writes "
                       "<run>/export when it finishes)")
        target = run_target(Path(path))
        if target not in (None, CONTRASTIVE_TARGET):  # its export, or the advice to finish it, would not do either
            kind = RUN_KINDS.get(target, f"a {target}")
            raise ConfigError(f"{config_key}={path} is {kind} run, not a text-image pretraining run: point it at "
                              f"{pretraining}")
        path = export_dir(path, config_key, reads_checkpoints=False)
        if not is_export(path):
            kind_key = config_key.rsplit(".", 1)[0] + ".kind"
            present = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if (path / name).is_file()]
            if path.is_file() and is_export(path.parent):  # (export_dir gives a Path)
                other = f"give the folder that holds this file, {path.parent}"
            elif (path / "model_index.json").is_file():
                other = f"it holds a Stable Diffusion pipeline, whose CLIP text encoder {kind_key}=clip reads"
            elif len(present) == 1:
                missing = WEIGHTS_NAME if present == [CONFIG_NAME] else CONFIG_NAME
                other = f"it holds {present[0]} but not {missing}: copy the whole export folder"
            elif path.suffix == ".ckpt" and is_export(export := path.parent.parent / "export"):
                other = f"it is a checkpoint, which this key does not read; give its run's export, {export}"
            else:
                other = ("it is a checkpoint, which this key does not read; " if path.suffix == ".ckpt" else "") + \
                        f"point it at {pretraining}" + \
                        (", or set it to null to train the encoder from scratch" if config_key.startswith("model.")
                         else "")
            raise ConfigError(f"{config_key}={path}: no byte encoder there ({CONFIG_NAME} and {WEIGHTS_NAME}; "
                              f"{kind_key}=byte is the default); {other}")
        config_dict, state = read_export(path, config_key)
        config = export_config(path, config_dict, ByteEncoderConfig, config_key)
        if expected is not None:  # every difference at once (one a run took four starts to find)
            prefix = config_key.rpartition(".")[0]
            keys = [k for k in ("width", "num_layers", "num_heads", "max_length")
                    if getattr(expected, k) != getattr(config, k)]
            if keys:
                ours = " ".join(f"{prefix}.{k}={getattr(expected, k)}" for k in keys)
                has = ", ".join(f"{k}={getattr(config, k)}" for k in keys)
                theirs = " ".join(f"{prefix}.{k}={getattr(config, k)}" for k in keys)
                raise ConfigError(f"{ours} but the byte encoder in {path} has {has}; set {theirs}")
        encoder = cls(**asdict(config), trainable=trainable)
        load_export_weights(encoder, state, path, config_key)
        return encoder


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states h (B, L, D) over the real tokens, mask (B, L) True: (B, D)."""
    weights = mask.to(h.dtype)[..., None]                                       # (B, L, 1)
    return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
