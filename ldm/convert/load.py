"""Import: a diffusers pipeline folder, a diffusers unet/ or vae/ folder, or an original single file becomes our
configs and state dicts (`SDComponents`), checked tensor by tensor before anything is returned.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoints import CheckpointError, checkpoint_kind, load_checkpoint, pickle_refusal
from ldm.config import ConfigError, pasteable
from ldm.convert import autoencoder as ae
from ldm.convert import unet as un
from ldm.convert.common import (
    SINGLE_FILE_SUFFIXES,
    StateDict,
    UnsupportedCheckpointError,
    read_json,
    read_state_dict,
    square_size,
)
from ldm.convert.components import SDComponents, load_tokenizer  # noqa: F401 - re-exported
from ldm.convert.schedule import schedule_from_diffusers
from ldm.convert.single_file import load_single_file, read_single_file_autoencoder
from ldm.io import CONFIG_NAME, PIPELINE_FORMAT, export_dir, export_kind, read_json_object
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.nn.unet import UNetConfig
from ldm.seeding import keeps_global_rng

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

log = logging.getLogger(__name__)


def detect_layout(path: str | Path, key: str = "path") -> str:
    """"pipeline" (model_index.json), "diffusers_unet", "diffusers_vae", "single_file", or "ours" (an export of
    `AutoencoderKL.save_pretrained` or a run directory holding one); `key` names the config key in errors.

    Raises:
        FileNotFoundError / ConfigError: the path does not exist or is none of these.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{key}={path} does not exist")
    if path.is_file():
        if path.suffix in SINGLE_FILE_SUFFIXES:
            return "single_file"
        raise ConfigError(f"{key}={path}: a single file must end in one of {SINGLE_FILE_SUFFIXES}")
    if (path / "model_index.json").is_file():
        return "pipeline"
    config_file = path / "config.json"
    if config_file.is_file():
        name = read_json_object(config_file, key).get("_class_name")
        if name == "UNet2DConditionModel" or name == "UNet2DModel":
            return "diffusers_unet"
        if name in ("AutoencoderKL", "VQModel") or (name and name.startswith("Autoencoder")):
            return "diffusers_vae"
        if name is None:
            return "ours"
    if (path / "export" / "config.json").is_file():
        return "ours"
    raise ConfigError(f"{key}={path} is neither a diffusers pipeline folder (model_index.json), a diffusers unet/ or "
                      f"vae/ folder (config.json with _class_name), an export of ours, nor a single file")


def _diffusers_weights(directory: Path) -> StateDict:
    """The state dict of a diffusers model folder: safetensors (whole or sharded), else a .bin read safely."""
    single = directory / DIFFUSERS_WEIGHTS
    if single.is_file():
        return read_state_dict(single)[0]
    index = directory / f"{DIFFUSERS_WEIGHTS}.index.json"
    if index.is_file():
        weight_map = read_json(index, "a sharded model").get("weight_map")
        if not isinstance(weight_map, dict):
            raise UnsupportedCheckpointError(f"{index} has no weight_map object: the index is damaged")
        shards = sorted(set(weight_map.values()))
        return {k: v for shard in shards for k, v in read_state_dict(directory / shard)[0].items()}
    fp16 = directory / "diffusion_pytorch_model.fp16.safetensors"
    if fp16.is_file():
        return read_state_dict(fp16)[0]
    legacy = directory / "diffusion_pytorch_model.bin"
    if legacy.is_file():
        return read_state_dict(legacy)[0]
    raise FileNotFoundError(f"{directory} has no {DIFFUSERS_WEIGHTS} (nor a sharded or .bin variant)")


def load_unet_diffusers(directory: str | Path) -> tuple[UNetConfig, StateDict]:
    """Our UNetConfig and state dict from a diffusers unet/ folder."""
    directory = Path(directory)
    config = un.unet_config_from_diffusers(read_json(directory / "config.json", "a diffusers UNet"))
    return config, un.unet_from_diffusers(_diffusers_weights(directory), config)


def load_autoencoder_diffusers(directory: str | Path) -> tuple[AutoencoderConfig, StateDict, float | None]:
    """Our AutoencoderConfig, state dict and latent scale from a diffusers vae/ folder."""
    directory = Path(directory)
    config, scale = ae.autoencoder_config_from_diffusers(read_json(directory / "config.json", "a diffusers VAE"))
    return config, ae.autoencoder_from_diffusers(_diffusers_weights(directory), config), scale


def _pipeline_size(directory: Path, config: AutoencoderConfig) -> AutoencoderConfig:
    """The autoencoder `config` at the size a pipeline folder generates at: diffusers takes the UNet's sample_size
    times the VAE's factor (SD 2-base: vae/ says 768, unet/ 64, so 512 px); the VAE's own sample_size is its training
    tile, not the pipeline's size."""
    unet_size = square_size(read_json(directory / "unet" / "config.json", "the UNet").get("sample_size"))
    if unet_size is None:
        return config
    return dataclasses.replace(config, resolution=unet_size * 2 ** (len(config.ch_mult) - 1))


def load_pipeline(directory: str | Path, tokenizer_path: str | Path | None = None,
                  tokenizer_key: str = "tokenizer_path") -> SDComponents:
    """All parts of a diffusers Stable Diffusion pipeline folder (model_index.json, unet/, vae/, scheduler/,
    text_encoder/, tokenizer/). Parts the folder lacks (or lists as null) stay None.

    Args:
        directory: the pipeline folder.
        tokenizer_path: a tokenizer directory to use instead of the folder's tokenizer/.
        tokenizer_key: the config key that named `tokenizer_path`, for errors.
    """
    from transformers import CLIPTextModel

    directory = Path(directory)
    index = read_json(directory / "model_index.json", "a diffusers pipeline")
    if index.get("_class_name", "StableDiffusionPipeline") not in ("StableDiffusionPipeline", "DiffusionPipeline"):
        raise UnsupportedCheckpointError(f"{directory}: pipeline {index['_class_name']!r} is not supported; only "
                                         f"StableDiffusionPipeline folders (SD 1.x / 2.x) are")
    parts = SDComponents(source=f"diffusers pipeline {directory}")

    def present(name: str) -> bool:
        entry = index.get(name)
        if entry is not None and not isinstance(entry, list):
            raise UnsupportedCheckpointError(f"{directory}/model_index.json: {name}={entry!r} is not a [library, "
                                             f"class] pair: the file is damaged")
        listed = bool(entry and entry[0] is not None)
        if listed and not (directory / name).is_dir():
            parts.lost.append(name)
        return listed and (directory / name).is_dir()

    if present("unet"):
        parts.unet_config, parts.unet_state = load_unet_diffusers(directory / "unet")
    if present("vae"):
        parts.autoencoder_config, parts.autoencoder_state, parts.latent_scale = load_autoencoder_diffusers(
            directory / "vae")
        if parts.unet_config is not None:
            parts.autoencoder_config = _pipeline_size(directory, parts.autoencoder_config)
    if present("scheduler"):
        parts.schedule, parts.prediction = schedule_from_diffusers(
            read_json(directory / "scheduler" / "scheduler_config.json", "the scheduler"))
        if parts.schedule.timestep_spacing == "leading" and parts.schedule.steps_offset != 1:
            # StableDiffusionPipeline rewrites it so on load (an outdated config to diffusers): the same timesteps
            log.warning("%s/scheduler: steps_offset=%d read as 1, as diffusers' StableDiffusionPipeline reads it "
                        "(with leading spacing it shifts every sampled timestep)", directory,
                        parts.schedule.steps_offset)
            parts.schedule = dataclasses.replace(parts.schedule, steps_offset=1)
    if present("text_encoder"):
        kind = index["text_encoder"][1]
        if kind != "CLIPTextModel":
            raise UnsupportedCheckpointError(f"{directory}: text encoder {kind!r} is not supported (CLIPTextModel)")
        folder = directory / "text_encoder"
        # note: a folder saved as its fp16 variant alone (`save_pretrained(variant="fp16")`, the hub's fp16
        # branches) holds model.fp16.safetensors, which transformers reads only when asked for the variant.
        variant = "fp16" if not any(folder.glob("model.safetensors*")) and not any(folder.glob("pytorch_model.bin*")) \
            and any(folder.glob("*.fp16.*")) else None
        try:
            parts.text_encoder = CLIPTextModel.from_pretrained(str(folder), local_files_only=True, variant=variant,
                                                               dtype=torch.float32).eval()
        except pickle.UnpicklingError as err:
            raise UnsupportedCheckpointError(f"{folder}: its weights' {pickle_refusal(err)}") from None
        except Exception as err:  # noqa: BLE001 -- transformers' errors for missing, damaged or mismatched files
            raise UnsupportedCheckpointError(f"{folder}: cannot load the CLIP text encoder ({type(err).__name__}: "
                                             f"{str(err).splitlines()[0] if str(err) else ''}); its config.json and "
                                             f"weights must be a transformers CLIPTextModel's") from None
    if tokenizer_path is not None:
        parts.tokenizer = load_tokenizer(tokenizer_path, tokenizer_key)
    elif present("tokenizer"):
        parts.tokenizer = load_tokenizer(directory / "tokenizer", f"{directory}/tokenizer")
    if parts.tokenizer is not None and parts.text_encoder is not None:  # diffusers pads prompts to model_max_length
        if parts.tokenizer.model_max_length < parts.text_encoder.config.max_position_embeddings:
            parts.max_length = parts.tokenizer.model_max_length
    return parts


def load_components(path: str | Path, tokenizer_path: str | Path | None = None,
                    prediction: str | None = None, use_ema: bool = False, key: str = "path",
                    tokenizer_key: str = "tokenizer_path") -> SDComponents:
    """Everything a Stable Diffusion checkpoint holds, in our layout, from any of its forms.

    Args:
        path: a diffusers pipeline folder, a diffusers unet/ or vae/ folder, or an original single file.
        tokenizer_path: a CLIP tokenizer directory (required to get a tokenizer from a single file; overrides a
            pipeline's tokenizer/).
        prediction: for single files, what the UNet predicts (needed for SD 2.x files that do not record it; see
            `load_single_file`).
        use_ema: for single files, take the UNet's `model_ema.*` weights (see `load_single_file`).
        key: the config key that named `path`, for errors.
        tokenizer_key: the config key that named `tokenizer_path`, for errors.
    """
    path = Path(path).expanduser()
    layout = detect_layout(path, key)
    ours = _our_checkpoint_kind(path) if layout == "single_file" else None
    if layout == "ours" or ours is not None:
        config = read_json_object(export_dir(path, key) / CONFIG_NAME, key) if layout == "ours" else {}
        what = export_kind(config) if config else f"a checkpoint of ldm-train's {ours.replace('_', ' ')} model"
        source = pasteable({"ckpt_path": str(path)})
        # a UNet without cross-attention (unconditional, or class labels in the UNet) has no diffusers layout
        unet = config.get("unet") if isinstance(config.get("unet"), dict) else {}
        single = f"ldm-export {source} format=single_file output_dir=DIR, then {key}=DIR/model.safetensors"
        route = single if "context_dim" in unet and unet["context_dim"] is None else \
            f"ldm-export {source} format=diffusers output_dir=DIR, then {key}=DIR" + \
            ("" if config else f" (a UNet without cross-attention: {single})")
        export = (f"; to start from this latent diffusion model's UNet and autoencoder (and CLIP text encoder: "
                  f"diffusers' layout holds no byte encoder or class embeddings), write it in a layout {key} reads "
                  f"first: {route}" if config.get("format") == PIPELINE_FORMAT or ours == "latent_diffusion" else "")
        raise ConfigError(f"{key}={path} is {what}, not a Stable Diffusion checkpoint (a diffusers pipeline "
                          f"folder, a diffusers unet/ or vae/ folder, or a single file){export}")
    with _naming(key, path):
        if layout == "pipeline":
            return load_pipeline(path, tokenizer_path, tokenizer_key)
        if layout == "single_file":
            return load_single_file(path, tokenizer_path, prediction, use_ema, tokenizer_key)
        if layout == "diffusers_unet":
            config, state = load_unet_diffusers(path)
            return SDComponents(unet_config=config, unet_state=state, source=f"diffusers UNet {path}")
        config, state, scale = load_autoencoder_diffusers(path)  # layout "diffusers_vae"
        return SDComponents(autoencoder_config=config, autoencoder_state=state, latent_scale=scale,
                            source=f"diffusers VAE {path}")


@contextmanager
def _naming(key: str, path: Path) -> Iterator[None]:
    """Prefix the converters' errors (a missing tensor, an unsupported option) with the config key and path that
    named the checkpoint, so a run with both model.init_from and model.autoencoder_path says which one is bad."""
    try:
        yield
    except UnsupportedCheckpointError as err:
        raise UnsupportedCheckpointError(f"{key}={path}: {err}") from None


@keeps_global_rng
def load_autoencoder_any(path: str | Path, key: str = "model.autoencoder_path",
                         ) -> tuple[AutoencoderKL, dict[str, Any] | None, str]:
    """(autoencoder, frozen as `load_autoencoder` gives it; latent statistics or None; source) from any form of a KL
    autoencoder: our export or checkpoint, a diffusers vae/ folder, a diffusers pipeline folder (its vae/), or a
    single file (a whole SD model's first_stage_model, or a stand-alone VAE such as vae-ft-mse-840000-ema-pruned).

    The statistics are stage 1's own (`latent_stats.json` or the checkpoint's) for ours, and {"scale_factor": s} for
    a Stable Diffusion VAE whose scale is known: diffusers' scaling_factor, the file's metadata, or SD's 0.18215 for a
    whole SD file (SDXL's 0.13025 for an SDXL file, whose VAE is supported though its UNet is not); None for a
    stand-alone VAE file and an export without statistics.

    Args:
        path: the autoencoder, in any of these forms.
        key: the config key that named it, for errors.
    """
    from ldm.checkpoints import MissingCheckpointError
    from ldm.nn.autoencoder import load_autoencoder

    path = Path(path).expanduser()
    if not path.exists():
        raise MissingCheckpointError(f"{key}={path} does not exist; point it at stage 1's export (<vae run>/export) or "
                                     f"checkpoint, a diffusers vae/ or pipeline folder, or a Stable Diffusion single "
                                     f"file")
    if path.is_file() and (path.parent / "config.json").is_file() and detect_layout(path.parent, key) == "ours":
        path = path.parent  # the weights file of our export: the folder holds its config and latent statistics
    if path.is_dir():
        export_dir(path, key)  # a run directory without an export (stopped, unfinished): named as such
    layout = detect_layout(path, key)
    if layout == "ours" or (layout == "single_file" and _our_checkpoint_kind(path) is not None):
        model, stats = load_autoencoder(path, key)
        return model, stats, f"{'export' if layout == 'ours' else 'checkpoint'} {path}"
    if layout == "pipeline":
        if not (path / "vae").is_dir():
            raise ConfigError(f"{key}={path}: the pipeline folder has no vae/")
        with _naming(key, path):
            config, state, scale = load_autoencoder_diffusers(path / "vae")
            unet = read_json(path / "model_index.json", "a diffusers pipeline").get("unet")
            if isinstance(unet, list) and unet and unet[0] is not None and (path / "unet").is_dir():
                config = _pipeline_size(path, config)  # the size model.init_from of this folder gives
        source = f"diffusers pipeline {path}/vae"
    elif layout == "diffusers_vae":
        with _naming(key, path):
            config, state, scale = load_autoencoder_diffusers(path)
        source = f"diffusers VAE {path}"
    elif layout == "single_file":
        with _naming(key, path):
            autoencoder = read_single_file_autoencoder(path)
        if autoencoder is None:
            raise ConfigError(f"{key}={path} holds no autoencoder (no first_stage_model.* or encoder.* weights)")
        (config, state, scale), source = autoencoder, f"single file {path}"
    else:
        raise ConfigError(f"{key}={path} holds a UNet, not an autoencoder")
    if scale is None and layout != "single_file":  # the diffusers folder of an export without statistics
        source += " (exported without a measured latent scale: its scaling_factor 0.18215 is a stand-in)"
    model = AutoencoderKL(config)
    model.load_state_dict(state)
    return model.eval().requires_grad_(False), ({"scale_factor": scale} if scale else None), source


def _our_checkpoint_kind(path: Path) -> str | None:
    """"autoencoder" or "latent_diffusion" for a .ckpt that ldm-train wrote, None for any other file."""
    if path.suffix != ".ckpt":
        return None
    try:
        return checkpoint_kind(load_checkpoint(path))
    except CheckpointError:  # refused by the safe loader, or not ours: read_state_dict reports it
        return None
