"""The KL autoencoder in three layouts. Ours (`ldm.nn.autoencoder.AutoencoderKL`) already has the original LDM key
layout (`encoder.down.0.block.0.conv1`, `first_stage_model.*` in a single file); diffusers' `AutoencoderKL` renames
blocks (`encoder.down_blocks.0.resnets.0.conv1`), numbers the decoder's levels from the lowest resolution, and
stores the mid-block attention as linear layers instead of 1x1 convolutions.

diffusers' `scaling_factor` is our latent scale (SD 1/2: 0.18215, SDXL's VAE: 0.13025). The SDXL VAE has SD's KL-f8
architecture; its config differs only in the scale, the sample size and `force_upcast`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldm.convert.common import OneOf, StateDict, UnsupportedCheckpointError, check_config_values, square_size
from ldm.nn.autoencoder import AutoencoderConfig

SD_LATENT_SCALE = 0.18215  # the scale_factor of SD 1.x / 2.x configs (single files do not store it)
SDXL_LATENT_SCALE = 0.13025  # SDXL's (sd_xl_base.yaml)
# Beside the stand-in 0.18215 of an autoencoder exported without a measured scale: ldm's loaders take it for none
# (diffusers, which needs a number, ignores keys starting with "_")
UNMEASURED_SCALE_KEY = "_ldm_scaling_factor_unmeasured"

_DIFFUSERS_FIXED: dict[str, Any] = {"act_fn": "silu", "shift_factor": OneOf((None, 0.0)), "latents_mean": None,
                                    "latents_std": None, "use_quant_conv": True, "use_post_quant_conv": True,
                                    "mid_block_add_attention": True}


def autoencoder_config_from_diffusers(config: Mapping[str, Any]) -> tuple[AutoencoderConfig, float | None]:
    """(our AutoencoderConfig, latent scale) for a diffusers `AutoencoderKL` config (vae/config.json).

    Raises:
        UnsupportedCheckpointError: a VQ autoencoder, a latent shift or per-channel statistics (SD 3, Flux), or
            another field our autoencoder does not implement.
    """
    name = config.get("_class_name", "AutoencoderKL")
    what = f"diffusers autoencoder ({name})"
    if name == "VQModel":
        raise UnsupportedCheckpointError(f"{what}: VQ autoencoders are not supported; only KL autoencoders are")
    if name != "AutoencoderKL":
        raise UnsupportedCheckpointError(f"{what}: only AutoencoderKL is supported")
    check_config_values(config, _DIFFUSERS_FIXED, what)
    widths = list(config.get("block_out_channels", (64,)))
    ch = widths[0]
    if any(w % ch for w in widths):
        raise UnsupportedCheckpointError(f"{what}: block_out_channels={widths} are not multiples of the first")
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(config.get(key, (kind,)))
        if types != [kind] * len(widths):
            raise UnsupportedCheckpointError(f"{what}: {key}={types} is not supported (only {kind} per level)")
    latent = config.get("latent_channels", 4)
    resolution = square_size(config.get("sample_size", 32))
    if resolution is None:
        raise UnsupportedCheckpointError(f"{what}: sample_size={config['sample_size']!r} is not one size or a square "
                                         f"[h, w] (our autoencoder config holds one resolution)")
    ours = AutoencoderConfig(
        in_channels=config.get("in_channels", 3), out_channels=config.get("out_channels", 3),
        resolution=resolution, ch=ch, ch_mult=[w // ch for w in widths],
        num_res_blocks=config.get("layers_per_block", 1), z_channels=latent, embed_dim=latent, double_z=True,
        norm_groups=config.get("norm_num_groups", 32))
    return ours, None if config.get(UNMEASURED_SCALE_KEY) else config.get("scaling_factor", SD_LATENT_SCALE)


def autoencoder_config_to_diffusers(config: AutoencoderConfig, latent_scale: float | None,
                                    force_upcast: bool = False) -> dict[str, Any]:
    """The diffusers `AutoencoderKL` config of ours.

    Args:
        config: our config.
        latent_scale: written as `scaling_factor`; None writes SD's 0.18215 (diffusers needs a value), marked as
            unmeasured for ldm's loaders (`UNMEASURED_SCALE_KEY`).
        force_upcast: diffusers runs the VAE in fp32 under fp16 pipelines (the SDXL VAE overflows in fp16).
    """
    what = "export of the autoencoder to diffusers"
    if config.ch_mult[0] != 1:
        raise UnsupportedCheckpointError(f"{what}: ch_mult[0]={config.ch_mult[0]} (not 1): diffusers' conv_in is the "
                                         f"first level's width, this encoder's is ch; use ch * ch_mult[0] as ch and "
                                         f"the multipliers divided by ch_mult[0]")
    if not config.double_z:
        raise UnsupportedCheckpointError(f"{what}: double_z=false (no log-variance) has no diffusers counterpart")
    if config.embed_dim != config.z_channels:
        raise UnsupportedCheckpointError(f"{what}: embed_dim={config.embed_dim} differs from z_channels="
                                         f"{config.z_channels}; diffusers' AutoencoderKL ties them")
    widths = [config.ch * m for m in config.ch_mult]
    return {
        "_class_name": "AutoencoderKL", "in_channels": config.in_channels, "out_channels": config.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths), "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "block_out_channels": widths, "layers_per_block": config.num_res_blocks, "act_fn": "silu",
        "latent_channels": config.z_channels, "norm_num_groups": config.norm_groups, "sample_size": config.resolution,
        "scaling_factor": SD_LATENT_SCALE if latent_scale is None else latent_scale, "force_upcast": force_upcast,
        **({UNMEASURED_SCALE_KEY: True} if latent_scale is None else {}),
    }


def autoencoder_config_from_original(state: Mapping[str, torch.Tensor],
                                     what: str = "single-file autoencoder") -> AutoencoderConfig:
    """Read an AutoencoderConfig off the tensor shapes of an original-layout state dict (prefix removed).

    The training resolution is not in the weights: 256, the original configs' value, is used.

    Raises:
        UnsupportedCheckpointError: a VQ autoencoder (`quantize.embedding`) or missing encoder weights.
    """
    if any(k.startswith("quantize.") for k in state):
        raise UnsupportedCheckpointError(f"{what}: a VQ autoencoder (quantize.embedding) is not supported; only KL "
                                         f"autoencoders are")
    if "encoder.conv_in.weight" not in state or "decoder.conv_in.weight" not in state:
        raise UnsupportedCheckpointError(f"{what}: no encoder.conv_in / decoder.conv_in weights: not an LDM "
                                         f"autoencoder")
    if any(k.startswith("encoder.down_blocks.") for k in state):
        raise UnsupportedCheckpointError(f"{what}: a VAE in diffusers' layout (encoder.down_blocks.*) without its "
                                         f"config: give the diffusers vae/ folder (config.json beside "
                                         f"diffusion_pytorch_model.safetensors) instead of the file")
    if "quant_conv.weight" not in state or "post_quant_conv.weight" not in state:
        raise UnsupportedCheckpointError(f"{what}: no quant_conv / post_quant_conv weights (an SD3 / Flux-style VAE, "
                                         f"diffusers' use_quant_conv=False) is not supported; SD 1.x / 2.x / SDXL "
                                         f"VAEs are")
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.down.")})
    widths = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    z_channels = state["decoder.conv_in.weight"].shape[1]
    moments = state["encoder.conv_out.weight"].shape[0]
    return AutoencoderConfig(
        in_channels=state["encoder.conv_in.weight"].shape[1], out_channels=state["decoder.conv_out.weight"].shape[0],
        resolution=256, ch=ch, ch_mult=[w // ch for w in widths], num_res_blocks=num_res_blocks,
        z_channels=z_channels, embed_dim=state["post_quant_conv.weight"].shape[1], double_z=moments == 2 * z_channels)


_RES = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {"norm_out": "conv_norm_out"}


def autoencoder_keys_diffusers(keys: list[str], config: AutoencoderConfig) -> dict[str, str]:
    """Our (= original) autoencoder key -> diffusers AutoencoderKL key, for every key in `keys`."""
    levels = len(config.ch_mult)
    out = {}
    for key in keys:
        parts = key.split(".")
        m = re.match(r"^(encoder|decoder)\.(down|up)\.(\d+)\.(block|downsample|upsample)\.(.*)$", key)
        if m:
            side, _, level, kind, rest = m.groups()
            index = int(level) if side == "encoder" else levels - 1 - int(level)
            base = f"{side}.{'down_blocks' if side == 'encoder' else 'up_blocks'}.{index}"
            if kind == "block":
                j, _, tail = rest.partition(".")
                name, _, param = tail.partition(".")
                out[key] = f"{base}.resnets.{j}.{_RES.get(name, name)}.{param}"
            else:
                out[key] = f"{base}.{kind}rs.0.{rest}"
            continue
        m = re.match(r"^(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.*)$", key)
        if m:
            side, block, tail = m.groups()
            name, _, param = tail.partition(".")
            if block == "attn_1":
                out[key] = f"{side}.mid_block.attentions.0.{_ATTN[name]}.{param}"
            else:
                out[key] = f"{side}.mid_block.resnets.{int(block[-1]) - 1}.{_RES.get(name, name)}.{param}"
            continue
        if parts[0] in ("encoder", "decoder"):
            out[key] = ".".join([parts[0], _TOP.get(parts[1], parts[1]), *parts[2:]])
        else:
            out[key] = key  # quant_conv, post_quant_conv
    return out


def is_mid_attention_projection(key: str) -> bool:
    """Whether a key (either layout) is a mid-block attention q/k/v/out weight: a 1x1 conv in ours, linear in
    diffusers."""
    return bool(re.search(r"mid(\.attn_1\.(q|k|v|proj_out)|_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0))\.weight$",
                          key))


def to_linear(key: str, value: torch.Tensor) -> torch.Tensor:
    """(C, C, 1, 1) conv weight -> (C, C) linear weight for diffusers' attention projections."""
    return value[:, :, 0, 0] if is_mid_attention_projection(key) and value.ndim == 4 else value


def to_conv(key: str, value: torch.Tensor) -> torch.Tensor:
    """(C, C) linear weight -> (C, C, 1, 1) conv weight for ours."""
    return value[:, :, None, None] if is_mid_attention_projection(key) and value.ndim == 2 else value


# Entries of a stand-alone LDM autoencoder training checkpoint that are not the network: the loss (LPIPS,
# discriminator, learned log-variance) and EMA bookkeeping.
TRAINING_ONLY_PREFIXES = ("loss.", "model_ema.")


def split_autoencoder_state(state: StateDict) -> StateDict:
    """The autoencoder's tensors of a single file: under `first_stage_model.` (a whole SD file) or, for a
    stand-alone VAE file (e.g. vae-ft-mse-840000-ema-pruned), the whole file less its training-only entries."""
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}


def _our_shapes(config: AutoencoderConfig) -> dict[str, torch.Size]:
    from ldm.convert.common import meta_state_shapes
    from ldm.nn.autoencoder import AutoencoderKL

    return meta_state_shapes(lambda: AutoencoderKL(config))


def autoencoder_to_diffusers(state: StateDict, config: AutoencoderConfig) -> StateDict:
    """Our autoencoder state dict -> diffusers AutoencoderKL state dict (attention projections made linear)."""
    from ldm.convert.common import rename

    shapes = _our_shapes(config)
    rename(state, {k: k for k in shapes}, "autoencoder export", expected_shapes=shapes)
    return rename(state, autoencoder_keys_diffusers(list(shapes), config), "autoencoder export to diffusers",
                  reshape=to_linear)


# The mid-block attention's names before diffusers 0.17, still in folders saved by older diffusers (SD 1.x's and the
# sd-vae-ft-* vae/ folders); diffusers renames them on load.
_OLD_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTN_KEY = re.compile(r"^((?:en|de)coder\.mid_block\.attentions\.0)\.(query|key|value|proj_attn)\.(weight|bias)$")


def autoencoder_from_diffusers(state: StateDict, config: AutoencoderConfig) -> StateDict:
    """diffusers AutoencoderKL state dict (either attention naming) -> ours, checked key by key and shape by shape."""
    from ldm.convert.common import invert, rename

    state = {(f"{m[1]}.{_OLD_ATTN[m[2]]}.{m[3]}" if (m := _OLD_ATTN_KEY.match(k)) else k): v for k, v in state.items()}
    shapes = _our_shapes(config)
    return rename(state, invert(autoencoder_keys_diffusers(list(shapes), config)), "autoencoder from diffusers",
                  expected_shapes=shapes, reshape=to_conv)


def autoencoder_from_original(state: StateDict, config: AutoencoderConfig) -> StateDict:
    """Original LDM autoencoder keys (prefix removed) -> ours: the same names, checked, 1x1 convs restored where a
    file stores the attention projections as linear weights."""
    from ldm.convert.common import rename

    shapes = _our_shapes(config)
    return rename(state, {k: k for k in shapes}, "autoencoder from a single file", expected_shapes=shapes,
                  reshape=to_conv)
