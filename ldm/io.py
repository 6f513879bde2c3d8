"""Files written atomically: a reader sees the old file or the new one, never half of one.

Checkpoints, exports, latent statistics, shard summaries, results tables and cached reference statistics all go
through `atomic_open`, so an interruption (preemption, a crash, a full disk) never leaves a torn file behind.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

# An export directory (`save_pretrained` of AutoencoderKL, ByteTextEncoder and LatentDiffusionPipeline): the
# architecture and the weights.
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PIPELINE_FORMAT = "ldm.pipeline"     # config.json's "format" in a pipeline export (the others have no "format")

T = TypeVar("T")


def umask() -> int:
    """The process' file mode creation mask (what mkdir and open leave out of a new file's mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_default_modes(folder: str | os.PathLike) -> None:
    """Give the files under `folder` the mode open() would: transformers' `save_pretrained` writes its weights with
    safetensors' `save_file`, which makes them 0600, so that an export was unreadable to a colleague's account."""
    mode = 0o666 & ~umask()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **open_kwargs: Any) -> Iterator[IO]:
    """A file that replaces `path` only when the block ends without error: a temp file in the same directory,
    flushed and fsynced, then `os.replace`d over `path` (and the directory fsynced). On error `path` is untouched.

    Args:
        mode: "wb" (binary) or "w" (text); `open_kwargs` go to `open` (e.g. `newline=""` for csv).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)  # note: a link is replaced, not the file it names (a run forked by linking another's files)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        full = _disk_full(err)
        if full is not None:  # note: a failed write (or torch.save's wrapper around it) does not name the file
            raise OSError(full.errno, full.strerror, str(path)) from err
        raise
    # note: the rename itself is durable only once the directory entry is on disk.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _disk_full(err: BaseException | None) -> OSError | None:
    """The "no space left" / "quota exceeded" OSError in `err`'s chain of causes, if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        err = err.__cause__ or err.__context__
    return None


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Delete the temp files `atomic_open` left beside `path` when a write of it was killed (SIGKILL, a node lost):
    a gigabyte-sized export leaves a hidden copy otherwise. For writers that alone write `path` (an export)."""
    path = Path(path)
    stale = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")  # (mkstemp's 8 random characters)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if stale.fullmatch(tmp.name):
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write `text` to `path` atomically (see `atomic_open`)."""
    with atomic_open(path, "w") as f:
        f.write(text)


def save_export(directory: str | os.PathLike, config: dict[str, Any],
                weights: torch.nn.Module | dict[str, torch.Tensor]) -> Path:
    """Write `config` to config.json and the weights (a module's state dict, or a state dict) to model.safetensors in
    `directory` (created if missing), each atomically; config.json last, so a torn export is never taken for one."""
    from safetensors.torch import save

    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        remove_stale_temps(directory / name)
    state = weights if isinstance(weights, dict) else weights.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(save(state), directory / WEIGHTS_NAME)
    atomic_write_text(json.dumps(config, indent=2), directory / CONFIG_NAME)
    return directory


def export_dir(path: str | os.PathLike, key: str = "ckpt_path", reads_checkpoints: bool = True) -> Path:
    """`path`, or its `export/` when `path` is a run directory that holds an export and is not one itself. A run
    directory without one (a run exports when it finishes) is refused, naming its checkpoint when the reader
    (`reads_checkpoints`) takes one."""
    from ldm.checkpoints import CheckpointError

    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "export" / CONFIG_NAME).is_file():
        return path / "export"
    if (path / "checkpoints").is_dir():
        last = path / "checkpoints" / "last.ckpt"
        instead = f"its checkpoint, {key}={last}" if last.is_file() else f"one of its checkpoints ({path}/checkpoints)"
        raise CheckpointError(f"{key}={path} is a run directory without an export (a run writes export/ when it "
                              f"finishes; this one has not finished, or was stopped): run its ldm-train command again "
                              f"to finish it" + (f", or give {instead} (an autoencoder or latent diffusion run's; a "
                                                 f"text encoder run is read from its export alone)"
                                                 if reads_checkpoints else ""))
    return path


def trained_model_path(path: str | os.PathLike, key: str = "ckpt_path", reader: str = "this") -> Path:
    """`path` as the readers of a trained model take it (the pipeline, ldm-sample, ldm-eval, ldm-export): an export's
    folder for the `model.safetensors` inside it (the folder holds its config); a diffusers or transformers model
    refused, naming how ldm reads those (`reader`: what refuses it, in the message).

    Raises:
        CheckpointError: `path` is a diffusers pipeline folder, a diffusers or transformers model's folder (a
            pipeline's part) or a file inside one.
    """
    from ldm.checkpoints import not_ours
    from ldm.config import ConfigError

    path = Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    try:
        config = read_json_object(folder / CONFIG_NAME, key) if (folder / CONFIG_NAME).is_file() else {}
    except ConfigError:  # damaged: the export's reader names it
        config = {}
    pipeline = next((p for p in (folder, folder.parent) if (p / "model_index.json").is_file()), None)
    what = None
    if "_class_name" in config or "model_type" in config or pipeline == path:
        what = "a diffusers pipeline folder" if pipeline == path else \
            f"a {'diffusers ' + str(config['_class_name']) if '_class_name' in config else 'transformers'} folder" \
            + (f" (the {folder.name}/ of the diffusers pipeline {pipeline})" if pipeline else "")
        what = f"a file of {what}" if path.is_file() else what
    elif path.is_file() and path.suffix == ".safetensors" and not (folder / CONFIG_NAME).exists():
        what = _single_file_kind(path)
    if what is not None:
        raise not_ours(key, str(path), what, reader)
    if path.is_file() and path.name == WEIGHTS_NAME and config:
        return folder  # the weights of an export: read with its config (and latent statistics)
    return path


def _single_file_kind(path: Path, vae_written_by_ldm: bool = False) -> str | None:
    """What a .safetensors file in Stable Diffusion's original layout holds (its keys' names), None for another.
    `vae_written_by_ldm`: a stand-alone VAE only when ldm.convert wrote it (its "ldm" metadata entry), as the weights
    of an autoencoder export killed before its config.json was written have the same keys."""
    from safetensors import safe_open

    from ldm.convert.common import METADATA_KEY

    try:
        with safe_open(str(path), "pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
    except Exception:  # noqa: BLE001 -- not a safetensors file: its reader names the problem
        return None
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "a Stable Diffusion single file (the original layout)"
    if any(k.startswith("decoder.") for k in keys) and any(k.startswith("encoder.") for k in keys) \
            and (METADATA_KEY in metadata or not vae_written_by_ldm):
        return "a stand-alone VAE file (the original layout)"
    return None


def check_export_weights(path: str | os.PathLike, use_ema: bool, key: str = "ckpt_path") -> None:
    """Refuse `use_ema=false` for a directory read through a pipeline export of EMA weights: an export holds only the
    weights it was exported with, as its config.json records (`training.weights`: "ema" when the run kept an EMA,
    "raw" otherwise; an export without the record counts as EMA); the raw ones are in the run's checkpoints."""
    if use_ema or not Path(path).is_dir():
        return
    directory = export_dir(path, key)
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
        weights = (config.get("training") or {}).get("weights", "ema")
    except (OSError, ValueError, AttributeError):
        return  # not an export: its loader names the problem
    if weights == "raw":
        return
    if config.get("format") != PIPELINE_FORMAT:  # an autoencoder's config.json is the network's: no record
        if export_kind(config).startswith("an autoencoder"):  # other kinds: their loader refuses them
            warnings.warn(f"use_ema=false: {key}={path} is read through an autoencoder export, which holds the "
                          f"weights it was exported with (the EMA's when the run kept one); for the raw ones give a "
                          f"checkpoint (<run>/checkpoints/last.ckpt)", stacklevel=2)
        return
    from ldm.config import ConfigError

    last = directory.parent / "checkpoints" / "last.ckpt"
    instead = f"e.g. {key}={last}" if directory.name == "export" and last.is_file() else \
        "a checkpoint of the run that wrote it (<run>/checkpoints/last.ckpt)"
    raise ConfigError(f"use_ema=false asks for the raw weights, but {key}={path} is read through an export of the "
                      f"EMA weights, which holds no others: give a checkpoint instead, {instead}")


def run_target(directory: Path) -> str | None:
    """The `model._target_` a run directory's config.yaml records; None for any other folder or file."""
    import yaml

    try:
        model = (yaml.safe_load((directory / "config.yaml").read_text()) or {}).get("model")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return model.get("_target_") if isinstance(model, dict) else None


def is_export(directory: Path) -> bool:
    return (directory / CONFIG_NAME).is_file() and (directory / WEIGHTS_NAME).is_file()


def export_kind(config: dict[str, Any]) -> str:
    """What an export holds, told by its config.json, with the config key it is meant for."""
    if config.get("format") == PIPELINE_FORMAT:
        return "a latent diffusion pipeline export (ldm-sample / ldm-eval ckpt_path)"
    if {"ch_mult", "z_channels"} <= config.keys():
        return "an autoencoder export (model.autoencoder_path)"
    if {"num_heads", "max_length"} <= config.keys():
        return "a byte text encoder export (model.conditioner.name_or_path)"
    return "an export of another kind"


def check_export_destination(directory: str | os.PathLike, config: dict[str, Any]) -> None:
    """Refuse to write an export with `config` into a folder that holds a model of another kind (a diffusers or
    transformers model, or an ldm export of another kind): `save_pretrained` replaces an export of its own kind only,
    so a slip of the folder name cannot overwrite a stage-1 export or a Stable Diffusion folder."""
    from ldm.config import ConfigError

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a folder: choose another folder for the export")
    written = export_kind(config)
    held = None
    if (directory / "model_index.json").is_file():
        held = "a diffusers pipeline folder"
    elif (directory / CONFIG_NAME).is_file():
        try:
            existing = read_json_object(directory / CONFIG_NAME, "directory")
        except ConfigError:  # unreadable, damaged or no object
            held = f"a {CONFIG_NAME} that is no JSON object"
        else:
            if "_class_name" in existing or "model_type" in existing:
                held = f"a {'diffusers' if '_class_name' in existing else 'transformers'} model"
            elif export_kind(existing) != written:
                held = export_kind(existing).split(" (")[0]  # (without the key it is meant for)
    elif (directory / WEIGHTS_NAME).is_file():  # ldm-export format=single_file's <output_dir>/model.safetensors
        held = _single_file_kind(directory / WEIGHTS_NAME, vae_written_by_ldm=True)
    if held is not None:
        raise FileExistsError(f"{directory} holds {held}, which this would overwrite with "
                              f"{written.split(' (')[0]}: save into another folder (an export replaces only an export "
                              f"of its own kind)")


def export_config(directory: Path, config: dict[str, Any], schema: type[T], key: str) -> T:
    """`schema(**config)`, `config` being the config.json of the export in `directory`; an export of another kind
    (keys that `schema` lacks) raises ConfigError naming what it holds and `key`, the config key that pointed at it."""
    from ldm.config import ConfigError

    unknown = sorted(set(config) - {f.name for f in dataclasses.fields(schema)})
    if unknown:
        raise ConfigError(f"{key}={directory} holds {export_kind(config)}: its {CONFIG_NAME} has keys "
                          f"{unknown[:4]} that {schema.__name__} lacks; point {key} at the right export")
    try:
        return schema(**config)
    except ConfigError as err:
        raise ConfigError(f"{key}={directory}: its {CONFIG_NAME} is damaged ({err})") from None
    except TypeError as err:  # a value of the wrong type met a range check
        raise ConfigError(f"{key}={directory}: its {CONFIG_NAME} holds a value of the wrong type ({err})") from None


def absolute_if_local(value: str | None) -> str | None:
    """`value` as an absolute, resolved path when it names a local file or folder; hub names, paths that do not
    exist and None as given."""
    path = Path(value).expanduser() if value else None
    return str(path.resolve()) if path is not None and path.exists() else value


def glob_sorted(pattern: str) -> list[str]:
    """The sorted matches of a glob `pattern` whose leading folders, as far as they exist as written, are taken
    literally: in a sweep's `runs/lr[1e-3]/seed*/train-*.tar`, `lr[1e-3]` is a folder, not a character class."""
    parts = pattern.split(os.sep)
    literal = 0  # the leading parts that exist as written (a folder, not the last part)
    while literal < len(parts) - 1 and os.path.isdir(os.sep.join(parts[:literal + 1]) or os.sep):
        literal += 1
    if literal:
        pattern = os.sep.join([glob.escape(os.sep.join(parts[:literal])), *parts[literal:]])
    return sorted(glob.glob(pattern))


def read_json_object(path: Path, key: str) -> dict[str, Any]:
    """The JSON object in the file at `path`; ConfigError naming `key` and the file when it is unreadable, damaged or
    not an object."""
    from ldm.config import ConfigError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: {path} is not a readable JSON file ({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: {path} holds a JSON {type(data).__name__}, not an object: the file is damaged")
    return data


def read_lines(path: Path, key: str) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped (a BOM, as Notepad and Excel write, is dropped); ConfigError
    naming `key` when the file is not UTF-8."""
    from ldm.config import ConfigError

    try:
        # note: split at line ends only (read_text turns \r\n and \r into \n); splitlines also splits at form
        # feeds and Unicode separators inside a line, which made one prompt two
        lines = Path(path).read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{key}={path} is not UTF-8 text ({err.reason} at byte {err.start}): save it as UTF-8") \
            from None
    return [line.strip() for line in lines if line.strip()]


def load_export_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], directory: Path, key: str,
                        external: tuple[str, ...] = ()) -> None:
    """Load an export's weights into the network its config.json built. Weights that do not fit it (the two files
    copied from different exports) raise ConfigError naming `key`, the folder and the first differences, not torch's
    page of keys. `external`: prefixes of weights the export keeps elsewhere (a transformers text encoder)."""
    from ldm.config import ConfigError

    own = model.state_dict()
    differences = {
        "missing": [k for k in own if k not in state and not k.startswith(external)],
        "unexpected": [k for k in state if k not in own],
        "of another shape": [f"{k} {tuple(state[k].shape)} (config.json: {tuple(v.shape)})" for k, v in own.items()
                             if k in state and state[k].shape != v.shape]}
    if any(differences.values()):
        found = "; ".join(f"{len(names)} {what}, e.g. {', '.join(names[:2])}" for what, names in differences.items()
                          if names)
        raise ConfigError(f"{key}={directory}: the weights in {WEIGHTS_NAME} do not fit the network its {CONFIG_NAME} "
                          f"describes ({found}); the two files come from different exports: copy the whole export "
                          f"folder")
    model.load_state_dict(state, strict=not external)


def read_export(directory: Path, key: str = "path") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and the state dict written by `save_export` (a damaged file: ConfigError naming `key` and it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ldm.config import ConfigError

    config = read_json_object(directory / CONFIG_NAME, key)
    try:
        return config, load_file(str(directory / WEIGHTS_NAME))
    except (SafetensorError, OSError) as err:
        raise ConfigError(f"{key}: {directory / WEIGHTS_NAME} is not a readable safetensors file ({err})") from None
