"""Original-layout single files (SD 1.x / 2.x `.safetensors` or `.ckpt`): the architecture from the tensor shapes,
the schedule, prediction and latent scale from metadata, a `.yaml` beside the file, its buffers or SD's defaults.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ldm.config import ConfigError
from ldm.convert import autoencoder as ae
from ldm.convert import text
from ldm.convert import unet as un
from ldm.convert.common import StateDict, UnsupportedCheckpointError, read_state_dict, strip_prefix
from ldm.convert.components import SDComponents, load_tokenizer
from ldm.convert.schedule import SD_SCHEDULE, schedule_from_betas
from ldm.diffusion.schedule import ScheduleConfig
from ldm.nn.autoencoder import AutoencoderConfig
from ldm.nn.unet import UNetConfig

log = logging.getLogger(__name__)

# Top-level buffers of LDM's LatentDiffusion (the DDPM schedule and its loss weights): derived from the betas.
_SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                     "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                     "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                     "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "lvlb_weights", "scale_factor"}


def _sidecar_yaml(path: Path) -> dict[str, Any]:
    """The original LDM inference config beside a single file (`model.yaml` for `model.safetensors`, as A1111 reads
    it): its `model.params` (parameterization, scale_factor, linear_start, linear_end, timesteps), or {}."""
    yaml_file = path.with_suffix(".yaml")
    if not yaml_file.is_file():
        return {}
    from omegaconf import OmegaConf  # safe YAML loading, no code

    try:
        config = OmegaConf.to_container(OmegaConf.load(yaml_file), resolve=True)
    except Exception as err:  # noqa: BLE001 -- YAML syntax, python tags (refused, never run), OmegaConf's own
        raise UnsupportedCheckpointError(f"{yaml_file} (the LDM config beside the file) is not plain YAML "
                                         f"({type(err).__name__}); fix or remove it") from None
    model = config.get("model") if isinstance(config, dict) else None
    params = model.get("params") if isinstance(model, dict) else None
    if not isinstance(config, dict) or model is not None and not isinstance(model, dict) or \
            params is not None and not isinstance(params, dict):
        raise UnsupportedCheckpointError(f"{yaml_file} (the LDM config beside the file) has no model.params mapping; "
                                         f"fix or remove it")
    return dict(params or {})


def load_single_file(path: str | Path, tokenizer_path: str | Path | None = None,
                     prediction: str | None = None, use_ema: bool = False,
                     tokenizer_key: str = "tokenizer_path") -> SDComponents:
    """All parts of an original-layout single file (SD 1.x / 2.x `.safetensors` or `.ckpt`).

    The architecture comes from the tensor shapes; the schedule, prediction and latent scale from, in order, our own
    metadata (files written by `save_single_file`), an LDM config `<file>.yaml` beside it, the file's `betas` and
    `scale_factor` buffers, and finally SD's defaults. The UNet's training weights are used, as diffusers does,
    unless `use_ema` asks for the `model_ema.*` copy that LDM training checkpoints (e.g. v1-5-pruned.ckpt) keep.

    Args:
        path: the file; `.ckpt` is opened with weights_only=True (no pickled code runs).
        tokenizer_path: a CLIP tokenizer directory; a single file holds none. Without it `tokenizer` is None.
        prediction: eps | v | x0, what the UNet predicts whatever the file says; needed for SD 2.x files that carry
            neither metadata nor a `.yaml` (768-px SD 2 models predict v, 512-px "base" models eps), whose
            `prediction` is None without it.
        use_ema: take the UNet's EMA weights (`model_ema.*`); an error when the file has none.
        tokenizer_key: the config key that named `tokenizer_path`, for errors.

    Raises:
        UnsupportedCheckpointError: SDXL, ControlNet, inpainting, VQ, or keys no part accounts for.
    """
    path = Path(path)
    state, meta = read_state_dict(path)
    what = f"single file {path}"
    if any(k.startswith("conditioner.embedders.") for k in state):
        raise UnsupportedCheckpointError(f"{what}: an SDXL checkpoint (conditioner.embedders.*) is not supported; "
                                         f"SD 1.x and 2.x are")
    if any(k.startswith("control_model.") for k in state):
        raise UnsupportedCheckpointError(f"{what}: a ControlNet checkpoint (control_model.*) is not supported")
    known = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")
    # note: model_ema.* alone does not make a whole model: released stand-alone VAEs keep model_ema.decay / num_updates
    whole = any(k.startswith(known[:3]) for k in state)
    if whole:
        unknown = sorted(k for k in state if not k.startswith(known) and k not in _SCHEDULE_BUFFERS)
        if unknown:
            raise UnsupportedCheckpointError(f"{what}: keys outside model.diffusion_model / first_stage_model / "
                                             f"cond_stage_model: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    parts = SDComponents(source=f"single file {path}")
    yaml_params = _sidecar_yaml(path)

    unet_state = un.split_unet_state(state)
    if use_ema:
        unet_state = _ema_weights(state, unet_state, what)
    if unet_state:
        config = UNetConfig(**meta["unet_config"]) if "unet_config" in meta else un.unet_config_from_original(
            unet_state, what)
        parts.unet_config, parts.unet_state = config, un.unet_from_original(unet_state, config)

    autoencoder = _autoencoder_of_file(state, meta, yaml_params, what, prediction)
    if autoencoder is not None:
        parts.autoencoder_config, parts.autoencoder_state, parts.latent_scale = autoencoder

    if tokenizer_path is not None:
        parts.tokenizer = load_tokenizer(tokenizer_path, tokenizer_key)
    layout = text.text_layout(state)
    if layout is not None:
        parts.text_encoder = _text_encoder_from_file(state, layout, meta, parts.tokenizer)
        parts.max_length = meta.get("max_length")  # written by save_single_file for shorter prompts than 77
    if parts.unet_config is not None:
        parts.schedule, parts.prediction = _schedule_of_file(state, meta, yaml_params, parts.unet_config,
                                                             prediction, what)
    return parts


def read_single_file_autoencoder(path: str | Path) -> tuple[AutoencoderConfig, StateDict, float | None] | None:
    """(config, our state dict, latent scale) of the autoencoder in a single file, or None when it has none. An SDXL
    file's VAE is read too (only SDXL's UNet is unsupported), with SDXL's scale."""
    path = Path(path)
    state, meta = read_state_dict(path)
    return _autoencoder_of_file(state, meta, _sidecar_yaml(path), f"single file {path}")


def _autoencoder_of_file(state: StateDict, meta: dict[str, Any], yaml_params: dict[str, Any], what: str,
                         prediction: str | None = None) -> tuple[AutoencoderConfig, StateDict, float | None] | None:
    """(config, our state dict, latent scale) of a single file's autoencoder, or None when it has none.

    A whole model keeps it under `first_stage_model.`; a stand-alone VAE file is nothing else. The scale: our
    metadata, the `.yaml`, a `scale_factor` buffer, SDXL's 0.13025 in an SDXL file, SD's 0.18215 in any other whole
    model, and None for a stand-alone VAE (its file does not say which model it was trained for). The resolution of
    a whole model: the weights do not say it; SD's (diffusers' single-file default) is 512 px, 768 px for SD 2.x
    models (context 1024) that predict v (`prediction`, else the file's metadata or `.yaml`; a file that says nothing
    gets 512), 1024 px for SDXL: the size the pipeline generates at, whichever key reads the file (`model.init_from`,
    `model.autoencoder_path`, ldm-encode).
    """
    whole = any(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.",
                              "conditioner.embedders.")) for k in state)
    if whole and not any(k.startswith("first_stage_model.") for k in state):
        return None
    if not whole:
        _refuse_parts_taken_for_models(state, what)
    ae_state = ae.split_autoencoder_state(state)
    config = (AutoencoderConfig(**meta["autoencoder_config"]) if "autoencoder_config" in meta
              else ae.autoencoder_config_from_original(ae_state, what))
    scale = meta.get("latent_scale", yaml_params.get("scale_factor"))
    if scale is None and "scale_factor" in state:
        scale = float(state["scale_factor"])
    sdxl = any(k.startswith("conditioner.embedders.") for k in state)
    if scale is None and whole:
        scale = ae.SDXL_LATENT_SCALE if sdxl else ae.SD_LATENT_SCALE
    context = next((v.shape[1] for k, v in state.items()
                    if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)
    if whole and "autoencoder_config" not in meta and (context is not None or sdxl):
        prediction = prediction or meta.get("prediction") or yaml_params.get("parameterization")
        size = 1024 if sdxl else 768 if context == 1024 and prediction == "v" else 512
        config = dataclasses.replace(config, resolution=size)
    return config, ae.autoencoder_from_original(ae_state, config), scale


def _refuse_parts_taken_for_models(state: StateDict, what: str) -> None:
    """Name the files a stand-alone VAE's place is mistaken with: a LoRA, a diffusers UNet's or a text encoder's
    weights (which would otherwise be refused as "not an LDM autoencoder")."""
    if any("lora" in k.lower() for k in state):
        raise UnsupportedCheckpointError(f"{what}: a LoRA (low-rank adapter weights), not a model, is not supported; "
                                         f"merge it into the model first (diffusers: load_lora_weights, fuse_lora, "
                                         f"save_pretrained) and give the merged pipeline folder")
    if any(k.startswith(("down_blocks.", "time_embedding.")) for k in state):
        raise UnsupportedCheckpointError(f"{what}: a UNet's weights in diffusers' layout (down_blocks.*) without its "
                                         f"config: give the pipeline folder (the one holding model_index.json)")
    # CLIP as transformers saves it (flat since 5.6: no text_model. level) or as OpenCLIP does
    if any(k.startswith(("text_model.", "embeddings.token_embedding.", "transformer.resblocks.")) for k in state):
        raise UnsupportedCheckpointError(f"{what}: a text encoder's weights alone: give the pipeline folder (the one "
                                         f"holding model_index.json), or the text encoder's folder as "
                                         f"model.conditioner.name_or_path")


def _ema_weights(state: StateDict, unet_state: StateDict, what: str) -> StateDict:
    """The UNet's EMA copy: LDM's LitEma stores `model.diffusion_model.a.b` as `model_ema.diffusion_modelab`."""
    ema = {k: state.get("model_ema." + f"diffusion_model.{k}".replace(".", "")) for k in unet_state}
    missing = [k for k, v in ema.items() if v is None]
    if missing:
        raise ConfigError(f"{what}: use_ema asks for EMA weights but the file has none for {len(missing)} of "
                          f"{len(ema)} UNet tensors (e.g. {missing[0]}); load it with use_ema=False "
                          f"(model.init_ema=false)")
    return ema


def _text_encoder_from_file(state: StateDict, layout: str, meta: dict[str, Any], tokenizer: Any | None) -> Any:
    """A transformers CLIPTextModel built from a single file's SD 1 or OpenCLIP (SD 2) text encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config_fields = meta.get("text_encoder_config")
    if layout == "sd1":
        flat = text.sd1_to_flat(strip_prefix(state, text.SD1_PREFIX))
        hidden_act = "quick_gelu"
    else:
        layers = None if config_fields is None else config_fields["num_hidden_layers"]
        flat, _ = text.openclip_to_flat(strip_prefix(state, text.OPENCLIP_PREFIX), layers)
        hidden_act = "gelu"
    if config_fields is None:
        config_fields = text.clip_config_from_state(flat, hidden_act, tokenizer)
    model = CLIPTextModel(CLIPTextConfig(**config_fields)).eval()
    text.load_state_into(model, flat, f"text encoder ({layout} layout)")
    if meta.get("clip_layer") == "penultimate":  # a whole SD 1 encoder of a UNet trained on its penultimate layer
        model = text.without_last_block(model)
    return model


def _schedule_of_file(state: StateDict, meta: dict[str, Any], yaml_params: dict[str, Any], unet: UNetConfig,
                      prediction: str | None, what: str) -> tuple[ScheduleConfig, str]:
    if "schedule" in meta:
        schedule = ScheduleConfig(**meta["schedule"])
    elif "linear_start" in yaml_params:
        schedule = dataclasses.replace(SD_SCHEDULE, beta_start=yaml_params["linear_start"],
                                       beta_end=yaml_params.get("linear_end", SD_SCHEDULE.beta_end),
                                       num_train_timesteps=yaml_params.get("timesteps", 1000))
    elif "betas" in state:
        schedule = schedule_from_betas(state["betas"])
    else:
        schedule = SD_SCHEDULE
    recorded, where = meta.get("prediction"), "its metadata"
    if recorded is None and yaml_params:
        recorded, where = {"eps": "eps", "v": "v", "x0": "x0"}.get(yaml_params.get("parameterization", "eps")), \
            "the .yaml beside it"
    if prediction is not None and recorded not in (None, prediction):  # (a wrong .yaml, or a UNet to retrain as v)
        log.warning("%s predicts %s by %s; taken as predicting %s, as asked (model.init_prediction, prediction=): "
                    "a UNet trained otherwise starts far from what it is now asked for", what, recorded, where,
                    prediction)
    prediction = prediction or recorded
    if prediction is None and unet.context_dim == 768:
        prediction = "eps"  # every SD 1.x model
    return schedule, prediction  # None: an SD 2.x file that does not say (768-px models predict v, base models eps)
