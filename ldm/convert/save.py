"""Export: our UNet, autoencoder, schedule and (optionally) CLIP text encoder as a diffusers Stable Diffusion pipeline
folder or as one original-layout `.safetensors` file.

Both are written atomically: the folder is built in a temporary directory beside its destination and renamed into
place; the file goes through `ldm.io.atomic_open`. An existing destination is refused unless `overwrite=True`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import numbers
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ldm.convert import autoencoder as ae
from ldm.convert import text
from ldm.convert import unet as un
from ldm.convert.common import METADATA_KEY, StateDict, UnsupportedCheckpointError
from ldm.convert.load import DIFFUSERS_WEIGHTS
from ldm.convert.schedule import check_schedule_and_prediction, schedule_to_diffusers
from ldm.diffusion.schedule import ScheduleConfig
from ldm.io import atomic_open, remove_stale_temps, umask, with_default_modes
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNet

DIFFUSERS_VERSION = "0.27.0"  # the format version written into configs; any later diffusers reads it

log = logging.getLogger(__name__)


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out_dir` that replaces it when the block ends without error.

    Args:
        out_dir: the destination; a link to a folder is followed (the folder it names is replaced, the link kept).
        overwrite: replace an existing, non-empty destination; otherwise it is refused before anything is written.
    """
    out_dir = Path(os.path.realpath(out_dir))  # os.replace would move a link itself aside, not the folder it names
    if out_dir.is_symlink():
        raise FileExistsError(f"{out_dir} is a link loop (a link that leads back to itself); remove it or choose "
                              f"another output directory")
    if out_dir.exists() and not overwrite and (out_dir.is_file() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists; choose another output directory or pass overwrite=True")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Leftovers of earlier writes to this destination that were killed: the temp folders mkdtemp named below (8
    # random characters, no dots: `.sd.ema.x.tmp` is another destination's), and .old folders once out_dir is back
    # (without it, an .old folder may hold the only copy: killed while swapping).
    ours = re.compile(rf"\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}\.(tmp|old)")
    for stale in out_dir.parent.iterdir():
        if (match := ours.fullmatch(stale.name)) and (match[1] == "tmp" or out_dir.exists()):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    # mkdtemp makes 0700: give the folder the mode mkdir would (readable by others; a group folder's setgid kept)
    os.chmod(tmp, 0o777 & ~umask() | os.stat(tmp).st_mode & stat.S_ISGID)
    try:
        yield tmp
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / "previous")
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _save_safetensors(state: StateDict, path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    remove_stale_temps(path)  # of a write of this file that was killed

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_open(path) as f:
        f.write(save(state, metadata=metadata))


def _write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "_diffusers_version": DIFFUSERS_VERSION}, indent=2))


def check_pooled_layer(unet: UNet, text_encoder: Any | None, clip_layer: str | None) -> None:
    """Refuse a UNet that takes CLIP's pooled vector and reads its penultimate layer: both formats cut the encoder at
    that layer (`export_text_encoder`, a single file of the OpenCLIP layout), which changes the pooled vector."""
    layer = getattr(text_encoder, "layer", "last") if clip_layer is None else clip_layer
    if text_encoder is not None and layer == "penultimate" and unet.config.pooled_dim is not None:
        raise UnsupportedCheckpointError(
            "this UNet reads CLIP's penultimate layer as its context and the whole encoder's pooled vector "
            "(model.conditioner.layer=penultimate with model.unet.pooled_dim): the exports cut the encoder at that "
            "layer, which changes its pooled vector, and no Stable Diffusion format records both; keep the model in "
            "ldm's own format (its run's export/, which ldm-sample and ldm-eval load)")


def export_text_encoder(text_encoder: Any, tokenizer: Any | None = None,
                        clip_layer: str | None = None) -> tuple[Any, Any | None]:
    """(transformers CLIPTextModel whose last_hidden_state is what the UNet was trained on, tokenizer).

    Args:
        text_encoder: a transformers CLIPTextModel, or our `ldm.conditioning.text.CLIPTextEncoder` (its tokenizer,
            layer and prompt length are then used: the tokenizer is a copy whose `model_max_length`, the length
            diffusers pads prompts to, is the encoder's `max_length`).
        tokenizer: the tokenizer (taken from a CLIPTextEncoder when None).
        clip_layer: "last" or "penultimate"; a penultimate-layer model is exported without its last block, so that
            diffusers' last_hidden_state (final LayerNorm included) is the same tensor.
    """
    model = text_encoder
    if hasattr(text_encoder, "transformer") and hasattr(text_encoder, "tokenizer"):  # our CLIPTextEncoder
        model = text_encoder.transformer
        tokenizer = text_encoder.tokenizer if tokenizer is None else tokenizer
        clip_layer = text_encoder.layer if clip_layer is None else clip_layer
        if tokenizer is not None and tokenizer.model_max_length != text_encoder.max_length:
            tokenizer = copy.deepcopy(tokenizer)  # note: the UNet saw max_length tokens; diffusers pads to this
            tokenizer.model_max_length = text_encoder.max_length
    if type(model).__name__ != "CLIPTextModel":
        raise UnsupportedCheckpointError(f"text encoder {type(model).__name__} cannot be exported: only CLIP text "
                                         f"encoders (transformers CLIPTextModel) are portable to Stable Diffusion")
    if (clip_layer or "last") == "last":
        return model, tokenizer
    return text.without_last_block(model), tokenizer


def save_diffusers(out_dir: str | Path, unet: UNet, autoencoder: AutoencoderKL, latent_scale: float | None,
                   schedule: ScheduleConfig, prediction: str, text_encoder: Any | None = None,
                   tokenizer: Any | None = None, clip_layer: str | None = None, overwrite: bool = False,
                   force_upcast: bool = True, image_size: int | None = None) -> Path:
    """Write a folder that `diffusers.StableDiffusionPipeline.from_pretrained(out_dir)` loads.

    unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors), scheduler/scheduler_config.json (a
    DDIMScheduler), model_index.json, and text_encoder/ + tokenizer/ when a CLIP encoder is given (otherwise they
    are null in model_index.json: pass `text_encoder=` and `tokenizer=` to from_pretrained).

    Args:
        out_dir: the destination folder.
        unet, autoencoder: our networks (weights are copied to CPU; the modules are not changed).
        latent_scale: written as the VAE's scaling_factor.
        schedule, prediction: written as the scheduler config.
        text_encoder, tokenizer, clip_layer: see `export_text_encoder`.
        overwrite: replace an existing folder.
        force_upcast: the VAE's force_upcast flag: diffusers decodes in fp32 under fp16 pipelines (its default;
            true unless the VAE is known not to overflow in fp16, as SDXL's does).
        image_size: the pixel size diffusers' pipeline generates by default (the configs' `sample_size`; SD 1.5:
            512); None: the autoencoder's training resolution.

    Returns:
        out_dir as a Path.
    """
    out_dir = Path(out_dir)
    latent_scale = checked_latent_scale(latent_scale)
    image_size = image_size or autoencoder.config.resolution
    vae_config, vae_state = _diffusers_vae(autoencoder, latent_scale, force_upcast, image_size)
    latent_size = image_size // autoencoder.downsample_factor
    unet_config = un.unet_config_to_diffusers(unet.config, latent_size)
    unet_state = un.unet_to_diffusers(unet.state_dict(), unet.config)
    scheduler = schedule_to_diffusers(schedule, prediction)
    check_pooled_layer(unet, text_encoder, clip_layer)
    if text_encoder is not None:
        text_encoder, tokenizer = export_text_encoder(text_encoder, tokenizer, clip_layer)
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"] if text_encoder is not None else [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer is not None else [None, None],
        "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False,
    }
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite, "model_index.json", "a diffusers pipeline folder")
    with atomic_directory(out_dir, overwrite) as tmp:
        _write_json(unet_config, tmp / "unet" / "config.json")
        _save_safetensors(unet_state, tmp / "unet" / DIFFUSERS_WEIGHTS)
        _write_json(vae_config, tmp / "vae" / "config.json")
        _save_safetensors(vae_state, tmp / "vae" / DIFFUSERS_WEIGHTS)
        _write_json(scheduler, tmp / "scheduler" / "scheduler_config.json")
        if text_encoder is not None:
            text_encoder.save_pretrained(tmp / "text_encoder")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        with_default_modes(tmp)
        _write_json(index, tmp / "model_index.json")
    return out_dir


def checked_latent_scale(latent_scale: Any) -> float | None:
    """A latent scale as the float a file records (None: unknown), refused before anything is written when it is no
    positive number; a numpy number or one-element tensor is taken as its value."""
    if latent_scale is None:
        return None
    if isinstance(latent_scale, torch.Tensor) and latent_scale.numel() == 1:
        latent_scale = latent_scale.item()
    if isinstance(latent_scale, bool) or not isinstance(latent_scale, numbers.Real):
        raise TypeError(f"latent_scale must be a number (diffusers' scaling_factor), got {latent_scale!r}"
                        + ("; from load_autoencoder_any's statistics pass stats['scale_factor']"
                           if isinstance(latent_scale, dict) else ""))
    if not (math.isfinite(latent_scale) and latent_scale > 0):
        raise ValueError(f"latent_scale={latent_scale!r} must be a positive number (diffusers' scaling_factor)")
    return float(latent_scale)


def _check_destination(out_dir: Path, overwrite: bool, marker: str, what: str, class_name: str | None = None) -> None:
    """Refuse a file as the destination folder, and an overwrite of a folder that is not `what`: without `marker`, or
    (with `class_name`) whose `marker` JSON names another `_class_name` (every export of ours has a config.json)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file, not a folder: choose another output directory")
    if not (overwrite and out_dir.is_dir() and any(out_dir.iterdir())):
        return
    found = (out_dir / marker).is_file()
    if found and class_name is not None:
        try:
            found = json.loads((out_dir / marker).read_text()).get("_class_name") == class_name
        except (OSError, ValueError, AttributeError):
            found = False
    if not found:
        named = f"no {marker}" if class_name is None else f"no {marker} of class {class_name}"
        raise FileExistsError(f"{out_dir} holds files but {named}: overwrite replaces {what}, not any directory (a "
                              f"run directory or another export, say); choose another output directory")


def _diffusers_vae(autoencoder: AutoencoderKL, latent_scale: float | None, force_upcast: bool,
                   image_size: int) -> tuple[dict[str, Any], StateDict]:
    """diffusers' AutoencoderKL config and state dict of ours."""
    config = ae.autoencoder_config_to_diffusers(dataclasses.replace(autoencoder.config, resolution=image_size),
                                                latent_scale, force_upcast)
    return config, ae.autoencoder_to_diffusers(autoencoder.state_dict(), autoencoder.config)


def save_diffusers_vae(out_dir: str | Path, autoencoder: AutoencoderKL, latent_scale: float | None,
                       overwrite: bool = False, force_upcast: bool = True) -> Path:
    """Write a folder that `diffusers.AutoencoderKL.from_pretrained(out_dir)` loads (config.json +
    diffusion_pytorch_model.safetensors), as a VAE is published on its own (stabilityai/sd-vae-ft-mse), or goes in a
    pipeline folder's vae/ (`StableDiffusionPipeline.from_pretrained(..., vae=AutoencoderKL.from_pretrained(out_dir))`).

    Args:
        out_dir: the destination folder.
        autoencoder: our network (weights copied to CPU; the module is not changed).
        latent_scale: written as `scaling_factor`; None: SD's 0.18215 (diffusers needs a value).
        overwrite: replace an existing folder that holds a VAE (config.json).
        force_upcast: as in `save_diffusers`.
    """
    out_dir = Path(out_dir)
    latent_scale = checked_latent_scale(latent_scale)
    _check_destination(out_dir, overwrite, "config.json", "a diffusers VAE folder", class_name="AutoencoderKL")
    config, state = _diffusers_vae(autoencoder, latent_scale, force_upcast, autoencoder.config.resolution)
    with atomic_directory(out_dir, overwrite) as tmp:
        _write_json(config, tmp / "config.json")
        _save_safetensors(state, tmp / DIFFUSERS_WEIGHTS)
    if latent_scale is None:
        log.warning("%s: no latent scale given (latent_scale=None): the VAE states SD's scaling factor 0.18215, which "
                    "diffusers and other tools take as its scale; ldm's stage 2 takes it for none and needs "
                    "model.latent_scale", out_dir)
    return out_dir


def save_single_file_vae(path: str | Path, autoencoder: AutoencoderKL, latent_scale: float | None,
                         overwrite: bool = False) -> Path:
    """Write a stand-alone VAE in the original layout (`encoder.*`, `decoder.*`, `quant_conv.*`,
    `post_quant_conv.*`), as vae-ft-mse-840000-ema-pruned.safetensors: A1111 and ComfyUI load it as a VAE beside any
    SD model, diffusers with `AutoencoderKL.from_single_file`. The metadata entry "ldm" holds the exact config and
    latent scale, which `ldm.convert.load_autoencoder_any` reads back (other readers assume SD's 0.18215)."""
    path = Path(os.path.realpath(path))  # through a link, the file it names (the link was replaced)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors only")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    latent_scale = checked_latent_scale(latent_scale)
    state = autoencoder.state_dict()
    ae.autoencoder_from_original(state, autoencoder.config)  # checks every key and shape
    meta = {"autoencoder_config": dataclasses.asdict(autoencoder.config), "latent_scale": latent_scale}
    _save_safetensors(state, path, {METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path


def save_single_file(path: str | Path, unet: UNet, autoencoder: AutoencoderKL, latent_scale: float | None,
                     schedule: ScheduleConfig, prediction: str, text_encoder: Any | None = None,
                     clip_layer: str | None = None, overwrite: bool = False, image_size: int | None = None) -> Path:
    """Write one original-layout `.safetensors` file (`model.diffusion_model.*`, `first_stage_model.*`,
    `cond_stage_model.*`), as SD's own checkpoints, ComfyUI, A1111 and diffusers' `from_single_file` read them.

    A text encoder with exact GELU (OpenCLIP, SD 2) is written as OpenCLIP's `cond_stage_model.model.*`, one with
    quick_gelu (OpenAI CLIP, SD 1) as `cond_stage_model.transformer.text_model.*`. The safetensors metadata entry
    "ldm" holds the exact configs, schedule, prediction and latent scale, so `load_single_file` restores them.

    Args:
        path: the file; must end in .safetensors.
        unet, autoencoder, latent_scale, schedule, prediction, text_encoder, clip_layer: as in `save_diffusers`.
        overwrite: replace an existing file.
        image_size: the pixel size to generate at by default, stored as the autoencoder config's resolution (as
            `save_diffusers` stores it in the VAE's sample_size); None: the autoencoder's training resolution.
    """
    path = Path(os.path.realpath(path))  # through a link, the file it names (the link was replaced)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: single files are written as .safetensors only")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    latent_scale = checked_latent_scale(latent_scale)
    check_schedule_and_prediction(schedule, prediction)
    check_pooled_layer(unet, text_encoder, clip_layer)
    state = {f"model.diffusion_model.{k}": v for k, v in un.unet_to_original(unet.state_dict(), unet.config).items()}
    ae_state = autoencoder.state_dict()
    ae.autoencoder_from_original(ae_state, autoencoder.config)  # checks every key and shape
    state.update({f"first_stage_model.{k}": v for k, v in ae_state.items()})
    meta: dict[str, Any] = {"unet_config": dataclasses.asdict(unet.config),
                            "autoencoder_config": dataclasses.asdict(dataclasses.replace(
                                autoencoder.config, resolution=image_size or autoencoder.config.resolution)),
                            "latent_scale": latent_scale, "schedule": dataclasses.asdict(schedule),
                            "prediction": prediction}
    if text_encoder is not None:
        model, _ = export_text_encoder(text_encoder, None, "last")
        clip_layer = getattr(text_encoder, "layer", "last") if clip_layer is None else clip_layer
        if clip_layer == "penultimate" and model.config.hidden_act == "gelu":
            model = text.without_last_block(model)  # OpenCLIP (SD 2): its readers take the penultimate layer so
        elif clip_layer == "penultimate":  # SD 1 layout: readers build the whole CLIP and take "CLIP skip" from the
            meta["clip_layer"] = clip_layer  # user, so the file keeps every block (load_single_file cuts the last)
        flat = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()
                if not k.endswith("position_ids")}
        if model.config.hidden_act == "gelu":
            state.update({f"{text.OPENCLIP_PREFIX}{k}": v for k, v in text.flat_to_openclip(flat).items()})
        else:
            state.update({f"{text.SD1_PREFIX}{k}": v for k, v in text.flat_to_sd1(flat).items()})
        meta["text_encoder_config"] = {k: v for k, v in model.config.to_dict().items()
                                       if k in _CLIP_CONFIG_FIELDS}
        if getattr(text_encoder, "max_length", None) is not None:  # our CLIPTextEncoder: the prompts' length
            meta["max_length"] = text_encoder.max_length
    _save_safetensors(state, path, {METADATA_KEY: json.dumps(meta), "format": "pt"})
    return path


_CLIP_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                       "num_attention_heads", "max_position_embeddings", "hidden_act", "layer_norm_eps",
                       "attention_dropout", "initializer_range", "initializer_factor", "pad_token_id", "bos_token_id",
                       "eos_token_id")

