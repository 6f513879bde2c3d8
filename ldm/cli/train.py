"""ldm-train: fit an autoencoder, a contrastive text encoder or a latent diffusion model from a Hydra-composed config.

    ldm-train experiment=quickstart_vae paths.output_dir=runs/vae
    ldm-train experiment=quickstart_clip paths.output_dir=runs/clip
    ldm-train experiment=quickstart_ldm model.autoencoder_path=runs/vae/export \
              model.conditioner.name_or_path=runs/clip/export paths.output_dir=runs/ldm ckpt_path=last
    ldm-train -m hparams_search=ldm_optuna hydra/launcher=slurm        # a sweep; each trial returns its metric

A run directory that already holds checkpoints is resumed when `auto_resume` is true (the default), so running the
same command again, or a requeued SLURM job, continues where the run stopped: from `checkpoints/last.ckpt`, or, when
that file is missing or damaged (a SIGKILL at a bad moment, a copy cut short), from the newest intact checkpoint. One
run at a time per `paths.output_dir` (`ldm.cli.run_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib
import inspect
import json
import logging
import math
import os
import pickle
import re
import shlex
import signal
import sys
import threading
import traceback
import uuid
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import (
    BatchSizeFinder,
    GradientAccumulationScheduler,
    LearningRateFinder,
    LearningRateMonitor,
    ProgressBar,
)
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from ldm import __version__
from ldm import config as configs
from ldm.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint, run_interrupted, run_stopped
from ldm.checkpoints import load_checkpoint
from ldm.cli.common import (
    CONF_DIR,
    EXIT_FAILURE,
    EXIT_USER_ERROR,
    SweepFailed,
    check_nodes,
    check_slurm_run_directory,
    check_trainer,
    cli_entry,
    describe_error,
    print_config_tree,
    process_count,
    remove_made_run_directory,
    resolve_output_dir,
    run_cli,
    save_config,
    strategy_name,
)
from ldm.cli.run_lock import run_lock
from ldm.data.shardlist import absolute_spec
from ldm.io import absolute_if_local, atomic_write_text
from ldm.nn.unet import UNetConfig
from ldm.slurm import requeue_signal_held

configs.register_schemas("model", "data/webdataset")  # conf/ extends them: stored before Hydra composes


class TrainingDiverged(RuntimeError):
    """The NaN guard stopped the run after too many non-finite steps in a row."""


COMPONENT_TYPES = {"callbacks": (L.Callback, "lightning.pytorch.Callback"),  # what each group's entries must be
                   "logger": (Logger, "lightning.pytorch.loggers.Logger")}


def built_component(group: str, name: str, built: Any) -> Any:
    """`built` (what `group.name`'s _target_ returned), or a ConfigError where it is no Lightning callback / logger
    or one ldm-train refuses (a factory function's result; classes are checked before the run starts,
    `check_components`)."""
    kind, kind_name = COMPONENT_TYPES[group]
    if not isinstance(built, kind):
        raise configs.ConfigError(f"{group}.{name}: its _target_ built a {type(built).__name__}, not a {kind_name}: "
                                  f"return one (or name a subclass of it)")
    refuse_unsupported(f"{group}.{name}", type(built))
    return built


def refuse_unsupported(key: str, cls: type) -> None:
    """A ConfigError for a callback class ldm-train does not support (REFUSED_CALLBACKS), naming `key`."""
    for base, why in REFUSED_CALLBACKS.items():
        if issubclass(cls, base):
            raise configs.ConfigError(f"{key}: {base.__name__} is not supported: {why}; remove {key}")


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Every non-null entry of the `callbacks` group, in config order."""
    # note: _convert_, so that a list (a shard set) reaches the callback as a list, as it reaches the datamodule
    return [built_component("callbacks", name, hydra.utils.instantiate(node, _convert_="all"))
            for name, node in (cfg or {}).items() if node is not None]


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Every non-null entry of the `logger` group; W&B's left out when its own switch says so (`WANDB_MODE=disabled`,
    `WANDB_DISABLED=true`), which the W&B logger's offline mode would otherwise override."""
    loggers, disabled = [], wandb_disabled()  # (before any is built: W&B's offline mode rewrites WANDB_MODE)
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        target = hydra.utils.get_object(node._target_)
        if disabled and isinstance(target, type) and issubclass(target, WandbLogger):
            rank_zero_info("W&B is disabled (WANDB_MODE=disabled or WANDB_DISABLED=true): no W&B run is written")
            continue
        logger = built_component("logger", name, hydra.utils.instantiate(node))
        if disabled and isinstance(logger, WandbLogger):  # a factory's
            rank_zero_info(f"W&B is disabled (WANDB_MODE=disabled or WANDB_DISABLED=true): logger.{name} is left out")
            continue
        loggers.append(logger)
    return loggers


def wandb_disabled() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() == "disabled" or \
        os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes")


# Lightning callbacks that change what ldm-train sets up before the run, behind its back.
REFUSED_CALLBACKS = {
    GradientAccumulationScheduler: "the global batch printed at start, the LR schedule's length (counted from "
                                   "trainer.accumulate_grad_batches) and the modules that refuse accumulation would "
                                   "not know of it; set trainer.accumulate_grad_batches",
    BatchSizeFinder: "set data.batch_size (the datamodule's loaders are built from it; search it with a sweep, "
                     "hparams_search=ldm_optuna)",
    LearningRateFinder: "set model.lr (the rate lives in the model's config; search it with a sweep, "
                        "hparams_search=ldm_optuna)",
}


# The top-level keys of conf/train.yaml composed (with any experiment; tests/test_train_cli.py checks it).
TOP_LEVEL_KEYS = ("task_name", "run_name", "tags", "seed", "ckpt_path", "auto_resume", "optimized_metric", "compile",
                  "tf32", "channels_last", "paths", "data", "model", "trainer", "callbacks", "logger")


def check_top_level_keys(cfg: DictConfig) -> None:
    """Refuse a top-level key that ldm-train does not read (`+seeed=3`, or `+unet=small`, which Hydra's own message
    suggests for a group of the model's: both ran, acting on nothing)."""
    unknown = [key for key in cfg if key not in TOP_LEVEL_KEYS]
    if not unknown:
        return
    key = str(unknown[0])
    choice = HydraConfig.get().runtime.choices.get(key) if HydraConfig.initialized() else None
    own_file = choice is not None and key not in ConfigStore.instance().repo  # (+unet=small: a group of ldm's)
    if own_file and key not in (cfg.get("model") or {}):  # experiment=mine, its file without the header
        raise configs.ConfigError(f"{key}={choice}: the file put its keys under a top-level {key!r}, which ldm-train "
                                  f"does not read: start {key}/{choice}.yaml with the line `# @package _global_`, as "
                                  f"conf/{key}/*.yaml do")
    if key in (cfg.get("model") or {}):
        value = cfg[key]
        leaves = flatten(OmegaConf.to_container(value), f"model.{key}") if isinstance(value, DictConfig) else {}
        if key in ConfigStore.instance().repo and len(leaves) != 1:  # +unet=small: a group of named values
            fix = f"{key}@model.{key}={choice or 'OPTION'} (a config group)"
        elif leaves:  # +diffusion.prediction=eps
            fix = " ".join(f"{path}={configs.override_value(leaf)}" for path, leaf in leaves.items())
        else:
            fix = f"model.{key}={configs.override_value(value)}"
        hint = f"model.{key} is where it acts: {fix}"
    else:
        close = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
        hint = f"did you mean {close[0]}?" if close else f"its keys are {list(TOP_LEVEL_KEYS)}"
    raise configs.ConfigError(f"{key}: ldm-train reads no top-level key {key!r} (added with +{key} or by a config "
                              f"file), so it would act on nothing; {hint}")


def import_target(target: str, key: str) -> Any:
    """The class or function a `_target_` names, or a ConfigError naming `key`: where a module imports but lacks a
    name (or a class an attribute), that name, with the closest one there (Hydra's reason read "not a package")."""
    hydra_log = logging.getLogger("hydra.utils")  # (it logs its own reason at ERROR before raising)
    level = hydra_log.level
    hydra_log.setLevel(logging.CRITICAL)
    try:
        return hydra.utils.get_object(target)
    except Exception as err:  # noqa: BLE001 -- an import's failure, whatever it raised
        cause = err.__cause__ or err
    finally:
        hydra_log.setLevel(level)
    parts = target.split(".")
    for i in range(len(parts) - 1, 0, -1):  # the longest prefix that is a module, then its attributes
        prefix = ".".join(parts[:i])
        try:
            obj = importlib.import_module(prefix)
        except ModuleNotFoundError as missing:
            if missing.name and (prefix + ".").startswith(missing.name + "."):  # no such module: a shorter prefix
                continue
            break  # it imports a module that is missing: its own error, below
        except Exception:  # noqa: BLE001 -- the module fails to import: its own error, below
            break
        for j in range(i, len(parts)):
            if not hasattr(obj, parts[j]):
                where = f"{'module ' if inspect.ismodule(obj) else ''}{'.'.join(parts[:j])}"
                close = difflib.get_close_matches(parts[j], [n for n in dir(obj) if not n.startswith("_")], n=1)
                hint = f": did you mean {'.'.join(parts[:j])}.{close[0]}?" if close else ""
                raise configs.ConfigError(f"{key}._target_={target}: {where} has no {parts[j]!r}{hint}")
            obj = getattr(obj, parts[j])
        break
    raise configs.ConfigError(f"{key}._target_={target} cannot be imported ({type(cause).__name__}: {cause})")


def typed_text(key: str) -> str | None:
    """The text the command line gave `key` (`1.10`, which Hydra reads as 1.1), unresolved; None when it gave none
    (or outside Hydra's main: a call from Python)."""
    try:
        task = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)
    except ValueError:
        return None
    typed = [value for name, _, value in (o.partition("=") for o in task) if name.lstrip("+~") == key]
    return typed[-1] if typed else None


def as_string(text: str | None, value: Any) -> str:
    """`value` in Hydra's quotes, as typed where the text is a plain word (`"1.10"`), else as an override writes it
    (a typed text that is quoted already or interpolates: `"42"` for `${seed}`)."""
    plain = text is not None and not text.startswith(("'", '"')) and "${" not in text
    return f'"{text if plain else configs.override_value(value)}"'


def list_items(text: str) -> list[str]:
    """The items of a typed Hydra list, `[a,'b,c',${seed}]` -> `a`, `'b,c'`, `${seed}`: split at its top-level
    commas, outside quotes and brackets."""
    items, current, depth, quote = [], "", 0, None
    for char in text[1:-1]:
        if quote is None and char == "," and depth == 0:
            items, current = [*items, current.strip()], ""
            continue
        current += char
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        else:
            depth += (char in "[{(") - (char in "]})")
    return [*items, current.strip()]


def check_string(key: str, value: Any) -> None:
    """Refuse a value Hydra read as a number or a list where a name is meant (`run_name=0.001`)."""
    if value is not None and not isinstance(value, str):
        quoted = f"{key}={as_string(typed_text(key), value)}"
        raise configs.ConfigError(f"{key}={value!r} must be a string (or null): Hydra reads it as "
                                  f"{type(value).__name__}; quote it, {shlex.quote(quoted)}")


def check_tags(key: str, tags: Any) -> None:
    """Refuse tags that are no list of strings: W&B splits a string into its letters (`tags=baseline`)."""
    if tags is None or isinstance(tags, ListConfig) and all(isinstance(tag, str) for tag in tags):
        return
    listed = list(tags) if isinstance(tags, ListConfig) else [tags]
    text = typed_text(key)  # each item as typed: `[v1.10,2.10]`, or a bare `1.10`
    items = list_items(text) if text and text.startswith("[") and text.endswith("]") else [text]
    if len(items) != len(listed):
        items = [None] * len(listed)
    words = ",".join(configs.hydra_quoted(tag) if isinstance(tag, str) else as_string(item, tag)
                     for tag, item in zip(listed, items, strict=True))
    raise configs.ConfigError(f"{key}={tags!r} must be a list of strings: {shlex.quote(f'{key}=[{words}]')}")


# WandbLogger's (and wandb.init's) arguments that W&B takes as strings alone; it refuses others at its first use, in
# pydantic's words, after the config tree (or, given a string, splits tags into letters or reads offline=maybe as true).
WANDB_STRINGS = ("project", "entity", "name", "id", "version", "group", "job_type", "notes", "save_dir", "dir",
                 "prefix")


def check_wandb_values(key: str, node: DictConfig) -> None:
    """Refuse `logger.NAME.KEY` values of a WandbLogger of the wrong type, naming the key."""
    for name in WANDB_STRINGS:
        if name in node:
            check_string(f"{key}.{name}", node.get(name))
    if "tags" in node:
        check_tags(f"{key}.tags", node.get("tags"))
    if "offline" in node and not isinstance(node.get("offline"), bool):
        raise configs.ConfigError(f"{key}.offline={node.get('offline')!r} must be true or false")
    if "log_model" in node and node.get("log_model") not in (False, True, "all"):
        raise configs.ConfigError(f"{key}.log_model={node.get('log_model')!r} must be false, true (the checkpoints at "
                                  f"the end) or all (each as it is saved)")


def check_components(cfg: DictConfig) -> None:
    """Raise ConfigError naming `logger.NAME.KEY` or `callbacks.NAME.KEY` for a class that does not import or a key
    its constructor does not take (a W&B key is checked against `wandb.init`, which WandbLogger passes the keys it
    does not know to, at its first use: after the config tree, at exit status 1, as a failed trial in a sweep)."""
    for group in ("logger", "callbacks"):
        for name, node in (cfg.get(group) or {}).items():
            if node is None:
                continue
            key = f"{group}.{name}"
            target = node.get("_target_") if isinstance(node, DictConfig) else None
            if not target:  # (`+callbacks.chekpoint.save_top_k=2`: a new entry beside the one meant)
                built = [n for n, v in cfg[group].items() if isinstance(v, DictConfig) and v.get("_target_")]
                close = difflib.get_close_matches(name, built, n=1)
                raise configs.ConfigError(f"{key} has no _target_ naming the class to build (or set {key}=null)"
                                          + (f": did you mean {group}.{close[0]}?" if close else ""))
            cls = import_target(target, key)
            kind, kind_name = COMPONENT_TYPES[group]
            if isinstance(cls, type) and not issubclass(cls, kind):  # (a factory function's result: when built)
                raise configs.ConfigError(f"{key}._target_={target} is not a {kind_name} (Lightning calls its "
                                          f"hooks): subclass it")
            if isinstance(cls, type):
                refuse_unsupported(key, cls)
            parameters = inspect.signature(cls).parameters
            accepted = {n for n, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
            open_ended = len(accepted) < len(parameters)
            if open_ended and isinstance(cls, type) and issubclass(cls, WandbLogger):
                import wandb

                accepted |= set(inspect.signature(wandb.init).parameters)
                open_ended = False
                check_wandb_values(key, node)
            unknown = [k for k in node if not str(k).startswith("_") and k not in accepted]
            if unknown and not open_ended:
                close = difflib.get_close_matches(str(unknown[0]), accepted, n=1)
                hint = f"did you mean {key}.{close[0]}?" if close else f"it takes {', '.join(sorted(accepted))}"
                raise configs.ConfigError(f"{key}.{unknown[0]} is not an argument of {target} ({hint}); fix or "
                                          f"remove it")


def checkpoint_damage(path: Path) -> str | None:
    """Why `path` cannot be a complete checkpoint, or None when it is whole.

    torch.save writes a zip archive (its directory at the end of the file, a CRC-32 for every member): a file cut
    short (or empty) fails to open as a zip, and one with damaged bytes inside fails its members' checksums, which
    `torch.load` never checks. This reads the whole file once (about 1 s per GB).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "no data.pkl inside: not a torch checkpoint"
            bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its CRC-32 checksum: the file's bytes were damaged"
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def saved_at(path: Path) -> tuple[bool, float]:
    """When a checkpoint was written, for ordering a run's checkpoints: (True, the time stored inside it as
    `ldm.saved_at`, which a copy keeps), else (False, the file's modification time), for checkpoints of older code
    or unreadable ones; those all count as older than any that stores its time (a run continued past an upgrade),
    since `cp -r` and most downloads reset modification times. Reads only the checkpoint's index: its tensors are
    memory-mapped, not read."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return True, float(checkpoint["ldm"]["saved_at"])
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, TypeError, pickle.UnpicklingError):
        return False, path.stat().st_mtime


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest intact checkpoint of a run by the time it was written (`saved_at`; `last.ckpt` first among equals),
    so that a `last.ckpt` older than the periodic ones (a run with `callbacks.checkpoint.save_last=false` after one
    stopped on a signal) does not win, and a run directory copied without its files' times resumes where it was; a
    damaged one is skipped for the next newest."""
    last = checkpoint_dir / "last.ckpt"
    candidates = sorted((p for p in checkpoint_dir.glob("*.ckpt") if p.is_file()),
                        key=lambda p: (*saved_at(p), p == last), reverse=True)
    damaged: list[Path] = []
    for path in candidates:
        damage = checkpoint_damage(path)
        if damage is not None:
            rank_zero_warn(f"skipping damaged checkpoint {path} ({damage})")
            damaged.append(path)
            continue
        if path != last:
            damage = None if last in damaged or not last.exists() else checkpoint_damage(last)  # unreadable: last
            why = "damaged" if last in damaged else "missing" if not last.exists() else \
                f"damaged ({damage})" if damage else "older"
            rank_zero_info(f"{last} is {why}; the newest intact checkpoint is {path}")
        return path
    return None


def remove_stale_temp_files(checkpoint_dir: Path) -> None:
    """Delete the temporary files of checkpoint writes that a killed run left behind (call only holding the run lock:
    no other process writes here then)."""
    for tmp in checkpoint_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        rank_zero_info(f"removed {tmp}, left by an interrupted checkpoint write")


def checkpoint_dir(cfg: DictConfig, output_dir: Path) -> Path:
    """Where the run's checkpoints go: `callbacks.checkpoint.dirpath`, else `<paths.output_dir>/checkpoints`."""
    dirpath = ((cfg.get("callbacks") or {}).get("checkpoint") or {}).get("dirpath")
    return Path(dirpath).expanduser() if dirpath else output_dir / "checkpoints"


def resolve_ckpt_path(ckpt_path: str | None, checkpoint_dir: Path, auto_resume: bool = False) -> str | None:
    """The checkpoint to resume from.

    `last` means the newest intact checkpoint in the run's `checkpoint_dir` (`last.ckpt`, or the newest periodic one
    when that is missing or damaged; none yet: start fresh); with `auto_resume` and no `ckpt_path`, the same,
    whenever there is one; any other path must exist (`~` expanded).
    """
    if ckpt_path is None or ckpt_path == "last":
        if ckpt_path is None and not auto_resume:
            return None
        newest = newest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
        if newest is None:
            if ckpt_path == "last" and not checkpoint_dir.is_dir() and not is_multirun():  # a new run directory:
                # a path mistyped, or relative to another working directory than the run's start, started over unsaid
                # (a sweep's jobs start so in a new sweep folder)
                rank_zero_warn(f"ckpt_path=last: {checkpoint_dir} does not exist (working directory {os.getcwd()}), "
                               f"so this starts from scratch; to resume a run, set paths.output_dir to its folder")
            elif ckpt_path == "last":
                rank_zero_info(f"ckpt_path=last: no checkpoint in {checkpoint_dir} yet, starting from scratch")
            return None
        rank_zero_info(f"{'auto_resume' if ckpt_path is None else 'ckpt_path=last'}: resuming from {newest}")
        return str(newest)
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; pass an existing checkpoint, "
                                f"ckpt_path=last to resume the run in paths.output_dir, or ckpt_path=null")
    load_checkpoint(path, "ckpt_path")  # before anything is built: a file carrying code or a torn one is refused
    return str(path)


def check_no_earlier_run(checkpoint_dir: Path) -> None:
    """Refuse a fresh start (`auto_resume=false`) where an earlier run's intact checkpoints are: its logs, checkpoints
    and export would be mixed with this run's."""
    newest = newest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if newest is not None:
        raise configs.ConfigError(f"{checkpoint_dir} holds the checkpoints of an earlier run (newest: {newest.name}); "
                                  f"a fresh start there would mix two runs' checkpoints, logs and export: resume it "
                                  f"(auto_resume=true, the default, or ckpt_path=last), or start afresh in another "
                                  f"paths.output_dir")


def shapeless_changes(written: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Architecture settings (flattened model configs) that change what a network computes without changing its
    weights' shapes, where `wanted` differs from `written`: a resume with them would fit the state dict and silently
    train another network. GroupNorm groups; attention heads as each attended width gets them (num_heads or
    head_dim: either way to the same heads is the same network); a byte text encoder's heads. None for a run of
    `model.init_from`, whose layout is the source weights' (older code recorded the command's unused keys)."""
    if written.get("model.init_from"):
        return []
    keys = ["model.unet.norm_groups", "model.net.norm_groups", "model.text.num_heads", "model.image.norm_groups"]
    if wanted.get("model.conditioner.kind") == "byte" == written.get("model.conditioner.kind"):
        keys.append("model.conditioner.num_heads")  # (a pretrained one's must equal its export's: checked at build)
    changed = [f"{k}: {written[k]!r} there, {wanted.get(k)!r} here" for k in keys
               if k in written and written[k] != wanted.get(k)]

    def heads(model: dict[str, Any]) -> list[int] | None:
        unet = {**dataclasses.asdict(UNetConfig()), **{k.removeprefix("model.unet."): v for k, v in model.items()
                                                      if k.startswith("model.unet.")}}  # older configs: defaults
        try:
            widths = [unet["model_channels"] * unet["channel_mult"][level] for level in unet["attention_levels"]]
            if unet["mid_attention"]:
                widths.append(unet["model_channels"] * unet["channel_mult"][-1])
            return [unet["num_heads"] or width // unet["head_dim"] for width in widths]
        except (TypeError, IndexError, ZeroDivisionError):
            return None

    there, here = heads(written), heads(wanted)
    if "model.unet.model_channels" in written and there != here:
        changed.append(f"attention heads per attended width: {there} there, {here} here "
                       f"(model.unet.num_heads / head_dim)")
    return changed


def check_checkpoint_fits(module: L.LightningModule, checkpoint: dict[str, Any], ckpt_path: str,
                          model_cfg: DictConfig) -> None:
    """Refuse, naming the difference, a checkpoint (read from `ckpt_path`) whose weights do not fit `module` (another
    kind of model, or the same one with another architecture), before Lightning's restore fails on it with a page of
    state-dict keys."""
    state, own = checkpoint.get("state_dict") or {}, module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    advice = "Resume with the config that wrote it, or start afresh in another paths.output_dir"
    written = flatten(((checkpoint.get("ldm") or {}).get("config") or {}).get("model") or {}, "model")
    wanted = flatten(OmegaConf.to_container(model_cfg, resolve=True), "model")
    if not (missing or unexpected or resized):
        if changed := shapeless_changes(written, wanted):
            raise configs.ConfigError(f"ckpt_path={ckpt_path}: its weights fit this model's shapes, but its network "
                                      f"differs in {changed} (what the weights compute, not their shapes). {advice}")
        return
    if written.get("model._target_") not in (None, wanted.get("model._target_")):
        raise configs.ConfigError(f"ckpt_path={ckpt_path} is a checkpoint of {written['model._target_']}, but this "
                                  f"config trains {wanted.get('model._target_')}. {advice}")
    differing = [f"{k}: {written.get(k)!r} there, {wanted.get(k)!r} here"
                 for k in sorted(written.keys() | wanted.keys()) if written.get(k) != wanted.get(k)]
    found = "; ".join(f"{what} {keys[:3]}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                                ("other shapes", resized)) if keys)
    raise configs.ConfigError(f"ckpt_path={ckpt_path} does not fit the model this config builds ({found}). "
                              + (f"Its run's model config differs in {differing[:5]}. " if differing else "")
                              + advice)


# The keys a multirun varies, which `HandSweptKeys` hands to the jobs (in-process or launched, they inherit it).
SWEPT_ENV = "LDM_SWEPT_KEYS"


def swept_keys(config: DictConfig) -> list[str]:
    """The keys a multirun varies: the sweeper's `params` (Optuna's search space, a grid's values) and the command
    line's sweeps (`model.lr=1e-4,1e-3`, `choice(...)`, `interval(...)`), less those the command line fixes."""
    parser = OverridesParser.create()
    params = config.hydra.sweeper.get("params")
    lines = [*(f"{key}={value}" for key, value in (OmegaConf.to_container(params, resolve=False) if params else {}
                                                   ).items()),
             *OmegaConf.to_container(config.hydra.overrides.task, resolve=False)]  # (`${hydra:job.num}`: no job yet)
    swept: dict[str, bool] = {}
    for line in lines:
        try:
            override = parser.parse_override(line)
        except HydraException:
            continue
        swept[override.get_key_element().lstrip("+~")] = override.is_sweep_override()  # the command line wins
    return sorted(key for key, sweep in swept.items() if sweep)


class HandSweptKeys(Callback):
    """A Hydra callback (conf/train.yaml): hands the keys the multirun varies to its jobs, so that a job refused for
    its own value of one fails alone, and a mistake in the command (which every job would meet) stops the sweep."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEPT_ENV] = "[]"  # (not an earlier sweep's of this process, should the keys fail to parse)
        os.environ[SWEPT_ENV] = json.dumps(swept_keys(config))


SWEEP_ID_ENV = "LDM_SWEEP_ID"  # this multirun's id, handed to its jobs (`SweepSummary`)
JOB_STATUS_FILE = "sweep_job.json"  # in a multirun job's run directory: its sweep's id, its number, its error


class SweepSummary(Callback):
    """A Hydra callback (conf/train.yaml): at the end of a multirun, one line naming the jobs that failed (each job
    goes on past another's failure, `main`), and exit status 1 when none of a grid's completed: `ldm-train -m ... &&
    ldm-eval` went on after a grid whose every job had diverged, the command's status 0. Each job writes its status
    in its run directory (`record_job`), which the launchers that run jobs in processes of their own reach too; a
    folder of an earlier sweep into the same directory holds another sweep's id."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ID_ENV] = uuid.uuid4().hex

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        statuses = []
        for path in Path(config.hydra.sweep.dir).rglob(JOB_STATUS_FILE):
            with contextlib.suppress(OSError, ValueError):
                status = json.loads(path.read_text())
                if isinstance(status, dict) and status.get("sweep") == os.environ.get(SWEEP_ID_ENV):
                    statuses.append((status.get("job", 0), path.parent, status.get("error")))
        failed = sorted((job, folder, error) for job, folder, error in statuses if error is not None)
        if not failed:
            return
        print(f"ldm-train: {len(failed)} of {len(statuses)} jobs of the sweep failed: "
              + "; ".join(f"{folder} ({error})" for _, folder, error in failed), file=sys.stderr, flush=True)
        # (an Optuna study continued by this sweep may hold completed trials: it fails when none is, at its end)
        study = "optuna" in str(OmegaConf.select(config, "hydra.sweeper._target_") or "").lower()
        if len(failed) == len(statuses) and not study:
            raise SweepFailed(EXIT_FAILURE)


def record_job(error: str | None) -> None:
    """This multirun job's status for its sweep's summary (`SweepSummary`): started (`error` None), or failed."""
    status = {"sweep": os.environ.get(SWEEP_ID_ENV), "job": HydraConfig.get().job.num,
              "error": None if error is None else " ".join(error.split())}
    with contextlib.suppress(OSError):
        atomic_write_text(json.dumps(status) + "\n", Path(HydraConfig.get().runtime.output_dir, JOB_STATUS_FILE))


def names_swept_key(message: str) -> bool:
    """Whether an error `message` names a key the sweep varies: in full (`model.lr=`), or by its last part with a
    value (`head_dim=12` for model.unet.head_dim): a job's own value that the model refuses, whose job fails
    alone."""
    keys = json.loads(os.environ.get(SWEPT_ENV) or "[]")
    return any(re.search(rf"(?<![\w.]){re.escape(name)}=", message)
               for key in keys for name in (key, key.rsplit(".", 1)[-1]))


# A stop signal that came at the end of a multirun job, which finished: the next job of the sweep ends it.
SWEEP_STOP: list[signal.Signals] = []

# Keys a resumed run may change from the command line (a longer schedule; what is reported and logged, not what is
# trained); check_same_job does not compare them, nor keys under the `RESUME_MAY_CHANGE_UNDER` nodes.
RESUME_MAY_CHANGE = ("trainer.max_steps", "trainer.max_epochs", "trainer.max_time", "ckpt_path", "auto_resume",
                     "optimized_metric", "trainer.log_every_n_steps", "trainer.enable_progress_bar")
RESUME_MAY_CHANGE_UNDER = ("logger.", "callbacks.progress.")


def check_same_job(checkpoint: dict[str, Any], ckpt_path: str, cfg: DictConfig) -> None:
    """Refuse to resume, in a multirun job, a checkpoint whose run had other values for this job's command-line
    overrides: another sweep's job of the same number. A sweep run again into the same `hydra.sweep.dir` numbers its
    jobs from 0 again, so job 0 of an Optuna study continued there holds new parameters, and resuming would train
    the earlier trial's model under the new trial's name. (The same grid run again resumes its jobs.)"""
    written = (checkpoint.get("ldm") or {}).get("config")
    if not isinstance(written, dict):
        return
    written = OmegaConf.create(written)
    differing = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or key.startswith(("hydra.", *RESUME_MAY_CHANGE_UNDER)) or key in RESUME_MAY_CHANGE:
            continue
        here, there = OmegaConf.select(cfg, key), OmegaConf.select(written, key)
        if isinstance(here, DictConfig) or isinstance(there, DictConfig):
            continue  # a config group (trainer=ddp_cpu) or a whole node; its leaves are compared where overridden
        here, there = (OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for v in (here, there))
        if isinstance(here, str) and Path(here).is_absolute() and isinstance(there, str) and there != here:
            there = absolute_if_local(there)  # a local path older code recorded as given, not absolute
        if here != there:
            differing.append(f"{key}: {there!r} there, {here!r} here")
    if differing:
        raise configs.ConfigError(
            f"{ckpt_path} was written by another job with this sweep directory and job number "
            f"({HydraConfig.get().job.num}), whose run differs in {'; '.join(differing[:5])}. A sweep run again into "
            f"the same hydra.sweep.dir numbers its jobs from 0 again: continue an Optuna study (or run another grid) "
            f"in a new hydra.sweep.dir (the default is a new timestamped one)")


def check_checkpoint_trainer(checkpoint: dict[str, Any], ckpt_path: str, trainer_cfg: DictConfig) -> None:
    """Refuse to resume what Lightning would continue wrongly under these trainer settings:

    - under FSDP a checkpoint written without it: Lightning's FSDP restore maps the optimizer state by the position
      of each parameter among all the module's (frozen autoencoder included), DDP's and a single process's by its
      position in the optimizer, and stops with a bare KeyError. (FSDP to DDP works.)
    - with another `accumulate_grad_batches` k, from a position within the epoch that is not a whole number of
      k-batch steps: Lightning's restart then counted the logged steps one behind `global_step` (two rows of one
      step) and made the first step of fewer batches, its gradient still divided by k.
    - with another validation schedule that has no validation at the batch, from a checkpoint saved after the
      validation of an epoch's last batch (a stop signal's second save, or checkpoints at each validation):
      Lightning's restart reads from the schedule whether that validation ran, and trained on in the old epoch (the
      next epoch's first batch twice, one step logged twice).
    """
    written = ((checkpoint.get("ldm") or {}).get("config") or {}).get("trainer") or {}
    accumulate, before = trainer_cfg.get("accumulate_grad_batches") or 1, written.get("accumulate_grad_batches")
    progress = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.batch_progress") or {})
    current = progress.get("current") or {}
    # note: at an epoch's last batch the next epoch starts from 0
    position = 0 if progress.get("is_last_batch") else current.get("ready", 0)
    if before is not None and accumulate != before and position % accumulate:
        raise configs.ConfigError(f"trainer.accumulate_grad_batches={accumulate}, where ckpt_path={ckpt_path} was "
                                  f"written with {before} at {position} batches into its epoch, not a whole number of "
                                  f"{accumulate}-batch steps (Lightning would log the steps from there one behind and "
                                  f"make the first step shorter): resume with trainer.accumulate_grad_batches="
                                  f"{before} (or a divisor of {position}); another value can start from a checkpoint "
                                  f"written at an epoch's end")
    schedule = [f"trainer.{key}={trainer_cfg.get(key)!r} (written with {written[key]!r})"
                for key in ("val_check_interval", "check_val_every_n_epoch")
                if key in written and trainer_cfg.get(key) != written[key]]
    interval, per_epoch = trainer_cfg.get("val_check_interval"), trainer_cfg.get("check_val_every_n_epoch")
    # Lightning's test at an epoch's last batch: the epoch's end (an interval of 1.0), or (batch index + 1) % interval
    # == 0, the index in the epoch, or in the run without check_val_every_n_epoch
    batches = current.get("ready", 0) if per_epoch is not None else (progress.get("total") or {}).get("ready", 0)
    due = batches % interval == 0 if configs.is_int(interval) else interval in (None, 1.0)
    if progress.get("is_last_batch") and current.get("completed") == current.get("ready") and schedule and \
            (not due or per_epoch != written.get("check_val_every_n_epoch", per_epoch)):
        raise configs.ConfigError(f"{'; '.join(schedule)}: ckpt_path={ckpt_path} was saved after the validation of "
                                  f"its epoch's last batch, and Lightning tells from the validation schedule whether "
                                  f"that validation ran (under another it trains on in the old epoch: a batch twice, "
                                  f"a step logged twice). Resume with the schedule it was written with, or from a "
                                  f"checkpoint saved at a batch's end (callbacks.checkpoint.every_n_train_steps)")
    if "fsdp" not in strategy_name(trainer_cfg.get("strategy")).lower():
        return
    if "strategy" in written and "fsdp" not in strategy_name(written["strategy"]).lower():
        name = strategy_name(written["strategy"]) or "auto"
        instead = "trainer=ddp" if "ddp" in name.lower() else "the single-process trainer that wrote it (trainer=gpu)"
        raise configs.ConfigError(f"ckpt_path={ckpt_path} was written by trainer.strategy={name} (not FSDP), whose "
                                  f"optimizer state FSDP cannot restore: continue it with {instead}, or start the "
                                  f"FSDP run afresh in another paths.output_dir")


def flatten(node: Any, prefix: str) -> dict[str, Any]:
    """{"a.b.c": leaf} for a nested dict."""
    if not isinstance(node, dict):
        return {prefix: node}
    return {k: v for key, child in node.items() for k, v in flatten(child, f"{prefix}.{key}").items()}


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Close W&B runs with the right exit status and say how to upload offline runs."""
    for logger in loggers:
        # note: wandb.run is the run this process started (the logger starts it on first use), None if none was
        if isinstance(logger, WandbLogger) and (run := wandb_run()) is not None:
            offline = bool(getattr(run, "offline", False))  # note: settings.mode reads "dryrun" for offline=true
            run_dir, run_id = Path(run.dir).parent, run.id
            run.finish(exit_code=exit_code)
            if offline:
                # A resumed run (same id) writes a new offline folder per segment; wandb sync uploads the folders of
                # one run id in the order they started, into one run.
                segments = sorted(run_dir.parent.glob(f"offline-run-*-{run_id}"))
                if len(segments) > 1:
                    rank_zero_info(f"W&B run saved offline in {len(segments)} folders, one per segment of the resumed "
                                   f"run; upload them with: wandb sync "
                                   f"{shlex.quote(str(run_dir.parent))}/offline-run-*-{run_id}")
                else:
                    rank_zero_info(f"W&B run saved offline in {run_dir}; upload it with: wandb sync "
                                   f"{shlex.quote(str(run_dir))}")


def wandb_run() -> Any:
    """The W&B run this process has started, or None (also when wandb is not installed)."""
    try:
        import wandb
    except ImportError:
        return None
    return wandb.run


def apply_backend_switches(cfg: DictConfig) -> None:
    """`tf32`: TensorFloat-32 matmuls and convolutions on Ampere and newer GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")


def apply_ddp_needs(cfg: DictConfig) -> None:
    """`trainer.strategy.find_unused_parameters=true` under DDP when the model's class says its training step leaves
    parameters without gradients (`ddp_find_unused_parameters`, e.g. a GAN's two backward passes): with false DDP
    stops at the second step ("parameters that were not used in producing the loss"). A strategy given by its
    registry name (`trainer.strategy=ddp`, ...) becomes its `_find_unused_parameters_true` variant, and
    `auto` over several processes (`trainer.devices=2`, where Lightning would choose DDP) `ddp` with the search."""
    strategy = cfg.trainer.get("strategy")
    name = strategy_name(strategy)
    target = cfg.model.get("_target_")
    if not target or not getattr(hydra.utils.get_class(target), "ddp_find_unused_parameters", False):
        return
    if isinstance(strategy, DictConfig) and name.endswith("DDPStrategy") and not strategy.get("find_unused_parameters"):
        with open_dict(strategy):
            strategy.find_unused_parameters = True
    elif isinstance(strategy, str) and name.startswith("ddp") and not name.endswith("_find_unused_parameters_true"):
        cfg.trainer.strategy = name.removesuffix("_find_unused_parameters_false") + "_find_unused_parameters_true"
    elif name in ("", "auto") and process_count(cfg.trainer) > 1:
        with open_dict(cfg.trainer):
            cfg.trainer.strategy = "ddp_find_unused_parameters_true"
    else:
        return
    rank_zero_info(f"trainer.strategy.find_unused_parameters=true: {target.rsplit('.', 1)[-1]} leaves "
                   f"parameters without gradients in some backward passes")


def apply_module_switches(module: L.LightningModule, cfg: DictConfig) -> None:
    """`channels_last` converts the module's 4-D weights; `compile` calls the module's `compile_networks()`, which
    compiles its trainable networks in place (`nn.Module.compile()`, state-dict keys unchanged)."""
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    if not cfg.compile:
        return
    if not callable(getattr(module, "compile_networks", None)):
        raise configs.ConfigError(f"compile=true but {type(module).__name__} has no compile_networks() method; set "
                                  f"compile=false")
    module.compile_networks()


def describe_batch_and_lr(cfg: DictConfig, trainer: L.Trainer) -> str:
    """The global batch size and learning rate(s) as configured; nothing here is rescaled."""
    accumulate = int(cfg.trainer.get("accumulate_grad_batches") or 1)
    per_device = int(cfg.data.batch_size)
    rates = {key: cfg.model[key] for key in ("lr", "disc_lr") if cfg.model.get(key) is not None}
    lr_text = ", ".join(f"model.{k}={v}" for k, v in rates.items()) or "set by the model"
    return (f"global batch size {per_device * trainer.world_size * accumulate} = data.batch_size {per_device} x "
            f"{trainer.world_size} processes ({trainer.num_nodes} nodes) x {accumulate} accumulation steps; "
            f"learning rate {lr_text}, used as given (never rescaled with the batch size)")


def trainer_plugins() -> list[Any]:
    """Atomic checkpoint writes, and, inside a SLURM job, Lightning's own requeue switched off.

    `ldm.slurm.SlurmRequeue` (a callback) owns requeueing; see that module for why Lightning's is not used.
    """
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return plugins


def build_trainer(cfg: DictConfig, callbacks: list[L.Callback], loggers: list[Logger], **overrides: Any) -> L.Trainer:
    """The Trainer of `cfg.trainer`, with these callbacks and loggers and `trainer_plugins()`.

    The progress bar is the `callbacks.progress` entry: with it nulled (or `trainer.enable_progress_bar=false`) the run
    has none, where Lightning would add its default rich bar, redrawn up to 100 times a second (10% of a 2-thread CPU
    step in the quickstart; benchmarks/RESULTS.md). Without loggers (`logger=none`, `debug=fast_dev_run`) the
    learning-rate monitor, which Lightning refuses then, is left out.
    """
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [cb for cb in callbacks if not isinstance(cb, ProgressBar)]
    if not loggers:
        callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
    overrides.setdefault("enable_progress_bar", any(isinstance(cb, ProgressBar) for cb in callbacks))
    plugins = trainer_plugins()
    if cfg.trainer.get("plugins") is not None:  # the user's own (`+trainer.plugins=[...]`), beside ours
        given = hydra.utils.instantiate(cfg.trainer.plugins)
        plugins += list(given) if isinstance(given, (list, tuple, ListConfig)) else [given]
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins,
                                   **overrides)


def is_multirun() -> bool:
    """True inside a Hydra multirun (-m) job."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch(trainer: L.Trainer) -> None:
    """Refuse what cannot work: several nodes in a process started with no cluster around it (no srun, torchrun or
    MASTER_ADDR: it would wait for the other nodes for good), and Lightning starting DDP processes itself inside a
    multirun job.

    Lightning starts the other ranks by re-running the command line, which a multirun job does not have. With
    `hydra/launcher=slurm` srun starts every rank instead (the cluster environment creates the processes).
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if trainer.num_nodes > 1 and environment is not None and not environment.creates_processes_externally \
            and not os.environ.get("MASTER_ADDR") and os.environ.get("NODE_RANK") != "0":  # (node 0 may leave it)
        raise configs.ConfigError(f"trainer.num_nodes={trainer.num_nodes}, but this process was started with no "
                                  f"cluster around it (SLURM's srun, torchrun, or NODE_RANK set on each node and "
                                  f"MASTER_ADDR, node 0's address, on the others): it would wait for the other nodes "
                                  f"for good; launch one process per node (README: Several nodes), or set "
                                  f"trainer.num_nodes=1")
    if is_multirun() and trainer.world_size > 1 and environment is not None \
            and not environment.creates_processes_externally:
        raise configs.ConfigError(f"trainer with {trainer.world_size} processes inside a multirun (-m): Lightning "
                                  f"cannot start DDP processes from a sweep job on one machine; run each "
                                  f"configuration as its own command, or sweep with hydra/launcher=slurm and "
                                  f"hydra.launcher.tasks_per_node=trainer.devices")


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError for what `cfg` gets wrong that can be told before anything is built or written: the seed,
    the Trainer's arguments, the data and model nodes, the loggers' and callbacks' keys, ckpt_path."""
    seed = cfg.get("seed")
    if not configs.is_int(seed) or not 0 <= seed < 2**32:
        raise configs.ConfigError(f"seed={seed!r} must be an integer in [0, 2**32), e.g. seed=42")
    check_top_level_keys(cfg)
    for key in ("auto_resume", "compile", "tf32", "channels_last"):  # (Hydra passes `off`, `no` on as strings)
        if key in cfg and not isinstance(cfg.get(key), bool):
            raise configs.ConfigError(f"{key}={cfg.get(key)!r} must be true or false")
    check_string("run_name", cfg.get("run_name"))
    check_tags("tags", cfg.get("tags"))
    try:  # every node, the ones Hydra instantiates without a schema (callbacks, loggers, trainer) too
        configs.refuse_nan(OmegaConf.to_container(cfg, resolve=True))
    except OmegaConfBaseException:
        pass  # a missing value or a broken interpolation: the checks below name it
    check_trainer(cfg.get("trainer"), (cfg.get("model") or {}).get("_target_"), bool(cfg.get("compile")),
                  bool(cfg.get("channels_last")))
    check_nodes(cfg, ("data", "model"))
    model = cfg.get("model")
    if isinstance(model, DictConfig) and "lr_decay_steps" in model:  # the modules take it where they train
        from ldm.modules.optim import check_decay_steps

        check_decay_steps(model.get("lr_schedule", "constant"), model.lr_decay_steps)
    check_components(cfg)
    if is_multirun():  # each job runs in hydra.sweep.dir/N
        key, parent, where = "hydra.sweep.dir", "multirun/", Path(HydraConfig.get().runtime.output_dir).parent
        stated = OmegaConf.to_container(HydraConfig.get().sweep, resolve=False).get("dir")
    else:
        key, parent, where = "paths.output_dir", "", cfg.paths.output_dir if "paths" in cfg else None
        stated = OmegaConf.to_container(cfg.paths, resolve=False).get("output_dir") if "paths" in cfg else None
    nodes = (cfg.get("trainer") or {}).get("num_nodes") or 1
    started_apart = os.environ.get("TORCHELASTIC_RUN_ID") and int(os.environ.get("WORLD_SIZE") or 1) > 1 or \
        int(os.environ.get("SLURM_NTASKS") or 1) > 1 or \
        configs.is_int(nodes) and nodes > 1 and int(os.environ.get("LOCAL_RANK") or 0) == 0  # (Lightning's own
    if started_apart and not is_multirun() and "${now:" in str(stated):  # ranks get their launcher's folder)
        raise configs.ConfigError(f"paths.output_dir is a new timestamped directory ({where}), which each process "
                                  f"started apart (torchrun's ranks, srun's tasks, each node's) resolves on its own, "
                                  f"at its own second: they would split the run over several folders; set "
                                  f"paths.output_dir to one folder for the run that every process sees (under SLURM: "
                                  f"paths=slurm)")
    if cfg.get("ckpt_path") == "last" and "${now:" in str(stated):  # the default: a new directory every run
        raise configs.ConfigError(f"ckpt_path=last resumes the run in {key}, but that is a new timestamped "
                                  f"directory ({where}); set {key} to the run to resume (e.g. "
                                  f"{key}=runs/{cfg.get('task_name')}/{parent}<date>)")
    if cfg.trainer.get("fast_dev_run") and cfg.get("ckpt_path") is not None:
        raise configs.ConfigError(f"debug=fast_dev_run (trainer.fast_dev_run) checks the wiring on one batch of "
                                  f"fresh weights; ckpt_path={cfg.ckpt_path} would restore a run past that batch and "
                                  f"check nothing: leave ckpt_path out")
    if cfg.get("ckpt_path") not in (None, "last"):
        try:
            path = Path(resolve_ckpt_path(cfg.ckpt_path, Path()))  # must exist
        except FileNotFoundError as err:  # a ConfigError: a sweep stops at it instead of failing every trial
            raise configs.ConfigError(str(err)) from None
        damage = checkpoint_damage(path)
        if damage is not None:
            raise configs.ConfigError(f"ckpt_path={cfg.ckpt_path} is not a readable checkpoint ({damage}); pass an "
                                      f"intact one, or ckpt_path=last for the newest intact checkpoint of "
                                      f"paths.output_dir")


def warn_stale_optimized_metric(cfg: DictConfig) -> None:
    """Say when `optimized_metric` (a validation metric, what a sweep ranks the run by) will come from a validation
    before the run's last step: the final weights are not the ones scored."""
    metric, trainer = cfg.get("optimized_metric"), cfg.get("trainer") or {}
    interval, steps = trainer.get("val_check_interval"), trainer.get("max_steps")
    if not str(metric or "").startswith("val/") or trainer.get("check_val_every_n_epoch") is not None \
            or not configs.is_int(interval) or not configs.is_int(steps) or steps <= 0 \
            or trainer.get("limit_val_batches") == 0:
        return
    batches = steps * (trainer.get("accumulate_grad_batches") or 1)  # (Lightning's interval counts batches)
    last = batches - batches % interval  # the last batch Lightning validates after (none before the first)
    if 0 < last < batches:
        rank_zero_warn(f"optimized_metric={metric} will be the last validation's, after batch {last} of {batches} "
                       f"(trainer.val_check_interval={interval}), not the final weights': make trainer.max_steps a "
                       f"multiple of the interval to score the run's result")


def train(cfg: DictConfig) -> dict[str, float]:
    """Check `cfg` (`check_config`), build everything from it, fit with validation, and return the final logged
    metrics.

    Raises:
        RunDirectoryLocked: another live ldm-train uses `paths.output_dir`.
    """
    check_config(cfg)
    output_dir = resolve_output_dir(cfg)
    requeue = (cfg.get("callbacks") or {}).get("slurm_requeue") or {}
    with process_state_kept(), requeue_signal_held(requeue.get("signal_name", "USR1") if requeue else None) as held:
        try:
            with run_lock(output_dir) as lock, lightning_into_run_log(output_dir):
                if lock is not None:
                    remove_stale_temp_files(checkpoint_dir(cfg, output_dir))
                return _train(cfg, output_dir)
        finally:
            if held and is_multirun():  # held outside fit and never acted on: the sweep stops before its next job
                SWEEP_STOP.append(held[0])


@contextlib.contextmanager
def process_state_kept() -> Iterator[None]:
    """What a run changes in its process, put back when it ends, however it ends (for the next run of a notebook or
    a script): the stop signals' handlers (a Ctrl-C early in fit left SIGINT ignored, Lightning's doing; after a
    failed fit Lightning reinstalled the run's own, which held its Trainer and model for good), W&B's mode (the
    logger of an offline run sets WANDB_MODE=dryrun, and every later run went offline) and the float32 matmul
    switches of `apply_backend_switches`. Lightning's exit after a Ctrl-C (status 1) is a KeyboardInterrupt again."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)} \
        if main else {}
    wandb_mode = os.environ.get("WANDB_MODE")
    matmul = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
              torch.backends.cudnn.allow_tf32)
    try:
        yield
    except SystemExit as exit_:
        if isinstance(exit_.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise
    finally:
        for signum, handler in handlers.items():
            if handler is not None:  # (None: installed outside Python, which cannot be put back)
                signal.signal(signum, handler)
        if wandb_mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = wandb_mode
        torch.set_float32_matmul_precision(matmul[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul[1:]


@contextlib.contextmanager
def lightning_into_run_log(output_dir: Path) -> Iterator[None]:
    """Lightning's messages (resumed from, stopped and saved at, exported to: `rank_zero_info`) and every warning go
    to the run's log file (train.log, in `output_dir`) too, not only to the terminal: Lightning's logger keeps a
    terminal handler of its own and does not pass records on to the root logger, whose file handler Hydra set up;
    warnings are printed by `warnings`, not logged. Without a file handler of the root logger in `output_dir` (a call
    from Python; one left by an earlier job of the process is another run's) nothing changes."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)
             and os.path.dirname(os.path.abspath(h.baseFilename)) == os.path.abspath(output_dir)]  # (`..` folded)
    lightning = logging.getLogger("lightning.pytorch")
    added = [] if lightning.propagate else [h for h in files if h not in lightning.handlers]
    for handler in added:
        lightning.addHandler(handler)
    capture = files and warnings.showwarning.__module__ != "logging"  # (not captured already: the user's to keep)
    if capture:
        logging.captureWarnings(True)  # (they reach the terminal through the root logger's handler)
    try:
        yield
    finally:
        for handler in added:
            lightning.removeHandler(handler)
        if capture:
            logging.captureWarnings(False)


def _train(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    L.seed_everything(cfg.seed, workers=True)
    apply_backend_switches(cfg)
    apply_ddp_needs(cfg)
    print_config_tree(cfg, order=("experiment", "model", "data", "trainer", "logger", "callbacks", "paths"))
    # a wiring check (one batch of each, nothing written: debug=fast_dev_run) resumes no run in the directory
    dev_run = bool(cfg.trainer.get("fast_dev_run"))
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), checkpoint_dir(cfg, output_dir),
                                  auto_resume=bool(cfg.get("auto_resume")) and not dev_run)
    if ckpt_path is None and not dev_run:
        check_no_earlier_run(checkpoint_dir(cfg, output_dir))

    datamodule = configs.instantiate(cfg.data, "data")
    module = configs.instantiate(cfg.model, "model")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if dataclasses.is_dataclass(getattr(module, "config", None)):  # what it built: model.init_from's layout, paths
        resolved["model"] = {"_target_": resolved["model"]["_target_"], **configs.asdict(module.config)}
    built = OmegaConf.create(resolved)  # what checkpoints and config.yaml record, and resumes are compared with
    if callable(getattr(module, "check_data", None)):
        module.check_data(datamodule)  # the data's size: before config.yaml is written (the fit checks it again)
    if ckpt_path is not None:  # checked before config.yaml is written: a refused resume leaves the run's own
        checkpoint = load_checkpoint(ckpt_path, "ckpt_path")  # memory-mapped: reads no tensor data
        check_checkpoint_fits(module, checkpoint, ckpt_path, built.model)
        check_checkpoint_trainer(checkpoint, ckpt_path, cfg.trainer)
        if callable(getattr(module, "check_resume", None)):
            module.check_resume(checkpoint)
        if callable(getattr(datamodule, "check_resume", None)):
            datamodule.check_resume(checkpoint, process_count(cfg.trainer))
        if is_multirun() and cfg.get("ckpt_path") in (None, "last"):
            check_same_job(checkpoint, ckpt_path, built)  # found in the job's checkpoints (auto_resume, last)
    finished = ckpt_path is not None and 0 <= cfg.trainer.get("max_steps", -1) <= checkpoint.get("global_step", -1)
    if finished:  # (the fit trains nothing; the export stays too: `stopped_without_export`)
        rank_zero_info(f"{ckpt_path} is at step {checkpoint['global_step']}, trainer.max_steps="
                       f"{cfg.trainer.max_steps}: nothing is left to train, and config.yaml and the logs stay as the "
                       f"run wrote them (raise trainer.max_steps to train on)")
    elif not dev_run:
        save_config(built, output_dir)
    apply_module_switches(module, cfg)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    for callback in callbacks:
        if isinstance(callback, Checkpoint):
            val_shards = (resolved.get("data") or {}).get("val_shards")  # absolute: ldm-eval may run elsewhere
            callback.run_info = {"ldm_version": __version__, "config": resolved,
                                 "val_shards": val_shards and absolute_spec(val_shards)}
    # a wiring check logs into no run; a finished one logs nothing more (its hyperparameters stay as they were)
    loggers = [] if dev_run or finished else instantiate_loggers(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    check_launch(trainer)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    rank_zero_info(describe_batch_and_lr(cfg, trainer))
    warn_stale_optimized_metric(cfg)

    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)  # never runs pickled code
    except SIGTERMException:
        # note: Lightning's own SIGTERM handler (active until training starts, when ldm.slurm.SlurmRequeue takes the
        # signal over) ends fit with this exception; when the callback has saved last.ckpt, the run stopped as asked.
        if not run_stopped(trainer):
            finish_loggers(loggers, exit_code=1)
            raise SystemExit(128 + signal.SIGTERM) from None  # killed by SIGTERM before anything was saved
    except BaseException:
        finish_loggers(loggers, exit_code=1)
        raise
    finally:
        # note: as torch asks, before the interpreter exits: a gloo process group left to its destructors at exit
        # once aborted a finished run ("terminate called without an active exception", exit -6)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    halted = [cb.message for cb in callbacks if getattr(cb, "halted", False)]
    finish_loggers(loggers, exit_code=1 if halted else 0)
    if halted:
        raise TrainingDiverged(halted[0])
    interrupted = run_interrupted(trainer)
    if interrupted is not None and is_multirun():
        # note: the metrics of a trial stopped part-way are a part-trained model's; returned, the sweeper would take
        # them for the trial's result (Optuna: a complete trial), and the sweep would go on as if not asked to stop
        rank_zero_info(f"{interrupted.name}: the sweep stops; this job ({output_dir}) has no result (its last.ckpt "
                       f"holds step {trainer.global_step})")
        raise SystemExit(128 + interrupted)
    if (late := run_interrupted(trainer, at_end=True)) is not None and is_multirun():
        # the job finished: its result goes to the sweeper, and the next job of this process ends the sweep
        SWEEP_STOP.append(late)
        rank_zero_info(f"{late.name} at the end of this job: its result is reported; the sweep stops before its "
                       f"next job")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    rank_zero_info(f"run directory: {output_dir}")
    return metrics


@cli_entry
@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The CLI; returns `metrics[optimized_metric]` for a Hydra sweeper when `optimized_metric` is set.

    The model, data and numeric trainer keys, and an explicit `ckpt_path`, are checked before the config tree is
    printed; a mistake ends with one message and exit status 2 (`ldm.cli.common.run_cli`). In a multirun, a run that
    fails prints its traceback (a ConfigError: its message) and returns None, and so does one whose metric is not
    finite, so the sweep goes on: the Optuna sweeper records the trial as failed. A user's mistake (a ConfigError, a
    missing file) in the sweep's first job stops the sweep instead, unless it names a key the sweep varies
    (`HandSweptKeys`; a mistake in the command fails every job alike; one naming a swept key, or in a later job,
    where the command has built a model, is the job's own values that the model refuses). (Not nan: the
    Optuna 2.x that hydra-optuna-sweeper needs rejects a nan value with an error that ends the whole sweep.) A run
    stopped by a signal before its last step ends the sweep (exit status 128 + the signal) with no result; a signal
    at its end lets it report, and the next job ends the sweep. A job that resumed a finished run reports nothing.
    """
    metric_name = cfg.get("optimized_metric")

    def run() -> float | None:
        if is_multirun() and HydraConfig.get().job.num == 0:
            SWEEP_STOP.clear()  # a stop of an earlier sweep of this process (a notebook's) is not this one's
        if SWEEP_STOP and is_multirun():
            print(f"{SWEEP_STOP[0].name} during the previous job: the sweep stops", file=sys.stderr, flush=True)
            raise SystemExit(128 + SWEEP_STOP[0])
        if not is_multirun():  # first: the other checks' mistakes would leave Hydra's run directory behind
            check_slurm_run_directory(cfg.paths.output_dir)
        else:
            record_job(None)
        try:
            metrics = train(cfg)
        except Exception as err:
            status, message = describe_error(err)
            user_error = status == EXIT_USER_ERROR  # (a missing shard, too)
            if not is_multirun() and user_error:
                remove_made_run_directory()
            if not is_multirun() or (user_error and HydraConfig.get().job.num == 0 and not names_swept_key(message)):
                raise  # a mistake in the command, which every job would meet: the sweep stops at its first
            if not user_error:
                traceback.print_exc()
            return job_failed(f"{type(err).__name__}: {err}", metric_name)
        if not metric_name:
            return None
        if not metrics:  # a finished run, resumed: nothing trained, nothing logged
            print(f"the {'job' if is_multirun() else 'command'} resumed a finished run and logged nothing: no "
                  f"{metric_name} to report (its earlier log holds it)")
            return None
        if metric_name not in metrics:
            raise configs.ConfigError(f"optimized_metric={metric_name!r} was not logged; logged metrics: "
                                      f"{sorted(metrics)}")
        if is_multirun() and not math.isfinite(metrics[metric_name]):
            return job_failed(f"{metric_name} is {metrics[metric_name]}", metric_name)
        return metrics[metric_name]

    return run_cli("ldm-train", run)


def job_failed(error: str, metric_name: str | None) -> None:
    """A multirun job failed with `error`: say so, and record it for the sweep's summary (`SweepSummary`)."""
    print(f"trial failed ({error}); the sweep goes on without its {metric_name or 'result'}")
    record_job(error)


if __name__ == "__main__":
    # note: run as `python -m ldm.cli.train`, this file is __main__, and submitit (hydra/launcher=local|slurm) would
    # pickle `main` by value with everything it references; the imported module's `main` pickles by reference.
    from ldm.cli.train import main as importable_main

    importable_main()
