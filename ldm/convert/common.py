"""What every converter shares: the error type, safe reading of checkpoint files, key renaming that checks both
sides, and the `ldm` metadata entry of our own single files.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoints import UNREADABLE, needed_code, newer_protocol, pickle_refusal
from ldm.config import ConfigError, is_int

StateDict = dict[str, torch.Tensor]

# The safetensors metadata key under which `save_single_file` stores the exact configs (JSON).
METADATA_KEY = "ldm"
# What an original-layout single file may end in (`read_state_dict` reads them all).
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class UnsupportedCheckpointError(ConfigError):
    """A checkpoint or config the converters cannot represent exactly; the message names what is unsupported."""


def read_state_dict(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """The tensors of a `.safetensors` or `.ckpt`/`.pt`/`.pth`/`.bin` file and our metadata (empty when none).

    A pickled file is opened with `torch.load(weights_only=True)`: tensors and plain containers only, never code. An
    LDM / Lightning `.ckpt` keeps its tensors under "state_dict"; that entry is used when present.

    Args:
        path: the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    damaged = (f"{path} is not a readable {path.suffix} file (cut short, or another kind of file): fetch or export "
               f"it again")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                header = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
            meta = json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}
        except (SafetensorError, OSError, ValueError) as err:
            raise UnsupportedCheckpointError(f"{damaged} ({str(err).splitlines()[0]})") from None
        return state, meta
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if newer_protocol(err):
            raise UnsupportedCheckpointError(f"{path}: its {pickle_refusal(err)}") from None
        if (code := needed_code(err)) is None:
            raise UnsupportedCheckpointError(damaged) from None
        raise UnsupportedCheckpointError(
            f"{path} holds pickled objects other than tensors, which could run code when opened; it is not loaded "
            f"(torch.load weights_only=True refused {code}). Convert it to .safetensors with the tool that wrote it, "
            f"or re-save only its state_dict") from None
    except UNREADABLE:
        raise UnsupportedCheckpointError(damaged) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise UnsupportedCheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state, {}


def strip_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """The entries of `state` under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def meta_state_shapes(build: Callable[[], nn.Module]) -> dict[str, torch.Size]:
    """Parameter and buffer shapes of a module built on the meta device (no memory, even at full size)."""
    with torch.device("meta"):
        module = build()
    return {k: v.shape for k, v in module.state_dict().items()}


def rename(state: Mapping[str, torch.Tensor], mapping: Mapping[str, str], what: str,
           expected_shapes: Mapping[str, torch.Size] | None = None,
           reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> StateDict:
    """Rename every key of `state` through `mapping` (source key -> target key), all or nothing.

    Raises UnsupportedCheckpointError naming the keys when `state` holds a key the mapping does not know, lacks one it
    needs, or (with `expected_shapes`, keyed by target) a tensor has the wrong shape, so a model is never half-loaded.

    Args:
        state: the source tensors.
        mapping: source key -> target key; must cover the whole source layout.
        what: what is converted, for the messages (e.g. "UNet from diffusers").
        expected_shapes: target key -> shape the target model needs.
        reshape: (target key, tensor) -> tensor, for layouts that store the same weight in another shape.
    """
    unknown = sorted(set(state) - set(mapping))
    missing = sorted(set(mapping) - set(state))
    if unknown or missing:
        raise UnsupportedCheckpointError(
            f"{what}: the checkpoint does not match the architecture its config describes: "
            f"{_listing('unexpected keys', unknown)}{'; ' if unknown and missing else ''}"
            f"{_listing('missing keys', missing)}")
    out = {}
    for key, value in state.items():
        target = mapping[key]
        out[target] = reshape(target, value) if reshape is not None else value
    if expected_shapes is not None:
        wrong = [f"{key}: {tuple(out[target].shape)} instead of {tuple(expected_shapes[target])}"
                 for key, target in mapping.items() if tuple(out[target].shape) != tuple(expected_shapes[target])]
        if wrong:
            raise UnsupportedCheckpointError(f"{what}: tensors of the wrong shape: {_listing('', wrong)}")
    return out


def invert(mapping: Mapping[str, str]) -> dict[str, str]:
    """target -> source of a one-to-one mapping."""
    inverse = {v: k for k, v in mapping.items()}
    if len(inverse) != len(mapping):
        raise AssertionError("key mapping is not one to one")
    return inverse


def _listing(label: str, keys: Iterable[str], limit: int = 8) -> str:
    keys = list(keys)
    if not keys:
        return ""
    shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
    return f"{label} ({len(keys)}): {shown}" if label else shown


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON config file (an object), with an error that names the file (unsupported: the converters' callers name
    the config key in front)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {what} needs it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnsupportedCheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UnsupportedCheckpointError(f"{path} holds a JSON {type(data).__name__}, not the object {what} needs")
    return data


class OneOf(tuple):
    """Spellings of the one value we implement that diffusers configs use interchangeably (for
    `check_config_values`), e.g. no latent shift as None or 0.0."""

    def __repr__(self) -> str:
        return " or ".join(repr(v) for v in self)


def check_config_values(config: Mapping[str, Any], required: Mapping[str, Any], what: str) -> None:
    """Raise UnsupportedCheckpointError when a config field is present with a value other than the one we support.

    Args:
        config: a diffusers config.
        required: field -> the only value our networks implement (a missing field is taken as its default), or a
            `OneOf` its spellings. A per-block list holding that value for every block (only_cross_attention) is it.
        what: the model, for the message.
    """
    def supported(value: Any, fixed: Any) -> bool:
        if isinstance(fixed, OneOf):
            return any(supported(value, one) for one in fixed)
        if fixed is None and value in (None, [], {}):
            return True
        if isinstance(value, (list, tuple)) and value and not isinstance(fixed, (list, tuple)):
            return all(supported(v, fixed) for v in value)
        return value == fixed

    for key, fixed in required.items():
        if key in config and not supported(config[key], fixed):
            raise UnsupportedCheckpointError(f"{what}: {key}={config[key]!r} is not supported (only {fixed!r})")


def square_size(size: Any) -> int | None:
    """The side of diffusers' `sample_size` (an int, or an [h, w] pair since diffusers 0.2x), or None when it is
    absent or not square."""
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    return size if is_int(size) else None
