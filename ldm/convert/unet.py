"""The UNet in three layouts: ours (`ldm.nn.unet.UNet`), diffusers' `UNet2DConditionModel` and the original LDM /
Stable Diffusion `openaimodel.UNetModel` (`model.diffusion_model.*` in a single file).

Key maps are written once, from our module names to theirs, for a given `UNetConfig`; the reverse direction is their
inverse. Configs translate both ways (`unet_config_from_diffusers`, `unet_config_to_diffusers`); a single file has no
config, so `unet_config_from_original` reads the architecture off the tensor shapes, as diffusers' single_file_utils
does, with SD's head rule (SD 1: 8 heads at context 768; SD 2: head width 64 at context 1024).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ldm.convert.common import OneOf, StateDict, UnsupportedCheckpointError, check_config_values
from ldm.nn.unet import UNetConfig

# diffusers UNet2DConditionModel fields our UNet has no counterpart for, with the only value we implement.
_DIFFUSERS_FIXED: dict[str, Any] = {
    "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_attention_heads": None, "dual_cross_attention": False, "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": OneOf((None, False)), "cross_attention_norm": None,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
}


def _check_supported_channels(in_channels: int, out_channels: int, what: str) -> None:
    if in_channels == 9:
        raise UnsupportedCheckpointError(f"{what}: an inpainting UNet (9 input channels: latents, mask, masked image) "
                                         f"is not supported")
    if in_channels != out_channels:
        raise UnsupportedCheckpointError(f"{what}: {in_channels} input channels but {out_channels} output channels "
                                         f"(an image-conditioned UNet, e.g. the x4 upscaler) is not supported")


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Our UNetConfig for a diffusers `UNet2DConditionModel` config (unet/config.json).

    Args:
        config: the diffusers config as a dict.

    Raises:
        UnsupportedCheckpointError: SDXL's added embeddings, inpainting, per-level depths or widths we cannot
            express, or any other field our UNet does not implement.
    """
    what = f"diffusers UNet ({config.get('_class_name', 'UNet2DConditionModel')})"
    if config.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise UnsupportedCheckpointError(f"{what}: only UNet2DConditionModel is supported")
    if config.get("addition_embed_type") is not None:
        raise UnsupportedCheckpointError(f"{what}: addition_embed_type={config['addition_embed_type']!r} (SDXL's "
                                         f"added text and time embeddings) is not supported; SD 1.x and 2.x UNets are")
    in_channels, out_channels = config.get("in_channels", 4), config.get("out_channels", 4)
    _check_supported_channels(in_channels, out_channels, what)
    check_config_values(config, _DIFFUSERS_FIXED, what)

    widths = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    levels = len(widths)
    model_channels = widths[0]
    if any(w % model_channels for w in widths):
        raise UnsupportedCheckpointError(f"{what}: block_out_channels={widths} are not multiples of the first")
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if len(down) != levels or len(up) != levels:
        raise UnsupportedCheckpointError(f"{what}: {len(down)} down and {len(up)} up block types for {levels} "
                                         f"levels (block_out_channels={widths})")
    attention_levels = []
    for level, kind in enumerate(down):
        if kind not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise UnsupportedCheckpointError(f"{what}: down block type {kind!r} is not supported")
        if up[levels - 1 - level] != kind.replace("Down", "Up"):
            raise UnsupportedCheckpointError(f"{what}: up_block_types={up} do not mirror down_block_types={down}")
        if kind == "CrossAttnDownBlock2D":
            attention_levels.append(level)

    layers = _one_value(config.get("layers_per_block", 2), "layers_per_block", what)
    depth = _one_value(config.get("transformer_layers_per_block", 1), "transformer_layers_per_block", what)
    context_dim = _one_value(config.get("cross_attention_dim", 1280), "cross_attention_dim", what)
    heads = config.get("attention_head_dim", 8)  # note: diffusers' historical name; SD configs give heads here
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * levels
    num_heads, head_dim = _heads_from_counts(widths, heads, attention_levels, what)

    num_classes = pooled_dim = None
    class_type = config.get("class_embed_type")
    if class_type is None and config.get("num_class_embeds") is not None:
        num_classes = config["num_class_embeds"] - 1  # our last class is the null class of guidance
    elif class_type == "projection":
        pooled_dim = config.get("projection_class_embeddings_input_dim")
    elif class_type is not None:
        raise UnsupportedCheckpointError(f"{what}: class_embed_type={class_type!r} is not supported (only None with "
                                         f"num_class_embeds, or 'projection')")
    return UNetConfig(
        in_channels=in_channels, out_channels=None, model_channels=model_channels,
        channel_mult=[w // model_channels for w in widths], num_res_blocks=layers, attention_levels=attention_levels,
        mid_attention=True, transformer_depth=depth, num_heads=num_heads, head_dim=head_dim, context_dim=context_dim,
        use_linear_proj=bool(config.get("use_linear_projection", False)),
        use_scale_shift_norm=_time_shift(config.get("resnet_time_scale_shift", "default"), what),
        num_classes=num_classes, pooled_dim=pooled_dim, norm_groups=config.get("norm_num_groups", 32),
        dropout=config.get("dropout", 0.0), upcast_attention=bool(config.get("upcast_attention", False)))


def unet_config_to_diffusers(config: UNetConfig, sample_size: int = 64) -> dict[str, Any]:
    """The diffusers `UNet2DConditionModel` config of our UNetConfig.

    Args:
        config: our config.
        sample_size: the latent size diffusers' pipelines default to (image size / 8; SD 1.5: 64).

    Raises:
        UnsupportedCheckpointError: self-attention only (no context), no middle transformer, class labels together
            with a pooled vector, or an inpainting-style channel count.
    """
    what = "export of the UNet to diffusers"
    _check_supported_channels(config.in_channels, config.output_channels, what)
    if config.channel_mult[0] != 1:
        raise UnsupportedCheckpointError(f"{what}: channel_mult[0]={config.channel_mult[0]} (not 1): diffusers sizes "
                                         f"conv_in and the time embedding from the first level's width, this UNet "
                                         f"from model_channels; train with model_channels * channel_mult[0] as "
                                         f"model_channels and the multipliers divided by channel_mult[0]")
    if config.context_dim is None:
        raise UnsupportedCheckpointError(f"{what}: context_dim=None (no cross-attention) has no diffusers "
                                         f"UNet2DConditionModel counterpart")
    if not config.mid_attention:
        raise UnsupportedCheckpointError(f"{what}: mid_attention=false has no diffusers counterpart")
    if config.num_classes is not None and config.pooled_dim is not None:
        raise UnsupportedCheckpointError(f"{what}: class labels and a pooled vector together (diffusers has one "
                                         f"class embedding)")
    widths = [config.model_channels * m for m in config.channel_mult]
    levels = len(widths)
    attn = set(config.attention_levels)
    down = ["CrossAttnDownBlock2D" if level in attn else "DownBlock2D" for level in range(levels)]
    out: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
        "in_channels": config.in_channels, "out_channels": config.output_channels,
        "down_block_types": down, "up_block_types": [kind.replace("Down", "Up") for kind in reversed(down)],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks, "transformer_layers_per_block": config.transformer_depth,
        "attention_head_dim": (config.num_heads if config.num_heads is not None
                               else [w // config.head_dim for w in widths]),
        "cross_attention_dim": config.context_dim, "use_linear_projection": config.use_linear_proj,
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "norm_num_groups": config.norm_groups, "norm_eps": 1e-5, "dropout": config.dropout,
        "upcast_attention": config.upcast_attention, "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "act_fn": "silu", "center_input_sample": False,
        "class_embed_type": None, "num_class_embeds": None, "projection_class_embeddings_input_dim": None,
    }
    if config.num_classes is not None:
        out["num_class_embeds"] = config.num_classes + 1
    if config.pooled_dim is not None:
        out["class_embed_type"] = "projection"
        out["projection_class_embeddings_input_dim"] = config.pooled_dim
    return out


def _one_value(value: Any, key: str, what: str) -> Any:
    """A per-level config entry that our UNet needs to be the same on every level."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedCheckpointError(f"{what}: {key}={list(value)} differs between levels (SDXL-style); our "
                                             f"UNet uses one value for all levels")
        return value[0]
    return value


def _heads_from_counts(widths: list[int], heads: list[int], attention_levels: list[int],
                       what: str) -> tuple[int | None, int | None]:
    """(num_heads, head_dim) from diffusers' per-level head counts: a constant count (SD 1) or a constant width per
    head (SD 2); the middle block uses the last level's count in diffusers and must agree too."""
    used = [*attention_levels, len(widths) - 1]
    counts = {heads[level] for level in used}
    if len(counts) == 1:
        return counts.pop(), None
    head_widths = {widths[level] // heads[level] for level in used}
    if len(head_widths) == 1 and all(widths[level] % heads[level] == 0 for level in used):
        return None, head_widths.pop()
    raise UnsupportedCheckpointError(f"{what}: attention_head_dim={heads} (heads per level) is neither constant nor "
                                     f"a constant width per head for block_out_channels={widths}")


def _time_shift(value: str, what: str) -> bool:
    if value not in ("default", "scale_shift"):
        raise UnsupportedCheckpointError(f"{what}: resnet_time_scale_shift={value!r} is not supported")
    return value == "scale_shift"


# Inside a ResNet block and a spatial transformer: our name -> diffusers' name and the original name.
_RES_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2",
                  "conv2": "conv2", "skip": "conv_shortcut"}
_RES_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                 "conv2": "out_layers.3", "skip": "skip_connection"}


def _attn_inner(rest: str) -> str:
    """Our spatial-transformer key tail -> the tail both diffusers and the original code use."""
    rest = re.sub(r"^blocks\.(\d+)\.", r"transformer_blocks.\1.", rest)
    rest = re.sub(r"\.to_out\.", ".to_out.0.", rest)
    rest = rest.replace("ff.proj_in.", "ff.net.0.proj.").replace("ff.proj_out.", "ff.net.2.")
    return rest


def _block_tail(part: str, rest: str, res_names: Mapping[str, str]) -> tuple[str, str]:
    """('res' | 'attn', tail) of a UNetBlock key -> (kind, the tail in the other layout)."""
    if part == "res":
        name, _, param = rest.partition(".")
        return "res", f"{res_names[name]}.{param}"
    return "attn", _attn_inner(rest)


_EMBED_DIFFUSERS = {"time_embed.mlp.0.": "time_embedding.linear_1.", "time_embed.mlp.2.": "time_embedding.linear_2.",
                    "label_embed.embedding.": "class_embedding.", "pooled_embed.0.": "class_embedding.linear_1.",
                    "pooled_embed.2.": "class_embedding.linear_2.", "conv_in.": "conv_in.",
                    "norm_out.": "conv_norm_out.", "conv_out.": "conv_out."}
_EMBED_ORIGINAL = {"time_embed.mlp.0.": "time_embed.0.", "time_embed.mlp.2.": "time_embed.2.",
                   "label_embed.embedding.": "label_emb.", "pooled_embed.0.": "label_emb.0.0.",
                   "pooled_embed.2.": "label_emb.0.2.", "conv_in.": "input_blocks.0.0.", "norm_out.": "out.0.",
                   "conv_out.": "out.2."}


def _simple(key: str, table: Mapping[str, str]) -> str | None:
    for ours, theirs in table.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return None


def unet_keys_diffusers(keys: list[str], config: UNetConfig) -> dict[str, str]:
    """Our UNet state-dict key -> diffusers UNet2DConditionModel key, for every key in `keys`."""
    levels = len(config.channel_mult)
    out = {}
    for key in keys:
        mapped = _simple(key, _EMBED_DIFFUSERS)
        if mapped is None:
            m = re.match(r"^(enc|dec)\.level(\d+)_(block(\d+)|down|up)\.(.*)$", key)
            if m:
                side, level, index, rest = m.group(1), int(m.group(2)), m.group(4), m.group(5)
                base = f"down_blocks.{level}" if side == "enc" else f"up_blocks.{levels - 1 - level}"
                if index is None:  # a resampler: its only module is `conv`
                    mapped = f"{base}.{'downsamplers' if side == 'enc' else 'upsamplers'}.0.{rest}"
                else:
                    part, _, tail = rest.partition(".")
                    kind, tail = _block_tail(part, tail, _RES_DIFFUSERS)
                    mapped = f"{base}.{'resnets' if kind == 'res' else 'attentions'}.{index}.{tail}"
            m = re.match(r"^mid\.block(\d)\.(res|attn)\.(.*)$", key)
            if m:
                kind, tail = _block_tail(m.group(2), m.group(3), _RES_DIFFUSERS)
                index = m.group(1) if kind == "res" else "0"
                mapped = f"mid_block.{'resnets' if kind == 'res' else 'attentions'}.{index}.{tail}"
        if mapped is None:
            raise AssertionError(f"no diffusers name for UNet key {key}")
        out[key] = mapped
    return out


def unet_keys_original(keys: list[str], config: UNetConfig) -> dict[str, str]:
    """Our UNet state-dict key -> original LDM key (without `model.diffusion_model.`), for every key in `keys`.

    The original numbers `input_blocks` / `output_blocks` consecutively; a downsampler is a block of its own, an
    upsampler is the last module of the last block of its level.
    """
    enc_index: dict[str, int] = {}
    n = 1  # input_blocks.0 is conv_in
    for level in range(len(config.channel_mult)):
        for i in range(config.num_res_blocks):
            enc_index[f"level{level}_block{i}"] = n
            n += 1
        if level < len(config.channel_mult) - 1:
            enc_index[f"level{level}_down"] = n
            n += 1
    dec_index: dict[str, str] = {}
    n = 0
    for level in reversed(range(len(config.channel_mult))):
        for i in range(config.num_res_blocks + 1):
            dec_index[f"level{level}_block{i}"] = f"{n}"
            n += 1
        if level > 0:
            dec_index[f"level{level}_up"] = f"{n - 1}.{2 if level in config.attention_levels else 1}"
    mid_index = {"block0.res": 0, "block0.attn": 1, "block1.res": 2 if config.mid_attention else 1}

    out = {}
    for key in keys:
        mapped = _simple(key, _EMBED_ORIGINAL)
        if mapped is None:
            m = re.match(r"^enc\.(level\d+_(?:block\d+|down))\.(.*)$", key)
            if m:
                name, rest = m.group(1), m.group(2)
                if name.endswith("_down"):
                    mapped = f"input_blocks.{enc_index[name]}.0.op.{rest.partition('.')[2]}"
                else:
                    part, _, tail = rest.partition(".")
                    kind, tail = _block_tail(part, tail, _RES_ORIGINAL)
                    mapped = f"input_blocks.{enc_index[name]}.{0 if kind == 'res' else 1}.{tail}"
            m = re.match(r"^dec\.(level\d+_(?:block\d+|up))\.(.*)$", key)
            if m:
                name, rest = m.group(1), m.group(2)
                if name.endswith("_up"):
                    mapped = f"output_blocks.{dec_index[name]}.{rest}"
                else:
                    part, _, tail = rest.partition(".")
                    kind, tail = _block_tail(part, tail, _RES_ORIGINAL)
                    mapped = f"output_blocks.{dec_index[name]}.{0 if kind == 'res' else 1}.{tail}"
            m = re.match(r"^mid\.(block\d\.(res|attn))\.(.*)$", key)
            if m:
                kind, tail = _block_tail(m.group(2), m.group(3), _RES_ORIGINAL)
                mapped = f"middle_block.{mid_index[m.group(1)]}.{tail}"
        if mapped is None:
            raise AssertionError(f"no original name for UNet key {key}")
        out[key] = mapped
    return out


def unet_config_from_original(state: Mapping[str, Any], what: str = "single-file UNet") -> UNetConfig:
    """Read a UNetConfig off the tensor shapes of an original-layout UNet state dict (prefix removed).

    Heads are not in the shapes: a context width of 768 means SD 1 (8 heads), 1024 means SD 2 (64 wide heads, with
    fp32 attention as diffusers' SD 2.1 config); GroupNorm groups are taken as SD's 32. Our own single files carry
    their exact config in metadata instead.

    Raises:
        UnsupportedCheckpointError: inpainting / image-conditioned inputs, SDXL's per-level depths, an ADM vector
            input (`label_emb.0`: SDXL, SD 2 unCLIP), or a context width that leaves the head count unknown.
    """
    if "input_blocks.0.0.weight" not in state:
        raise UnsupportedCheckpointError(f"{what}: no input_blocks.0.0.weight: not an LDM / SD UNet")
    conv_in = state["input_blocks.0.0.weight"]
    model_channels, in_channels = conv_in.shape[0], conv_in.shape[1]
    out_channels = state["out.2.weight"].shape[0]
    _check_supported_channels(in_channels, out_channels, what)

    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_blocks.")})
    widths, attention_levels, depths, num_res_blocks, count = [], [], set(), None, 0
    level_has_attn = False
    for n in blocks[1:]:
        if f"input_blocks.{n}.0.op.weight" in state:  # a downsampler closes the level
            num_res_blocks = count if num_res_blocks is None else num_res_blocks
            if count != num_res_blocks:
                raise UnsupportedCheckpointError(f"{what}: levels with different numbers of ResNet blocks")
            count, level_has_attn = 0, False
            continue
        if count == 0:
            widths.append(state[f"input_blocks.{n}.0.in_layers.2.weight"].shape[0])
        count += 1
        if f"input_blocks.{n}.1.norm.weight" in state:
            if not level_has_attn:
                attention_levels.append(len(widths) - 1)
                level_has_attn = True
            depths.add(len({k.split(".")[4] for k in state if k.startswith(f"input_blocks.{n}.1.transformer_blocks.")}))
    num_res_blocks = count if num_res_blocks is None else num_res_blocks
    if len(depths) > 1:
        raise UnsupportedCheckpointError(f"{what}: transformer depths {sorted(depths)} differ between levels (SDXL's "
                                         f"UNet); SD 1.x and 2.x UNets are supported")
    if any(w % model_channels for w in widths):
        raise UnsupportedCheckpointError(f"{what}: level widths {widths} are not multiples of {model_channels}")

    mid_attention = "middle_block.1.norm.weight" in state
    attn_prefix = "middle_block.1." if mid_attention else next(
        (f"input_blocks.{n}.1." for n in blocks if f"input_blocks.{n}.1.norm.weight" in state), None)
    context_dim = use_linear_proj = None
    if attn_prefix is not None:
        to_k = state.get(f"{attn_prefix}transformer_blocks.0.attn2.to_k.weight")
        context_dim = None if to_k is None else to_k.shape[1]
        use_linear_proj = state[f"{attn_prefix}proj_in.weight"].ndim == 2
    if context_dim == 768 and not use_linear_proj:
        num_heads, head_dim = 8, None
    elif context_dim == 1024:
        num_heads, head_dim = None, 64
    elif context_dim == 768:
        raise UnsupportedCheckpointError(f"{what}: context width 768 with linear projections around the transformers "
                                         f"is neither SD 1's layout (768, 1x1 convolutions) nor SD 2's (1024, linear), "
                                         f"so the number of attention heads is unknown (our own exports store it)")
    else:
        raise UnsupportedCheckpointError(f"{what}: context width {context_dim} is neither SD 1's 768 nor SD 2's 1024, "
                                         f"so the number of attention heads is unknown (our own exports store it)")
    emb_out = state["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    num_classes = None
    if "label_emb.weight" in state:
        num_classes = state["label_emb.weight"].shape[0] - 1
    if "label_emb.0.0.weight" in state:
        # note: our own pooled-vector UNets carry their config in the file's metadata and never come here
        raise UnsupportedCheckpointError(f"{what}: label_emb.0 feeds a vector of width "
                                         f"{state['label_emb.0.0.weight'].shape[1]} into the time embedding (SDXL's "
                                         f"size and crop conditioning, or SD 2 unCLIP's image embedding), which is "
                                         f"not supported; SD 1.x and 2.x text-to-image UNets are")
    return UNetConfig(
        in_channels=in_channels, out_channels=None, model_channels=model_channels,
        channel_mult=[w // model_channels for w in widths], num_res_blocks=num_res_blocks,
        attention_levels=attention_levels, mid_attention=mid_attention, transformer_depth=depths.pop() if depths else 1,
        num_heads=num_heads, head_dim=head_dim, context_dim=context_dim, use_linear_proj=bool(use_linear_proj),
        use_scale_shift_norm=emb_out == 2 * widths[0], num_classes=num_classes,
        upcast_attention=context_dim == 1024)  # SD 2.x's configs set it


def split_unet_state(state: StateDict) -> StateDict:
    """The UNet's tensors of a whole single file, `model.diffusion_model.` removed."""
    prefix = "model.diffusion_model."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _our_shapes(config: UNetConfig) -> dict[str, Any]:
    from ldm.convert.common import meta_state_shapes
    from ldm.nn.unet import UNet

    return meta_state_shapes(lambda: UNet(config))


def unet_to_diffusers(state: StateDict, config: UNetConfig) -> StateDict:
    """Our UNet state dict -> diffusers UNet2DConditionModel state dict (every key mapped, or an error)."""
    from ldm.convert.common import rename

    shapes = _our_shapes(config)
    rename(state, {k: k for k in shapes}, "UNet export", expected_shapes=shapes)
    return rename(state, unet_keys_diffusers(list(shapes), config), "UNet export to diffusers")


def unet_from_diffusers(state: StateDict, config: UNetConfig) -> StateDict:
    """diffusers UNet2DConditionModel state dict -> ours, checked key by key and shape by shape."""
    from ldm.convert.common import invert, rename

    shapes = _our_shapes(config)
    return rename(state, invert(unet_keys_diffusers(list(shapes), config)), "UNet from diffusers",
                  expected_shapes=shapes)


def unet_to_original(state: StateDict, config: UNetConfig) -> StateDict:
    """Our UNet state dict -> original LDM keys (without `model.diffusion_model.`)."""
    from ldm.convert.common import rename

    shapes = _our_shapes(config)
    rename(state, {k: k for k in shapes}, "UNet export", expected_shapes=shapes)
    return rename(state, unet_keys_original(list(shapes), config), "UNet export to the original layout")


def unet_from_original(state: StateDict, config: UNetConfig) -> StateDict:
    """Original LDM UNet keys (prefix removed) -> ours, checked key by key and shape by shape."""
    from ldm.convert.common import invert, rename

    shapes = _our_shapes(config)
    return rename(state, invert(unet_keys_original(list(shapes), config)), "UNet from a single file",
                  expected_shapes=shapes)
