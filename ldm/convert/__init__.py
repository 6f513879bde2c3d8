"""Stable Diffusion weights in and out: conversion between the project's networks and released SD checkpoints.

Three layouts, for the UNet, the KL autoencoder and the CLIP text encoder, with their configs:
  (a) original single files: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*` in a
      `.safetensors` or `.ckpt` (opened with `torch.load(weights_only=True)`: pickled code never runs);
  (b) diffusers folders: unet/, vae/, text_encoder/, tokenizer/, scheduler/scheduler_config.json, model_index.json;
  (c) ours: `ldm.nn.unet.UNet` + `UNetConfig`, `ldm.nn.autoencoder.AutoencoderKL` + `AutoencoderConfig`,
      `ScheduleConfig` + prediction, and a transformers `CLIPTextModel` (what `CLIPTextEncoder` wraps).

Import:
    parts = load_components(path, tokenizer_path=None, prediction=None, use_ema=False)   # -> SDComponents
        path: a diffusers pipeline folder, a diffusers unet/ or vae/ folder, or a single file. parts.unet_config,
        parts.unet_state, parts.autoencoder_config, parts.autoencoder_state, parts.latent_scale, parts.schedule,
        parts.prediction, parts.text_encoder, parts.tokenizer, parts.clip_layer, parts.source;
        parts.build_unet() and parts.build_autoencoder() give loaded networks.
    model, latent_stats, source = load_autoencoder_any(path)
        also accepts our own exports and checkpoints (their latent statistics); for SD: {"scale_factor": s}.

Export:
    save_diffusers(out_dir, unet, autoencoder, latent_scale, schedule, prediction, text_encoder=None,
                   tokenizer=None, clip_layer=None, overwrite=False, force_upcast=True, image_size=None)
    save_single_file(path, unet, autoencoder, latent_scale, schedule, prediction, text_encoder=None,
                     clip_layer=None, overwrite=False, image_size=None)
    save_diffusers_vae(out_dir, autoencoder, latent_scale, overwrite=False, force_upcast=True)  # diffusers' class
    save_single_file_vae(path, autoencoder, latent_scale, overwrite=False)     # a stand-alone VAE file

Lower level, one network at a time: `unet_config_from_diffusers` / `unet_config_to_diffusers`,
`unet_from_diffusers` / `unet_to_diffusers`, `unet_from_original` / `unet_to_original`, `unet_config_from_original`,
and the same for the autoencoder; `schedule_from_diffusers` / `schedule_to_diffusers`.

Supported: SD 1.x and 2.x UNets (conv or linear projections, a head count or a head width, any context width,
`resnet_time_scale_shift`, class labels or a projected pooled vector as diffusers' class embedding), KL autoencoders
including SDXL's VAE (diffusers `scaling_factor` <-> our latent scale), CLIP (SD 1) and OpenCLIP (SD 2) text
encoders. Unsupported, with an `UnsupportedCheckpointError` (a `ConfigError`) naming it, never a half-loaded model:
inpainting / image-conditioned UNets, SDXL (added embeddings, per-level transformer depths), VQ autoencoders,
ControlNet, and any key left over or missing after the mapping.

Offline: a single file has no tokenizer; pass `tokenizer_path` (a directory with vocab.json and merges.txt, such as
the tokenizer/ folder of a diffusers SD pipeline; SD 2 needs SD 2's tokenizer, which pads with "!").
"""

from ldm.convert.autoencoder import (
    autoencoder_config_from_diffusers,
    autoencoder_config_from_original,
    autoencoder_config_to_diffusers,
    autoencoder_from_diffusers,
    autoencoder_from_original,
    autoencoder_to_diffusers,
)
from ldm.convert.common import UnsupportedCheckpointError, read_state_dict
from ldm.convert.components import SDComponents, load_tokenizer
from ldm.convert.load import detect_layout, load_autoencoder_any, load_components
from ldm.convert.save import (
    export_text_encoder,
    save_diffusers,
    save_diffusers_vae,
    save_single_file,
    save_single_file_vae,
)
from ldm.convert.schedule import schedule_from_diffusers, schedule_to_diffusers
from ldm.convert.single_file import load_single_file
from ldm.convert.unet import (
    unet_config_from_diffusers,
    unet_config_from_original,
    unet_config_to_diffusers,
    unet_from_diffusers,
    unet_from_original,
    unet_to_diffusers,
    unet_to_original,
)

__all__ = [
    "SDComponents", "UnsupportedCheckpointError", "autoencoder_config_from_diffusers",
    "autoencoder_config_from_original", "autoencoder_config_to_diffusers", "autoencoder_from_diffusers",
    "autoencoder_from_original", "autoencoder_to_diffusers", "detect_layout", "export_text_encoder",
    "load_autoencoder_any", "load_components", "load_single_file", "load_tokenizer", "read_state_dict",
    "save_diffusers", "save_diffusers_vae", "save_single_file", "save_single_file_vae", "schedule_from_diffusers",
    "schedule_to_diffusers",
    "unet_config_from_diffusers", "unet_config_from_original", "unet_config_to_diffusers", "unet_from_diffusers",
    "unet_from_original", "unet_to_diffusers", "unet_to_original",
]
