"""What `ldm-eval` evaluates: checkpoints and exports found by path, glob or list, each read once.

    paths = resolve_checkpoints("runs/ldm/checkpoints/*.ckpt")       # or an export dir, a run dir, a list
    model = load_model(paths[0], use_ema=True)                       # EvalModel(kind, model, info)

A latent diffusion checkpoint or export gives a `LatentDiffusionPipeline`; an autoencoder checkpoint or export gives
its `AutoencoderKL` alone (evaluation needs neither the loss and its LPIPS backbone nor the discriminator). Files are
read without executing code (`ldm.checkpoints.load_checkpoint`).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ldm.callbacks.checkpoint import LAST_NAME
from ldm.checkpoints import CheckpointError, MissingCheckpointError, checkpoint_kind, load_checkpoint, submodule_state
from ldm.io import (
    CONFIG_NAME,
    PIPELINE_FORMAT,
    WEIGHTS_NAME,
    export_dir,
    glob_sorted,
    read_json_object,
    trained_model_path,
)

KINDS = ("autoencoder", "latent_diffusion")


@dataclass
class EvalModel:
    kind: str                   # autoencoder | latent_diffusion
    model: nn.Module            # AutoencoderKL or LatentDiffusionPipeline, in eval mode on the CPU
    info: dict[str, Any]        # checkpoint, checkpoint_kind, checkpoint_step, weights, size and time: protocol fields


def resolve_checkpoints(spec: str | Sequence[str]) -> list[str]:
    """Checkpoint files and export (or run) directories from a path, a glob or a list of either, in the order given
    (globs sorted; of a glob's matches, the .ckpt files (or those of the suffix it names) and the folders:
    `checkpoints/*` leaves out the latent_stats.json beside them; matches that are one file, as last.ckpt and the
    periodic checkpoint it links, count once, under the periodic name; so does a model the list names twice, by any
    path: a run directory and its export, an export and its weights file)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    named: dict[tuple[int, int], Path] = {}  # (device, inode) of the file read -> the name kept, in the order named
    for item in specs:
        item = str(Path(str(item)).expanduser())
        # a path that exists is taken as named (a sweep's `lr[1e-3]` folder), else as a glob
        matches = glob_sorted(item) if glob.has_magic(item) and not Path(item).exists() else None
        suffix = Path(item).suffix  # a pattern naming one (`*.pt`) keeps its matches
        found = [item] if matches is None else \
            [p for p in matches if Path(p).is_dir() or Path(p).suffix in (".ckpt", suffix)]
        missing = [p for p in found if not Path(p).exists()]
        if not found or missing:
            problem = f"no such file or directory {missing}" if missing else \
                f"no .ckpt file or folder among its matches {[Path(p).name for p in matches[:5]]}" if matches else \
                "no match"
            raise MissingCheckpointError(f"ckpt_path={item}: {problem}")
        for path in (trained_model_path(p) for p in found):  # an export's weights file: its folder
            file = _read_file(path)
            if file not in named or named[file].name == LAST_NAME:
                named.pop(file, None)  # (the periodic name takes its own place in the order)
                named[file] = path
    # note: ".." folded as the OS follows it (a link's target's parent), a file's own name kept (last.ckpt): results
    # rows name the checkpoint by this path, and skip_done compares it
    return [str(p.resolve() if p.is_dir() else p.parent.resolve() / p.name) for p in named.values()]


def _read_file(path: Path) -> tuple[int, int]:
    """(device, inode) of the file that reading `path` reads: a checkpoint itself, an export's weights (a run
    directory's export's)."""
    if path.is_dir():
        try:
            folder = export_dir(path)
        except CheckpointError:  # a run directory without an export: its loader names it
            folder = path
        path = folder / WEIGHTS_NAME if (folder / WEIGHTS_NAME).is_file() else folder
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def load_model(path: str, use_ema: bool = True) -> EvalModel:
    """The model at `path` (read once) with its protocol fields; EMA weights when kept and `use_ema`."""
    from ldm.pipeline import LatentDiffusionPipeline

    source, directory = Path(path), None
    if source.is_dir():  # note: ldm.eval.evaluator.evaluate checks use_ema against every export up front
        directory = export_dir(source)
        if not (directory / CONFIG_NAME).is_file():
            raise CheckpointError(f"ckpt_path={path} is a directory without an export ({CONFIG_NAME}); give an export "
                                  f"directory, a run directory holding export/, or a checkpoint file")
        weights = directory / "model.safetensors"
        source = weights if weights.is_file() else directory  # note: an export is known by its weights file
    stat = source.stat()
    info: dict[str, Any] = {"checkpoint": path, "checkpoint_size": stat.st_size, "checkpoint_mtime": int(stat.st_mtime)}
    if directory is not None:
        if read_json_object(directory / CONFIG_NAME, "ckpt_path").get("format") == PIPELINE_FORMAT:
            pipeline = LatentDiffusionPipeline.from_pretrained(directory)
            return _pipeline_model(pipeline, info)
        from ldm.nn.autoencoder import AutoencoderKL

        autoencoder = AutoencoderKL.from_pretrained(directory, "ckpt_path").eval().requires_grad_(False)
        return EvalModel("autoencoder", autoencoder, {**info, "checkpoint_kind": "autoencoder", "checkpoint_step": -1,
                                                      "weights": "export"})

    checkpoint = load_checkpoint(path)
    kind = checkpoint_kind(checkpoint, path)
    if kind == "latent_diffusion":
        return _pipeline_model(LatentDiffusionPipeline.from_checkpoint(checkpoint, path, use_ema), info)
    from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL

    net_config = checkpoint.get("autoencoder_config") or checkpoint["hyper_parameters"]["config"]["net"]
    autoencoder = AutoencoderKL(AutoencoderConfig(**net_config))
    state, ema = submodule_state(checkpoint["state_dict"], "autoencoder.", "ema.module." if use_ema else None)
    autoencoder.load_state_dict(state)
    info.update({"checkpoint_kind": kind, "checkpoint_step": int(checkpoint.get("global_step", -1)),
                 "weights": "ema" if ema else "raw"})
    return EvalModel(kind, autoencoder.eval().requires_grad_(False), info)


def _pipeline_model(pipeline: Any, info: dict[str, Any]) -> EvalModel:
    provenance = pipeline.provenance
    return EvalModel("latent_diffusion", pipeline, {**info, "checkpoint_kind": "latent_diffusion",
                                                    "checkpoint_step": provenance["step"],
                                                    "weights": provenance["weights"]})
