"""The CLIP text encoder in three layouts: transformers' `CLIPTextModel` (diffusers folders, and what our
`CLIPTextEncoder` wraps), SD 1's single-file copy of it (`cond_stage_model.transformer.text_model.*`), and SD 2's
OpenCLIP ViT-H text tower (`cond_stage_model.model.*`).

SD 2 conditions on OpenCLIP's penultimate layer followed by the final LayerNorm. As diffusers does, the import of a
released file (OpenCLIP's whole tower) keeps every layer but the last, so the transformers model's `last_hidden_state`
is that output (layer "last"), and drops the last block, `text_projection` and `logit_scale`, which SD 2 never uses.
A file that holds only the blocks SD 2 uses (no `text_projection`: what our export and diffusers' conversion script
write) is imported whole. OpenCLIP fuses q, k, v into
`attn.in_proj_weight` (3D, D); transformers keeps them apart. OpenCLIP ViT-H uses exact GELU, OpenAI's CLIP quick_gelu:
the export picks the single-file layout from the activation.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from ldm.convert.common import StateDict, UnsupportedCheckpointError, rename

SD1_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."
_HEAD_DIM = 64  # CLIP ViT-L and OpenCLIP ViT-H text towers: heads = width / 64 (not in the shapes)
_IGNORED = ("text_model.embeddings.position_ids", "embeddings.position_ids")  # a constant buffer, not a weight


def text_layout(state: Mapping[str, torch.Tensor]) -> str | None:
    """"sd1" (transformers layout), "openclip" (SD 2), or None when a single file holds no text encoder."""
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
        return "openclip"
    if any(k.startswith(SD1_PREFIX) for k in state):
        return "sd1"
    return None


def _flat(state: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers keys without the `text_model.` level (transformers >= 5.6 flattened CLIPTextModel)."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if k not in _IGNORED}


def to_model_keys(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    """Flat transformers keys -> the keys of this transformers version's CLIPTextModel (nested or flat)."""
    nested = hasattr(model, "text_model")
    return {(f"text_model.{k}" if nested else k): v for k, v in state.items()}


def clip_config_from_state(flat: Mapping[str, torch.Tensor], hidden_act: str,
                           tokenizer: Any | None = None) -> dict[str, Any]:
    """CLIPTextConfig fields read off flat transformers-layout tensors (heads: width / 64, as CLIP-L and OpenCLIP-H).

    Args:
        flat: the text encoder's tensors in flat transformers layout.
        hidden_act: "quick_gelu" (OpenAI CLIP, SD 1) or "gelu" (OpenCLIP, SD 2).
        tokenizer: when given, its special token ids are used.
    """
    vocab, hidden = flat["embeddings.token_embedding.weight"].shape
    layers = len({k.split(".")[2] for k in flat if k.startswith("encoder.layers.")})
    config: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=flat["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=max(hidden // _HEAD_DIM, 1),
        max_position_embeddings=flat["embeddings.position_embedding.weight"].shape[0], hidden_act=hidden_act)
    if tokenizer is not None:
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return config


def sd1_to_flat(state: Mapping[str, torch.Tensor]) -> StateDict:
    """SD 1 single-file text encoder (prefix removed: `text_model.*`) -> flat transformers keys."""
    return _flat(state)


def flat_to_sd1(flat: Mapping[str, torch.Tensor]) -> StateDict:
    """Flat transformers keys -> SD 1 single-file keys (prefix not added: `text_model.*`)."""
    return {f"text_model.{k}": v for k, v in flat.items()}


def openclip_to_flat(state: Mapping[str, torch.Tensor], num_layers: int | None = None) -> tuple[StateDict, int]:
    """SD 2 OpenCLIP text tower (prefix removed) -> (flat transformers tensors, layers kept).

    Args:
        state: `token_embedding.weight`, `positional_embedding`, `transformer.resblocks.{i}.*`, `ln_final.*`, and the
            unused `text_projection` and `logit_scale`.
        num_layers: layers to keep; None: all but the last for OpenCLIP's whole tower (SD 2's penultimate layer;
            recognised by its `text_projection`, or by ViT-H's 24 blocks of width 1024), else all of them (a tower
            already cut to the blocks SD 2 uses, as exports write it without the projection).
    """
    blocks = sorted({int(k.split(".")[2]) for k in state if k.startswith("transformer.resblocks.")})
    if not blocks:
        raise UnsupportedCheckpointError("OpenCLIP text encoder: no transformer.resblocks.* weights")
    width = state["token_embedding.weight"].shape[1] if "token_embedding.weight" in state else None
    whole_tower = "text_projection" in state or (len(blocks) == 24 and width == 1024)
    keep = num_layers if num_layers is not None else len(blocks) - 1 if whole_tower else len(blocks)
    if keep < 1 or keep > len(blocks):
        raise UnsupportedCheckpointError(f"OpenCLIP text encoder: {len(blocks)} blocks, cannot keep {keep}")
    dropped_blocks = tuple(f"transformer.resblocks.{i}." for i in blocks[keep:])
    out: StateDict = {}
    mapping = {"token_embedding.weight": "embeddings.token_embedding.weight",
               "positional_embedding": "embeddings.position_embedding.weight",
               "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    block_names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}
    unknown = []
    for key, value in state.items():
        if key in mapping:
            out[mapping[key]] = value
        elif key in ("text_projection", "logit_scale", "attn_mask") or key.startswith(dropped_blocks):
            continue  # not used by SD 2's penultimate-layer conditioning
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
            i, param = m.groups()  # fused (3D, D) and (3D,): q, k, v stacked along the first axis
            for part, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"encoder.layers.{i}.self_attn.{part}_proj.{param}"] = chunk.clone()
        elif m := re.match(r"^transformer\.resblocks\.(\d+)\.(.*)\.(weight|bias)$", key):
            i, name, param = m.groups()
            base = f"encoder.layers.{i}"
            if name in block_names:
                out[f"{base}.{block_names[name]}.{param}"] = value
            else:
                unknown.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise UnsupportedCheckpointError(f"OpenCLIP text encoder: unexpected keys {unknown[:8]}")
    return out, keep


def flat_to_openclip(flat: Mapping[str, torch.Tensor]) -> StateDict:
    """Flat transformers keys -> SD 2 OpenCLIP keys (prefix not added). The inverse of `openclip_to_flat` on the
    layers it kept; `text_projection` is not written (SD 2 never uses it; SD's loader tolerates its absence)."""
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out: StateDict = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    mapping = {"embeddings.token_embedding.weight": "token_embedding.weight",
               "embeddings.position_embedding.weight": "positional_embedding",
               "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in _flat(flat).items():
        if key in mapping:
            out[mapping[key]] = value
            continue
        m = re.match(r"^encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key)
        if not m:
            raise UnsupportedCheckpointError(f"text encoder export: unexpected key {key}")
        i, name, param = m.groups()
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((i, param), {})[name[10]] = value
        else:
            out[f"transformer.resblocks.{i}.{names[name]}.{param}"] = value
    for (i, param), parts in qkv.items():
        out[f"transformer.resblocks.{i}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def load_state_into(model: torch.nn.Module, flat: Mapping[str, torch.Tensor], what: str) -> None:
    """Load flat transformers tensors into a CLIPTextModel, requiring every weight and nothing more."""
    target = model.state_dict()
    mapped = to_model_keys(flat, model)
    rename(mapped, {k: k for k in target if not k.endswith("position_ids")}, what,
           expected_shapes={k: v.shape for k, v in target.items()})
    model.load_state_dict(mapped, strict=False)


def without_last_block(model: Any) -> Any:
    """A copy of a transformers CLIPTextModel without its last block: its last_hidden_state (final LayerNorm
    included) is the penultimate layer's, what SD 2 and "CLIP skip 2" feed the UNet."""
    from transformers import CLIPTextConfig, CLIPTextModel

    fields = model.config.to_dict()
    fields["num_hidden_layers"] -= 1
    last = f"encoder.layers.{fields['num_hidden_layers']}."
    flat = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    truncated = CLIPTextModel(CLIPTextConfig(**fields)).eval()
    load_state_into(truncated, {k: v for k, v in flat.items() if not k.startswith(last)}, "text encoder, last block "
                    "dropped")
    return truncated
