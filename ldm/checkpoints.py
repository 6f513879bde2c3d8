"""Reading checkpoints given by path: never executing code, always naming the file in an error.

Every `.ckpt` the package opens (a training checkpoint to sample, evaluate or export from, stage 1's checkpoint as the
frozen autoencoder, cached statistics) goes through `load_checkpoint`: `torch.load(weights_only=True)`, which
unpickles only tensors and plain containers. A file whose pickle asks for anything else (a class to build, a function
to call) is refused before it runs, so a malicious or foreign file can do nothing. Lightning's checkpoints are plain
dicts of tensors, numbers and strings, which this reads as they are.

`submodule_state` takes one network's weights out of a LightningModule's state dict, the EMA copy when asked for and
kept: the one place that knows the EMA's key prefix (`ema.module.`).
"""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ldm.config import ConfigError


class CheckpointError(ConfigError):
    """A file given by path is missing, unreadable, unsafe or not the kind of checkpoint expected."""


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A file given by path does not exist (also a FileNotFoundError, for callers that catch that)."""


# What torch.load raises for a file it cannot read (cut short, another format); a refused pickle is an UnpicklingError.
# (A text file can stop the weights-only unpickler anywhere: `task_name: ...` raises IndexError, others TypeError or
# struct.error.)
# torch.load hands a `.safetensors` path to safetensors, whose damaged-file error derives from Exception alone.
UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError, IndexError,
              TypeError, struct.error, SafetensorError)


def needed_code(err: pickle.UnpicklingError) -> str | None:
    """The global (class or function) that `torch.load(weights_only=True)` refused to load, as `global io.open`
    (not torch's message, which advises allowlisting it); None when the refusal is damaged data instead."""
    match = re.search(r"GLOBAL (\S+)", str(err))
    return f"global {match.group(1)}" if match else None


def newer_protocol(err: pickle.UnpicklingError) -> bool:
    """Whether the weights-only reader stopped at an opcode of pickle protocol 4 or 5 (FRAME, SHORT_BINUNICODE, ...:
    140-152), which it does not read, rather than at damaged data."""
    match = re.search(r"Unsupported operand (\d+)", str(err))
    return bool(match) and 140 <= int(match.group(1)) <= 152


def pickle_refusal(err: pickle.UnpicklingError) -> str:
    """A weights-only unpickling refusal in words, after "the weights' ": the code the pickle asks for (nothing
    ran), a pickle protocol the weights-only reader stops at before it sees what the file holds, or damaged data."""
    if code := needed_code(err):
        return f"pickle needs code outside plain tensors ({code}); nothing was run or loaded"
    if newer_protocol(err):
        return ("pickle is in a form torch.load(weights_only=True) does not read (pickle protocol 4 or 5, or not a "
                "torch file) and may carry code; nothing was run or loaded: if it comes from a source you trust, "
                "re-save its tensors with torch.save (default protocol) or as safetensors")
    return "pickle is damaged (not data torch.load reads); nothing was loaded"


def checkpoint_in_folder(folder: Path) -> Path | None:
    """The checkpoint to name for a folder given where a checkpoint file is read: its (or its checkpoints/') last.ckpt,
    else the last .ckpt by name; None when it holds none."""
    inside = sorted(folder.glob("*.ckpt")) or sorted(folder.glob("checkpoints/*.ckpt"))
    return next((p for p in inside if p.name == "last.ckpt"), inside[-1] if inside else None)


def load_checkpoint(path: str | Path, key: str = "ckpt_path", map_location: str | torch.device = "cpu",
                    ) -> dict[str, Any]:
    """The checkpoint dict stored at `path`, unpickled without executing code.

    Args:
        path: a `.ckpt` / `.pt` file written by torch.save.
        key: the config key that named the file, for the error message.
        map_location: where tensors go.

    Raises:
        CheckpointError: the file is missing, corrupt, truncated, not a dict, or its pickle needs code to load.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        example = checkpoint_in_folder(path)
        raise MissingCheckpointError(f"{key}={path} is a folder, not a checkpoint file: give a .ckpt "
                                     + (f"inside it, e.g. {key}={example}" if example else "(it holds none)"))
    if not path.is_file():
        raise MissingCheckpointError(f"{key}={path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as err:
        if code := needed_code(err):  # the pickle asks for a class or function: refused before anything ran
            raise CheckpointError(f"{key}={path}: refused to load: the file's pickle needs code outside plain "
                                  f"tensors and containers ({code}); only checkpoints written by this package (or "
                                  f"plain state dicts) are read") from None
        if newer_protocol(err):
            raise CheckpointError(f"{key}={path}: its {pickle_refusal(err)}") from None
        raise CheckpointError(f"{key}={path} is not a readable checkpoint (its data is damaged); was it truncated, "
                              f"or is it another kind of file?") from None
    except UNREADABLE:
        raise CheckpointError(f"{key}={path} is not a readable checkpoint (not a file torch.save wrote, or one cut "
                              f"short); was it truncated, or is it another kind of file?") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{key}={path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return upgrade_layout(checkpoint)


# Where stage 2's networks sat in its state dict before LatentDiffusionPipeline (commit 1c99e1b): at the top level;
# since, under `pipeline.` (the EMA copies, `ema.` and `ema_conditioner.`, stay where they were).
PIPELINE_PARTS = ("unet.", "autoencoder.", "conditioner.")


def upgrade_layout(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """`checkpoint` (in place) with a stage-2 state dict of older ldm moved to today's keys, so that it resumes,
    samples, evaluates and exports as the checkpoints written now do. (`load_checkpoint` calls it, and the latent
    diffusion module on Lightning's own read of a checkpoint it resumes.)"""
    config = (checkpoint.get("hyper_parameters") or {}).get("config")
    state = checkpoint.get("state_dict")
    if isinstance(config, dict) and "unet" in config and isinstance(state, dict) \
            and not any(k.startswith("pipeline.") for k in state):
        checkpoint["state_dict"] = {f"pipeline.{k}" if k.startswith(PIPELINE_PARTS) else k: v
                                    for k, v in state.items()}
    return checkpoint


def not_ours(key: str, path: str | Path, what: str, reader: str = "this") -> CheckpointError:
    """The refusal of a model of the Stable Diffusion ecosystem (`what` it is) where ldm reads its own (`reader`)."""
    return CheckpointError(f"{key}={path} is {what}: {reader} reads ldm's own checkpoints and exports; a Stable "
                           f"Diffusion model goes in through ldm-train's model.init_from=<pipeline folder or single "
                           f"file> (its VAE alone: model.autoencoder_path; from Python, ldm.convert.load_components / "
                           f"load_autoencoder_any), and out through ldm-export to diffusers")


def checkpoint_kind(checkpoint: dict[str, Any], path: str | Path = "checkpoint", key: str = "ckpt_path",
                    reader: str = "this") -> str:
    """`latent_diffusion` (a UNet config among the hyperparameters) or `autoencoder` (the AutoencoderModule's own
    `autoencoder_config` entry) for a checkpoint ldm-train wrote; CheckpointError for any other, naming `key` (and
    `reader`, what refuses a Stable Diffusion file: `not_ours`)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    if isinstance(hparams.get("config"), dict) and "unet" in hparams["config"]:
        return "latent_diffusion"
    if "autoencoder_config" in checkpoint:
        return "autoencoder"
    # (a file of weights alone, as a .safetensors or a saved state dict: its own keys)
    state = checkpoint.get("state_dict", {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)})
    prefixes = sorted({name.split(".", 1)[0] for name in state})[:8]
    if {"model", "first_stage_model"} <= set(prefixes):  # the original layout of a released SD file
        raise not_ours(key, path, "a Stable Diffusion single file (the original layout)", reader)
    if {"encoder", "decoder"} <= set(prefixes):  # a released VAE (vae-ft-mse-840000-ema-pruned.ckpt)
        raise not_ours(key, path, "a stand-alone VAE file (the original layout)", reader)
    raise CheckpointError(f"{key}={path}: cannot tell what this checkpoint holds (state dict prefixes {prefixes});"
                          f" expected a checkpoint of ldm-train's autoencoder or latent diffusion model")


def submodule_state(state_dict: dict[str, torch.Tensor], prefix: str, ema_prefix: str | None = None,
                    ) -> tuple[dict[str, torch.Tensor], bool]:
    """The weights under `prefix` (e.g. "unet."), or under `ema_prefix` when given and present.

    Returns:
        (state dict without the prefix, whether the EMA weights were taken).
    """
    for candidate, is_ema in ((ema_prefix, True), (prefix, False)):
        if candidate and any(k.startswith(candidate) for k in state_dict):
            return {k[len(candidate):]: v for k, v in state_dict.items() if k.startswith(candidate)}, is_ema
    raise CheckpointError(f"the checkpoint holds no weights under {prefix!r} (its state dict prefixes: "
                          f"{sorted({k.split('.', 1)[0] for k in state_dict})[:8]}): not the kind of checkpoint "
                          f"expected here")


def _is_zip(path: Path) -> bool:
    """torch.save's zip format (mmap-able) rather than the legacy one."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"
