"""What the benchmarks share: an experiment's config as `ldm-train` composes it, and frozen parts with random weights
(speed does not depend on their values), exported where the configs' `*_path` / `name_or_path` keys take them."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ldm import config as configs
from ldm.cli.common import CONF_DIR
from ldm.conditioning import ByteTextEncoder
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL


def experiment(name: str, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """`ldm-train experiment=<name> <overrides>` as ldm-train composes it (no shards needed)."""
    configs.register_schemas()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", "data.train_shards=unused", *overrides])


def random_autoencoder(root: Path, vae_experiment: str, scale_factor: float) -> Path:
    """The export (`root/vae`) of an autoencoder with `vae_experiment`'s network and random weights."""
    net = OmegaConf.to_container(experiment(vae_experiment).model.net, resolve=True)
    torch.manual_seed(0)
    return AutoencoderKL(configs.to_dataclass(AutoencoderConfig, net)).save_pretrained(
        root / "vae", latent_stats={"scale_factor": scale_factor})


def random_byte_text_encoder(root: Path) -> Path:
    """The export (`root/clip`) of a byte-level text encoder shaped as the quickstart's, random weights."""
    text = experiment("quickstart_clip").model.text
    encoder = ByteTextEncoder(text.width, text.num_layers, text.num_heads, text.max_length)
    return encoder.save_pretrained(root / "clip")
