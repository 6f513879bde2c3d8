"""What every Hydra entry point shares: where the configs live, errors a person can act on, printing and saving the
resolved config.

Every CLI's `main()` runs its work through `run_cli` and is wrapped in `cli_entry`: a user's mistake (a bad key, value,
type or file, a missing file, a full disk) ends with one line naming the key or file and the fix, and exit status 2;
any other failure with one line and exit status 1. No Python traceback unless HYDRA_FULL_ERROR=1.

Lightning and rich are imported inside the functions that need them, so that `ldm-data` starts in a second or two.
"""

from __future__ import annotations

import difflib
import errno
import functools
import hashlib
import importlib.util
import inspect
import logging
import math
import os
import re
import shlex
import shutil
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ldm.config import ConfigError, hydra_quoted, is_int, unwritable

T = TypeVar("T")
log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2  # the command line or a file it names is wrong: fix it and run again
EXIT_FAILURE = 1     # the run itself failed
TRACEBACK_ENV = "HYDRA_FULL_ERROR"  # =1: print the traceback too (Hydra's own switch for the same purpose)
# set with HYDRA_FULL_ERROR=1 by `cli_entry` (and inherited by the processes it starts): Hydra then raises its
# composition errors, which `cli_entry` puts in one line, instead of printing them; no traceback is asked for
RAISE_ENV = "LDM_HYDRA_RAISES"


def traceback_asked() -> bool:
    """Whether the user set HYDRA_FULL_ERROR=1 (not `cli_entry`, for Hydra to raise)."""
    return os.environ.get(TRACEBACK_ENV) == "1" and os.environ.get(RAISE_ENV) != "1"


# A user's mistake, whatever module raised it.
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
               PermissionError, OmegaConfBaseException, InstantiationException)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_task_started = False  # set once Hydra has composed the config and handed it to a CLI's task function

# conf/ sits beside the package in the repository; LDM_CONF_DIR points elsewhere (e.g. a copy of conf/).
CONF_DIR = os.path.abspath(os.path.expanduser(os.environ.get("LDM_CONF_DIR",
                                                             Path(__file__).resolve().parents[2] / "conf")))


_WANDB_FOLDER = re.compile(r"(?:offline-)?run-(\d{8}_\d{6})-(.+)")  # wandb/<offline-run|run>-<start>-<id>


def run_id(output_dir: str) -> str:
    """A stable id for the run in `output_dir` (the W&B run id): the id its W&B folders already carry (the first
    segment's), else the directory's name plus a hash of its resolved path.

    So a resumed or requeued run continues its W&B run, also when the directory was copied or moved (`cp -r`) or is
    reached through a symlink or `..`.
    """
    wandb_dir = Path(output_dir) / "wandb"
    segments = sorted(match.groups() for folder in (wandb_dir.iterdir() if wandb_dir.is_dir() else ())
                      if folder.is_dir() and (match := _WANDB_FOLDER.fullmatch(folder.name)))
    if segments:
        return segments[0][1]
    path = str(Path(output_dir).resolve())
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(path).name)[-48:]
    return f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


OmegaConf.register_new_resolver("run_id", run_id, replace=True)


def sqlite_url(path: str) -> str:
    """`sqlite:///<absolute path>` for an SQLite file (the Optuna study), its folder created: SQLite creates a
    missing file but not a missing folder (`paths.root_dir` from a new LDM_ROOT)."""
    path = Path(path).expanduser().absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


OmegaConf.register_new_resolver("sqlite_url", sqlite_url, replace=True)

NO_SLURM_JOB = "no-SLURM_JOB_ID"  # stands in for the job id outside a SLURM job; ldm-train refuses to run there


def job_id_or_sentinel() -> str:
    """$SLURM_JOB_ID (`paths=slurm` names the run directory after it), or `NO_SLURM_JOB` outside a SLURM job:
    resolved while Hydra makes the run directory, where a missing variable would end in a page of Hydra's traceback;
    `resolve_output_dir` names the mistake instead."""
    return os.environ.get("SLURM_JOB_ID") or NO_SLURM_JOB


OmegaConf.register_new_resolver("slurm_job_id", job_id_or_sentinel, replace=True)


def check_slurm_run_directory(output_dir: str | Path) -> None:
    """Refuse a run directory named after a missing $SLURM_JOB_ID (`paths=slurm` outside a SLURM job), and remove it
    when Hydra made it for this run alone (its .hydra/ and log): nothing of the user's goes."""
    if NO_SLURM_JOB not in str(output_dir):
        return
    _remove_if_hydras_alone(output_dir)
    raise ConfigError(f"paths=slurm names the run directory after $SLURM_JOB_ID, which only a SLURM job sets (here "
                      f"it would be {output_dir}): submit it with sbatch (slurm/*.sbatch), or use paths=default (or "
                      f"paths.output_dir=...) outside SLURM")


_made_run_dirs: list[str] = []  # the run directory Hydra creates for this command, where it did not exist


def remove_made_run_directory() -> None:
    """Remove the run directory Hydra made for this command when it holds nothing but Hydra's record and the log:
    a refused command leaves no folder behind (each mistake left a timestamped one)."""
    for directory in _made_run_dirs:
        _remove_if_hydras_alone(directory)


def _remove_if_hydras_alone(directory: str | Path) -> None:
    """Remove `directory` when it holds nothing but Hydra's record (.hydra/) and the log: nothing of the user's."""
    made = Path(directory)
    if made.is_dir() and all(p.name == ".hydra" or p.suffix == ".log" for p in made.iterdir()):
        shutil.rmtree(made, ignore_errors=True)


class CheckRunDirectory(Callback):
    """ldm-train's run directory (`hydra.run.dir`, which is `paths.output_dir`; a multirun's `hydra.sweep.dir`),
    checked before Hydra creates it and writes its .hydra/ record and log into it: a path that cannot become a folder
    this user may write (a file on the way, no permission) stops the command with one line naming the key and exit
    status 2, where Hydra printed its traceback. A leading `~` is expanded (Hydra made a folder named `~`). Nothing
    is created here: a sweep that a later callback refuses leaves no folder."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _check_writable(config, "sweep")


def _same_path(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


def _check_writable(config: DictConfig, mode: str) -> None:
    directory = str(config.hydra[mode].dir)
    # named by the key the user sets: paths.output_dir (which hydra.run.dir follows unless set itself), and for a
    # leading ~ the key whose value holds it (paths.runs_dir='~/runs' reaches hydra.sweep.dir through interpolation)
    key = "paths.output_dir" if mode == "run" and _same_path(str(OmegaConf.select(config, "paths.output_dir")),
                                                             directory) else f"hydra.{mode}.dir"
    if directory.startswith("~") and mode == "sweep":  # the launcher composes each job's folder from the overrides
        held = next(((k, value) for k in ("paths.root_dir", "paths.runs_dir")
                     if (value := str(OmegaConf.select(config, k, default=""))).startswith("~")
                     and directory.startswith(value)), (key, directory))
        print(f"ldm-train: error: {held[0]}={held[1]}: Hydra does not expand ~ in the jobs' folders of a multirun; "
              f"give the full path ({os.path.expanduser(held[1])})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
    if mode == "run" and key != "paths.output_dir" and OmegaConf.select(config, "paths.output_dir") is not None \
            and int(os.environ.get("LOCAL_RANK", 0)) == 0:  # (a DDP rank Lightning started gets its launcher's folder)
        print(f"ldm-train: error: hydra.run.dir={directory} is set apart from paths.output_dir="
              f"{OmegaConf.select(config, 'paths.output_dir')}, where the run's checkpoints, logs and export go (and "
              f"where a rerun looks for the run to resume): set paths.output_dir={directory} instead",
              file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)
    if directory.startswith("~"):
        directory = os.path.expanduser(directory)
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra[mode].dir = directory
    if mode == "run" and not os.path.exists(directory):
        _made_run_dirs[:] = [directory]
    if (found := unwritable(directory)) is not None:
        print(f"ldm-train: error: {key}={directory} cannot be the run directory ({found[0]}: {found[1]}); set {key} "
              f"to a folder you can write", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USER_ERROR)


def resolve_output_dir(cfg: DictConfig) -> Path:
    """Fix `paths.output_dir` for this process and create it.

    A multirun job writes to its sweep subdirectory. A DDP worker process that Lightning started (LOCAL_RANK > 0)
    receives the parent's run directory as `hydra.run.dir`, so it reuses it instead of a new timestamp.
    """
    out = cfg.paths.output_dir
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN or int(os.environ.get("LOCAL_RANK", 0)) > 0:
            out = hc.runtime.output_dir
        if hc.mode == RunMode.MULTIRUN and any(o.lstrip("+").startswith("paths.output_dir=")
                                               for o in hc.overrides.task):
            log.warning("paths.output_dir=%s is ignored in a multirun (-m): each job runs in its sweep directory "
                        "(here %s); choose where the sweep goes with hydra.sweep.dir", cfg.paths.output_dir, out)
        if hc.mode == RunMode.MULTIRUN and str(hc.runtime.choices.get("paths")).removesuffix(".yaml") == "slurm":
            log.warning("paths=slurm in a multirun (-m): each job runs in its sweep directory %s, not in one named "
                        "after the SLURM job, so a requeued sbatch script starts a new sweep instead of resuming; "
                        "run one configuration per sbatch job, or sweep with hydra/launcher=slurm", out)
    check_slurm_run_directory(out)
    out = Path(out).expanduser().absolute()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0


def print_config_tree(cfg: DictConfig, order: tuple[str, ...] = ()) -> None:
    """Print the resolved config as a rich tree on rank 0, groups in `order` first."""
    if not _is_rank_zero():
        return
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        node = cfg[key]
        branch = tree.add(str(key), style="bold")
        text = OmegaConf.to_yaml(_shortened(OmegaConf.to_container(node, resolve=True))) \
            if isinstance(node, DictConfig) else str(_shortened(node))
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark"))
    rich.print(tree)


def _shortened(value: Any, most: int = 8) -> Any:
    """`value` with every list of more than `most` items cut to its first three and a count, for printing (a shard
    list of 20,000 paths printed 20,000 lines)."""
    if isinstance(value, dict):
        return {k: _shortened(v, most) for k, v in value.items()}
    if isinstance(value, (list, ListConfig)):
        items = list(value)
        return [_shortened(v, most) for v in items] if len(items) <= most else \
            [*(_shortened(v, most) for v in items[:3]), f"... and {len(items) - 3} more ({len(items)} in all)"]
    return value


def save_config(cfg: DictConfig, output_dir: Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run directory (rank 0 writes; every rank gets the path)."""
    path = Path(output_dir) / name
    if _is_rank_zero():
        OmegaConf.save(cfg, path, resolve=True)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Errors a person can act on.


def describe_error(err: BaseException) -> tuple[int, str]:
    """(exit status, one-line message) for an exception that ended a CLI."""
    disk_full = _find_disk_full(err)
    if disk_full is not None:
        where = disk_full.filename or "a file of the run"
        return EXIT_USER_ERROR, (f"no space left on the device while writing {where}; free some space or write to "
                                 f"another directory (files written before are intact)")
    if isinstance(err, InstantiationException):
        if (refusal := config_error_in(err)) is not None:  # the class's own message names the key
            return EXIT_USER_ERROR, _one_line(refusal, with_type=False)
        return EXIT_USER_ERROR, " ".join(str(err).split())  # Hydra's message names the target and full_key
    if isinstance(err, OmegaConfBaseException):
        key = getattr(err, "full_key", None)
        text = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "Missing mandatory value" in text and key:
            return EXIT_USER_ERROR, f"{key} is required: pass {key}=VALUE on the command line"
        return EXIT_USER_ERROR, f"config key '{key}': {text}" if key else text
    if isinstance(err, USER_ERRORS) or _is_misconfiguration(err):
        return EXIT_USER_ERROR, _one_line(err, with_type=not isinstance(err, ConfigError))
    masked = config_error_in(err)
    if masked is not None:
        return EXIT_USER_ERROR, _one_line(masked, with_type=False)
    return EXIT_FAILURE, _one_line(err, with_type=True)


def config_error_in(err: BaseException) -> ConfigError | None:
    """`err` when it is a ConfigError, or one that another error replaced on its way out (Lightning's teardown failing
    after a refusal raised while it iterated the data, say): still the user's to fix."""
    return next((e for e in _chain(err) if isinstance(e, ConfigError)), None)


def _chain(err: BaseException | None) -> list[BaseException]:
    """`err` and the exceptions it was raised from or while handling (unless raised `from None`), outermost first."""
    chain: list[BaseException] = []
    while err is not None and all(err is not e for e in chain):
        chain.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return chain


def _find_disk_full(err: BaseException) -> OSError | None:
    """The OSError "no space left" in `err`'s chain of causes, preferring one that names its file."""
    found = [e for e in _chain(err) if isinstance(e, OSError) and e.errno in DISK_FULL]
    named = [e for e in found if e.filename]
    return (named or found or [None])[0]


def _is_misconfiguration(err: BaseException) -> bool:
    """Lightning's MisconfigurationException: a Trainer argument it cannot use."""
    return type(err).__name__ == "MisconfigurationException"


def _one_line(err: BaseException, with_type: bool) -> str:
    text = " ".join(str(err).split()) or repr(err)
    return f"{type(err).__name__}: {text}" if with_type else text


class SweepFailed(SystemExit):
    """The end of a multirun none of whose jobs completed (a Hydra callback's, `ldm.cli.train.SweepSummary`): exit
    status 1 whether the jobs ran in this process or in processes of their own (the submitit launchers)."""


class Terminated(KeyboardInterrupt):
    """A SIGTERM (`kill`, `timeout`, a scheduler's end of job) taken as Ctrl-C is, where `run_cli` is asked to."""


def _terminated(signum: int, frame: Any) -> None:
    raise Terminated


def run_cli(name: str, task: Callable[[], T], kept: str = "", sigterm: bool = False) -> T:
    """Run a CLI's work inside its Hydra task function; an exception becomes one message on stderr and an exit status,
    Ctrl-C one line and status 130.

    Catching inside the task function (not letting Hydra see the exception) keeps Hydra from printing its own
    traceback; `sys.exit` passes through Hydra untouched.

    Args:
        name: the command, for the message (`ldm-train`).
        task: the work; its return value is passed on (a sweeper's metric).
        kept: what an interrupted run leaves and how to go on, for the Ctrl-C line.
        sigterm: take a SIGTERM as Ctrl-C (the task's cleanup runs; status 143), for commands whose work has nothing
            of its own to do on one (ldm-train's trainer saves a checkpoint).
    """
    global _task_started
    _task_started = True
    previous = signal.signal(signal.SIGTERM, _terminated) if sigterm else None
    try:
        return task()
    except KeyboardInterrupt as err:
        by = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        print(f"{name}: interrupted" + (" by SIGTERM" if by == signal.SIGTERM else "") + (f"; {kept}" if kept else ""),
              file=sys.stderr, flush=True)
        sys.exit(128 + by)
    except Exception as err:  # noqa: BLE001 -- every failure gets a message and a status
        status, message = describe_error(err)
        if traceback_asked():
            traceback.print_exc()
        hint = "" if status == EXIT_USER_ERROR or traceback_asked() else f" (set {TRACEBACK_ENV}=1 for the traceback)"
        print(f"{name}: error: {message}{hint}", file=sys.stderr, flush=True)
        sys.exit(status)
    finally:
        if sigterm:
            signal.signal(signal.SIGTERM, previous)


HYDRA_FLAG_REFUSAL = "Only one of --run, --multirun"  # how Hydra's message for flags it cannot combine starts


def config_groups(config_name: str) -> dict[str, Any]:
    """The config groups in the defaults list of `conf/<config_name>.yaml`, with their default options (ldm-train's:
    model, trainer, logger, ...; None for optional ones such as debug; the other commands have none)."""
    path = Path(CONF_DIR, f"{config_name}.yaml")
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []) if path.is_file() else []
    return {key: value for entry in defaults if isinstance(entry, dict) for key, value in entry.items()
            if not key.startswith(("override ", "/")) and "@" not in key}


def null_group_override(args: list[str], command: str) -> str | None:
    """The refusal of a `GROUP=null` override (`logger=null`, as `callbacks.progress=null` nulls a key), which Hydra
    answers with a page of traceback, for any folder of conf/ (Hydra takes each for a group, whatever the command): a
    group of the command's config (`conf/<command>.yaml`) takes one of its options (`none` where it has one), and an
    optional one (null by default) may be left out with `~GROUP`; the other commands have no such key."""
    for arg in overrides(args):
        group, _, value = arg.lstrip("+").partition("=")
        if value != "null" or "/" in group or group == "hydra" or not Path(CONF_DIR, group).is_dir():
            continue
        groups = config_groups(command)  # (read only here: not at every command's start)
        if group not in groups:
            return f"{arg}: ldm-{command} has no key {group} ({group} is a config group of ldm-train)"
        folder = Path(CONF_DIR, group)
        names = sorted(f.relative_to(folder).with_suffix("").as_posix() for f in folder.rglob("*.yaml"))
        none = f" ({group}=none: without one)" if "none" in names else ""
        optional = f", or leave it out with ~{group}" if groups[group] is None else ""
        return f"{arg}: {group} is a config group: choose one of its options {names}{none}{optional}"
    return None


def nested_group_option(args: list[str]) -> str | None:
    """The refusal of an option that a group whose options all lie in subfolders (`model`: autoencoder/kl_f8,
    ldm/tiny...) does not have: Hydra's own error lists no options there (`model=kl_f8`, the experiment's name)."""
    if any(arg in ("-cd", "--config-dir") or arg.startswith("--config-dir=") for arg in args):
        return None  # options of the user's own config folder
    for arg in overrides(args):
        group, _, value = arg.lstrip("+").partition("=")
        folder = Path(CONF_DIR, group)
        if (not value or value == "null" or "/" in group or any(c in value for c in ",*[]()")
                or not folder.is_dir() or any(folder.glob("*.yaml")) or (folder / f"{value}.yaml").is_file()):
            continue
        names = sorted(f.relative_to(folder).with_suffix("").as_posix() for f in folder.rglob("*.yaml"))
        return f"{arg}: the config group {group} has no option {value!r}; choose one of {names}"
    return None


def overrides(args: list[str]) -> Iterator[str]:
    """The arguments that are overrides: `key=value`, not a flag nor a flag's value (`--config-dir /a=b`)."""
    for previous, arg in zip([None, *args], args):
        if "=" in arg and not arg.startswith("-") and previous not in HYDRA_VALUE_FLAGS:
            yield arg


def repeated_keys(args: list[str]) -> list[str]:
    """Keys given more than once on the command line with different paths or names as values, of which Hydra keeps
    the last: a brace pattern or a glob the shell expanded into several overrides
    (`data.train_shards=train-{000000..000049}.tar`). (A number given again, a script's default overridden, is not
    named.)"""
    values: dict[str, set[str]] = {}
    for arg in overrides(args):
        key, _, value = arg.lstrip("+~").partition("=")
        values.setdefault(key, set()).add(value)
    return sorted(key for key, given in values.items()
                  if len(given) > 1 and all("/" in v or "." in v.lstrip("0123456789.-+eE") for v in given))


# Hydra's flags that take the next argument as their value (`--config-dir DIR`), which is no override
HYDRA_VALUE_FLAGS = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir", "-c", "--cfg", "-p",
                     "--package", "-i", "--info", "--experimental-rerun"}


def unparsable_override(args: list[str]) -> str | None:
    """The refusal of an override Hydra's grammar cannot read (a path with a letter beyond ASCII, a `~`, a space from
    a quoted shell word, a brace), which Hydra answers with its lexer's exception: with the override quoted so that
    it reads, each element of a flat list or sweep on its own, where that form is one Hydra reads."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = None
    for arg in overrides(args):
        parser = parser or OverridesParser.create()
        try:
            parser.parse_override(arg)
        except HydraException as err:
            key, _, value = arg.partition("=")
            inner, listed = (value[1:-1], True) if value.startswith("[") and value.endswith("]") else (value, False)
            shown = ' (key="value", inside the shell\'s quotes)'
            if not any(c in inner for c in "[]{}()\"'\\"):  # a value, or a flat list or sweep of them (a nested
                quoted = ",".join(hydra_quoted(e.strip()) for e in inner.split(","))  # or quoted form: no guess at
                # its structure; Hydra drops the spaces around an unquoted element, the quotes would keep them)
                fix = f"{key}=[{quoted}]" if listed else f"{key}={quoted}"
                try:
                    parser.parse_override(fix)
                    shown = f": {shlex.quote(fix)}"
                except HydraException:  # the key itself
                    pass
            return (f"{arg}: Hydra cannot read this override ({str(err).splitlines()[-1].strip()}); a value holding "
                    f"a space, a letter beyond ASCII, ~, a quote or a brace goes in Hydra's quotes{shown}")
    return None


def hydra_error_line(err: BaseException) -> str:
    """Hydra's refusal of a command line in one line: an override of a key the config lacks (Hydra: "To append to
    your config use +key=value", which the config check then refuses) names the closest key, or those there are."""
    cause = err.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and str(err).startswith("Could not override"):
        parent, key = cause.parent_node, str(cause.key)
        keys = [str(k) for k in parent.keys() if k != "hydra"] if isinstance(parent, DictConfig) else []
        where = str(cause.full_key).rpartition(".")[0]
        added = re.search(r"To append to your config use (\+\S.*)", str(err))
        target = parent.get("_target_") if isinstance(parent, DictConfig) else None
        try:  # the arguments of the node's class, some left out of the config (a Trainer's enable_model_summary)
            arguments = [a for a in inspect.signature(get_class(target)).parameters if a not in keys] \
                if target and where not in ("model", "data") else []  # (those two: schemas of every key they read)
        except Exception:  # noqa: BLE001 -- no class by that name: a mistake of another kind, named elsewhere
            arguments = []
        close = difflib.get_close_matches(key, keys, n=1)
        left_out = difflib.get_close_matches(key, arguments, n=1)
        cls = str(target).rsplit(".", 1)[-1]
        if key in arguments and added:  # the only place where Hydra's `+` works: ldm refuses other added keys
            hint = f"{cls} takes it, and the config leaves it out: add it with {added[1]}"
        elif close:
            hint = f"did you mean {where + '.' if where else ''}{close[0]}?"
        elif left_out:
            hint = f"did you mean {where}.{left_out[0]}? ({cls} takes it, and the config leaves it out: add it with " \
                   f"+{where}.{left_out[0]}=VALUE)"
        elif not keys:
            hint = f"{where} holds no keys (a value, not a node)"
        else:
            hint = f"{where or 'the top level'} holds {', '.join(keys[:24])}{', ...' if len(keys) > 24 else ''}"
        return f"{cause.full_key} is no key of this config: {hint} (--cfg job prints the config composed)"
    text = _one_line(err, with_type=False)
    if own := re.match(r"In '([^'/]+)/([^']+)': Could not override '[^'@]+@\1\.", text):  # a defaults list's
        group, choice = own.groups()  # `override /model: ...` in a file without the header: its package is its group
        return (f"{group}={choice}: {group}/{choice}.yaml overrides other groups, which only a file of the top level "
                f"can: start it with the line `# @package _global_`, as conf/{group}/*.yaml do ({text})")
    return f"{text}: {_one_line(cause, with_type=False)}" if isinstance(cause, OmegaConfBaseException) else text


def override_not_applied(err: BaseException) -> str | None:
    """An override that OmegaConf failed to apply with an error Hydra does not catch (an item of a list by name,
    `tags.x=1`: a ValueError and a page of traceback), in one line naming it; None for an error raised elsewhere."""
    if isinstance(err, HydraException):  # Hydra's own (`hydra_error_line`)
        return None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        if frame.f_code.co_name == "_apply_overrides_to_config":  # Hydra's loop over the overrides: the one at fault
            override, cfg = frame.f_locals.get("override"), frame.f_locals.get("cfg")
            if override is None or cfg is None:
                return None
            key = str(override.key_or_group)
            typed = [a for a in sys.argv[1:] if a.partition("=")[0].lstrip("+~") == key]  # (a sweep's: all values)
            line, parent = (typed[-1] if typed else override.input_line), key.rpartition(".")[0]
            node = OmegaConf.select(cfg, parent, throw_on_missing=False) if parent else cfg
            if isinstance(node, ListConfig):
                return (f"{line}: {parent} is a list, whose items are named by their index ({parent}.0=VALUE); or "
                        f"give the whole list, {parent}=[A,B]")
            if node is None:
                return f"{line}: {parent} is null, so it has no items to set: give the whole value, {parent}=[A,B]"
            return f"{line}: {_one_line(err, with_type=True)}"
    return None


def no_completed_trial(err: BaseException) -> bool:
    """Optuna's refusal, at the end of a sweep (Hydra's sweeper asks for the best trial), of a study none of whose
    trials completed: "Record does not exist", and a page of traceback."""
    return isinstance(err, ValueError) and "Record does not exist" in str(err) and \
        any("optuna" in frame.filename for frame in traceback.extract_tb(err.__traceback__))


def cli_entry(hydra_main: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a `@hydra.main` function: a failure while Hydra composes the config (an unknown key, a missing config
    group option, an unparsable override) exits with status 2, as a user's mistake, instead of Hydra's 1."""

    command = Path(inspect.getfile(inspect.unwrap(hydra_main))).stem  # ldm/cli/train.py: conf/train.yaml
    name = f"ldm-{command}"  # (also under `python -m ldm.cli.train`, as the sbatch scripts run it)

    @functools.wraps(hydra_main)
    def entry(*args: Any, **kwargs: Any) -> Any:
        global _task_started
        _task_started = False  # (an earlier command of this process set it)
        if not Path(CONF_DIR, "train.yaml").is_file():  # e.g. a wheel or `pip install .`, which leave conf/ behind
            print(f"{name}: error: no configs at {CONF_DIR}: install ldm from a clone of its "
                  f"repository in place (make install, or pip install -e .), or set LDM_CONF_DIR to a copy of its "
                  f"conf/", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)
        refused = null_group_override(sys.argv[1:], command) or nested_group_option(sys.argv[1:]) or \
            unparsable_override(sys.argv[1:])
        if refused is not None:
            print(f"{name}: error: {refused}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        for key in repeated_keys(sys.argv[1:]):
            print(f"{name}: warning: {key} is given more than once and Hydra keeps the last value; if the shell "
                  f"expanded a brace pattern or a glob into several overrides, quote it: '{key}=\"...\"'",
                  file=sys.stderr, flush=True)
        root = logging.getLogger()
        # Hydra's job logging is not undone: put back (a notebook's next command logged into this run's train.log)
        logged = (root.level, list(root.handlers))
        asked = os.environ.get(TRACEBACK_ENV)
        raises = asked != "1"
        if raises:  # Hydra raises what it would print over several lines, for one line here
            os.environ[TRACEBACK_ENV] = os.environ[RAISE_ENV] = "1"
        try:
            return hydra_main(*args, **kwargs)
        except KeyboardInterrupt:  # before the task (Hydra composing the config): nothing was done yet
            print(f"{name}: interrupted", file=sys.stderr, flush=True)
            sys.exit(128 + signal.SIGINT)
        except SystemExit as exit_:
            if exit_.code == EXIT_FAILURE and not _task_started and not isinstance(exit_, SweepFailed):
                sys.exit(EXIT_USER_ERROR)
            raise
        except Exception as err:  # noqa: BLE001 -- raised by Hydra before any task ran
            # Hydra's refusal of its flags (-m with --cfg), and (with HYDRA_FULL_ERROR=1, which makes Hydra raise
            # instead of printing) its composition errors: the user's to fix; anything else keeps its status
            not_applied = None if _task_started else override_not_applied(err)
            hydra_refusal = isinstance(err, HydraException) or not_applied is not None or (
                isinstance(err, ValueError) and str(err).startswith(HYDRA_FLAG_REFUSAL))
            if _task_started and no_completed_trial(err):
                print(f"{name}: error: no trial of the Optuna sweep completed (each one's error is above), so it has "
                      f"no best trial to report", file=sys.stderr, flush=True)
                sys.exit(EXIT_FAILURE)
            if _task_started or not hydra_refusal:
                raise
            if traceback_asked():
                traceback.print_exc()
            print(f"{name}: error: {not_applied or hydra_error_line(err)}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        finally:
            if raises:
                del os.environ[RAISE_ENV]
                if asked is None:
                    del os.environ[TRACEBACK_ENV]
                else:
                    os.environ[TRACEBACK_ENV] = asked
            for handler in root.handlers[:]:
                if handler not in logged[1]:
                    root.removeHandler(handler)
                    handler.close()
            for handler in logged[1]:  # (Hydra's dictConfig replaces the root logger's handlers)
                root.addHandler(handler)
            root.setLevel(logged[0])

    return entry


# Trainer arguments checked before anything is built (Hydra passes `trainer` to Lightning unvalidated):
# key -> (allowed types, minimum or None).
TRAINER_NUMBERS: dict[str, tuple[tuple[type, ...], float | None]] = {
    "max_steps": ((int,), -1), "min_steps": ((int,), 0), "max_epochs": ((int,), -1), "min_epochs": ((int,), 0),
    "val_check_interval": ((int, float), 0), "check_val_every_n_epoch": ((int,), 1),
    "log_every_n_steps": ((int,), 0), "accumulate_grad_batches": ((int,), 1), "num_sanity_val_steps": ((int,), -1),
    "limit_train_batches": ((int, float), 0), "limit_val_batches": ((int, float), 0),
    "limit_test_batches": ((int, float), 0), "limit_predict_batches": ((int, float), 0),
    "gradient_clip_val": ((int, float), 0), "num_nodes": ((int,), 1),
}


# Trainer arguments Lightning takes as integers only (not null), with its defaults.
TRAINER_NOT_NULL: dict[str, int] = {"max_steps": -1, "accumulate_grad_batches": 1, "num_nodes": 1}


# Trainer arguments whose default means "off" (check_trainer compares a module's unsupported_trainer_args to them).
TRAINER_DEFAULTS: dict[str, Any] = {"accumulate_grad_batches": 1}


HALF_WEIGHT_PRECISIONS = ("16-true", "bf16-true", "half")  # Lightning's precisions that cast the weights
DOUBLE_PRECISIONS = ("64-true", "64")  # Lightning's fp64 weights
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "32", "16", "bf16", "transformer-engine",
              "transformer-engine-float16")  # what Lightning's Trainer accepts, less the half- and double-weight ones


def check_devices(value: Any, cpu: str | None = None) -> None:
    """Raise ConfigError naming trainer.devices unless it is a count >= 1, -1 (all), auto, or distinct device indices
    (a list, or a string such as "0,1"); on the CPU (`cpu`: why the run is on the CPU, for the message), Lightning
    takes a count >= 1 or auto alone."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)  # Lightning reads "2" as 2 devices, "00" as 0
    indices: list[Any] | None = None
    if isinstance(value, str) and re.fullmatch(r"\d+(,\d+)*,?", value.strip()):
        indices = [int(i) for i in value.strip().rstrip(",").split(",")]
    elif isinstance(value, Sequence) and not isinstance(value, str):
        indices = list(value)
    count = is_int(value) and (value >= 1 or (value == -1 and not cpu))
    listed = (indices is not None and not cpu and len(indices) > 0 and len(set(indices)) == len(indices)
              and all(is_int(i) and i >= 0 for i in indices))
    if not (value == "auto" or count or listed):
        options = "a number of processes >= 1, or auto" if cpu else \
            "a number of devices >= 1, -1 (all of them), auto, or distinct device indices (e.g. trainer.devices=[0,1])"
        raise ConfigError(f"trainer.devices={value!r} must be {options}{f' on the CPU ({cpu})' if cpu else ''}")


def check_trainer(trainer: DictConfig | dict[str, Any] | None, model_target: str | None = None,
                  compile_networks: bool = False, channels_last: bool = False) -> None:
    """Raise ConfigError naming `trainer.KEY` when it is no Trainer argument (a typo), when a numeric one has the wrong
    type or range, when the accelerator is a GPU that torch does not see (a GPU command run on a CPU machine), when
    the strategy starts the ranks from this process (ddp_spawn, ddp_fork, ddp_notebook), or when FSDP would run over
    several processes for a module (`model_target`, its class path) that does not shard itself (one without a true
    `fsdp_shards` class attribute reads its networks' parameters outside FSDP's forward, where each process holds only
    its shard) or with `compile_networks` (compile=true), or FSDP with `channels_last` (its optimizer state restored
    scrambled), or when the module's `unsupported_trainer_args` (trainer key -> what to do instead) holds a key that
    is set."""
    import difflib

    import lightning as L
    import torch

    trainer = trainer or {}
    arguments = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    unknown = [key for key in trainer if not re.fullmatch(r"_\w+_", key) and key not in arguments]  # (Hydra's own)
    if unknown:  # (Lightning's TypeError came after the config tree, without a hint)
        close = difflib.get_close_matches(unknown[0], sorted(arguments), n=1)
        raise ConfigError(f"trainer.{unknown[0]} is not an argument of Lightning's Trainer"
                          + (f": did you mean trainer.{close[0]}?" if close else ""))
    accelerator = trainer.get("accelerator")
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but torch sees no CUDA GPU on this machine; use "
                          f"trainer=cpu, or trainer=ddp_cpu for several CPU processes")
    strategy = trainer.get("strategy")
    backend = strategy.get("process_group_backend") if isinstance(strategy, (dict, DictConfig)) else None
    if backend == "nccl" and (accelerator not in ("gpu", "cuda", "auto", None) or not torch.cuda.is_available()):
        raise ConfigError(f"trainer.strategy.process_group_backend=nccl needs CUDA GPUs (trainer.accelerator="
                          f"{accelerator}); use trainer=ddp_cpu (gloo) for several CPU processes")
    start_method = strategy.get("start_method") if isinstance(strategy, (dict, DictConfig)) else None
    if re.search(r"spawn|fork|notebook", strategy_name(strategy)) or start_method not in (None, "popen"):
        shown = f"trainer.strategy.start_method={start_method}" if start_method else f"trainer.strategy={strategy}"
        raise ConfigError(f"{shown} starts the ranks from ldm-train's own process, where they run without its "
                          f"logging (train.log), its signal handling (a SIGTERM ended the launcher and left the ranks "
                          f"running) and its one-line errors; use trainer=ddp_cpu on the CPU or trainer=ddp on GPUs "
                          f"(Lightning runs the command again for each rank), or start the ranks with srun / torchrun")
    for key, value in trainer.items():
        if value is None and key in TRAINER_NOT_NULL:
            raise ConfigError(f"trainer.{key}=null must be an integer; e.g. trainer.{key}={TRAINER_NOT_NULL[key]} "
                              f"(Lightning's default)")
        if key not in TRAINER_NUMBERS or value is None:
            continue
        types, minimum = TRAINER_NUMBERS[key]
        if isinstance(value, bool) or not isinstance(value, types):
            kind = "an integer" if types == (int,) else "a number"
            raise ConfigError(f"trainer.{key}={value!r} must be {kind} (got {type(value).__name__}); "
                              f"e.g. trainer.{key}={max(int(minimum or 0), 1)}")
        if minimum is not None and not minimum <= value < math.inf:  # NaN too
            finite = "" if value < minimum else "a finite number "
            raise ConfigError(f"trainer.{key}={value} must be {finite}>= {minimum:g}")
        if key in ("max_steps", "max_epochs") and value == 0:
            raise ConfigError(f"trainer.{key}=0 trains nothing: give a positive number (-1: no limit)")
    on_cpu = accelerator == "cpu" or (accelerator in ("auto", None) and not torch.cuda.is_available())
    # torch.compile builds C++ for the CPU (inductor: the command $CXX, else g++, as it splits it); without one the
    # run stopped after its first step, in inductor's words
    cxx = os.environ.get("CXX", "g++")
    try:
        program = (shlex.split(cxx) or [None])[0]
    except ValueError:  # unbalanced quotes: inductor finds no compiler in it either
        program = None
    if compile_networks and on_cpu and (program is None or shutil.which(program) is None):
        fix = "unset CXX (inductor then takes g++) or point it at a compiler" if "CXX" in os.environ else \
            "install one (e.g. apt install g++) or point CXX at it"
        raise ConfigError(f"compile=true on the CPU needs a C++ compiler for torch.compile (inductor builds its "
                          f"kernels with {'CXX=' if 'CXX' in os.environ else ''}{cxx!r}, not found): {fix}, or set "
                          f"compile=false")
    if trainer.get("devices") is not None:
        why = "trainer.accelerator=cpu" if accelerator == "cpu" else \
            f"trainer.accelerator={accelerator}, and torch sees no CUDA GPU"
        check_devices(trainer.get("devices"), why if on_cpu else None)
    precision = trainer.get("precision")
    if precision is not None and str(precision) not in (*PRECISIONS, *HALF_WEIGHT_PRECISIONS, *DOUBLE_PRECISIONS):
        raise ConfigError(f"trainer.precision={precision!r} is not a precision Lightning takes: 32-true, bf16-mixed, "
                          f"16-mixed")
    if str(precision) in ("16-mixed", "16") and on_cpu:
        # note: Lightning swaps in bf16-mixed on the CPU with a warning, while config.yaml and the checkpoints say fp16
        raise ConfigError(f"trainer.precision={precision} (fp16 with a GradScaler) needs a CUDA GPU; on the CPU use "
                          f"trainer.precision=bf16-mixed")
    if str(precision).startswith("transformer-engine") and (on_cpu or importlib.util.find_spec("transformer_engine")
                                                            is None):
        raise ConfigError(f"trainer.precision={precision} needs a CUDA GPU and NVIDIA's transformer_engine package"
                          f"{'' if on_cpu else ' (not installed)'}; use trainer.precision=bf16-mixed")
    if str(precision) in DOUBLE_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} would train in fp64, while the frozen autoencoder, the "
                          f"latents and the exports are fp32; use trainer.precision=32-true")
    if str(trainer.get("precision")) in HALF_WEIGHT_PRECISIONS:
        raise ConfigError(f"trainer.precision={trainer.get('precision')} would hold the weights themselves in 16 bits "
                          f"(no fp32 copy: the inputs' dtype no longer matches, and an EMA update of 1e-4 is below "
                          f"bf16's resolution); use trainer.precision=bf16-mixed{'' if on_cpu else ' (or 16-mixed)'}")
    interval = trainer.get("val_check_interval")
    if interval == 0:  # Lightning would divide by it
        raise ConfigError("trainer.val_check_interval=0 must be > 0: training batches between validations, or a "
                          "fraction of an epoch")
    if isinstance(interval, float) and trainer.get("check_val_every_n_epoch") is None:
        # note: Lightning's own error suggests a 'DD:HH:MM:SS' duration, which the type check above refuses
        raise ConfigError(f"trainer.val_check_interval={interval} is a fraction of an epoch, which Lightning counts "
                          f"only with trainer.check_val_every_n_epoch set (null: validation every N steps across "
                          f"epochs): set trainer.check_val_every_n_epoch=1 (and callbacks.checkpoint."
                          f"every_n_train_steps=null, a checkpoint at each validation, or a whole number of steps), "
                          f"or give a whole number of steps")
    module = get_class(model_target) if model_target else None
    for key, instead in getattr(module, "unsupported_trainer_args", {}).items():
        if trainer.get(key) not in (None, TRAINER_DEFAULTS.get(key)):
            raise ConfigError(f"trainer.{key}={trainer.get(key)} is not supported by {module.__name__}: {instead}")
    if "fsdp" not in strategy_name(trainer.get("strategy")).lower():
        return
    if channels_last:
        # note: FSDP's flat parameter holds an NHWC weight in memory order, and its optimizer-state loader flattens
        # the saved moments in logical (NCHW) order: a resumed run's AdamW moments land in the wrong places
        raise ConfigError("channels_last=true with trainer=fsdp is not supported: FSDP restores the optimizer state "
                          "of NHWC weights scrambled, so a resumed run would not continue the one it resumes; set "
                          "channels_last=false, or use trainer=ddp")
    processes = process_count(trainer)
    if processes > 1 and not getattr(module, "fsdp_shards", False):
        name = (model_target or "this model").rsplit(".", 1)[-1]
        raise ConfigError(f"trainer=fsdp over {processes} processes is not supported for {name} (only the latent "
                          f"diffusion model shards itself; this one reads its networks' parameters outside FSDP's "
                          f"forward, where each process holds only its shard); use trainer=ddp")
    if processes > 1 and compile_networks:
        raise ConfigError(f"compile=true with trainer=fsdp over {processes} processes is not supported: torch.compile "
                          f"of the sharded UNet stops at its second step (a gradient shard of FSDP's flat parameter); "
                          f"set compile=false, or use trainer=ddp")


def strategy_name(strategy: Any) -> str:
    """`trainer.strategy` as a name: a node's `_target_` class path or Lightning's registry name ("ddp", "fsdp")."""
    if isinstance(strategy, (dict, DictConfig)):
        return str(strategy.get("_target_") or "")
    return str(strategy or "")


def process_count(trainer: DictConfig | dict[str, Any]) -> int:
    """Training processes of a `trainer` node: devices per node (a count, a list of indices, or auto / -1: every
    visible GPU) times `num_nodes`."""
    import torch

    devices, accelerator = trainer.get("devices"), trainer.get("accelerator")
    if isinstance(devices, str) and devices.strip().isdigit():  # "2", as Lightning takes it: a count
        devices = int(devices)
    elif isinstance(devices, str) and "," in devices:  # "0,1": indices
        devices = [d for d in devices.split(",") if d.strip()]
    if isinstance(devices, int) and devices > 0:
        per_node = devices
    elif isinstance(devices, (list, tuple, ListConfig)):
        per_node = len(devices)
    elif str(devices) in ("auto", "-1") and accelerator in ("gpu", "cuda", "auto"):
        per_node = max(torch.cuda.device_count(), 1)
    else:
        per_node = 1
    return per_node * int(trainer.get("num_nodes") or 1)


def check_nodes(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Validate the config nodes `keys` against the `Config` schema of their `_target_`, without building anything,
    so that a bad key or value is reported before anything is printed or loaded."""
    import hydra.utils

    from ldm.config import to_dataclass

    for key in keys:
        node = cfg.get(key)
        if node is None or not isinstance(node, DictConfig) or not node.get("_target_"):
            continue
        try:
            cls = hydra.utils.get_class(node._target_)
        except Exception as err:  # noqa: BLE001 -- Hydra raises several kinds for an unknown class
            raise ConfigError(f"{key}._target_={node._target_!r} names no importable class ({_one_line(err, True)})"
                              ) from None
        schema = getattr(cls, "Config", None)
        if schema is None:
            continue
        config = to_dataclass(schema, node, key)
        check_files = getattr(cls, "check_files", None)  # a class that reads files names the missing ones up front
        if callable(check_files):
            check_files(config)
