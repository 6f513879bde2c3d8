"""Dataclass schemas for Hydra config nodes: stated once, registered with Hydra, validated with messages that name
the key and the fix.

Every configurable object (datamodule, LightningModule) declares its schema as a class attribute `Config`, a
dataclass; the CLIs have their own (`EvalConfig`, `SampleConfig`, ...). `register_schemas` stores each one in Hydra's
ConfigStore as `schema/<path of the YAML it backs>`, and every YAML file extends its schema and lists only what it
changes:

    defaults:
      - /schema/model/ldm@_here_     # every key of LatentDiffusionModule.Config, with its default
      - /unet@unet: tiny             # a named size (ldm.nn.unet.UNET_CONFIGS), also a stored node
      - _self_
    lr: 2.0e-3

Composition therefore yields the full schema, and Hydra refuses a misspelt key or a wrong type at composition, naming
the full key. `instantiate(node)` validates the node again (cross-field checks in `__post_init__`) and calls
`cls(config)`. Every bad config value raises `ConfigError`, so sweeps and CLIs treat all of them alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import hydra
import hydra.utils
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

T = TypeVar("T")

# ConfigStore path under schema/ (= the YAML file or group it backs, relative to conf/) -> the class whose `Config`
# it is, or the schema dataclass itself. A YAML file extends it with `- /schema/<path>@_here_` in its defaults list.
SCHEMAS: dict[str, str] = {
    "model/ldm": "ldm.modules.latent_diffusion.LatentDiffusionModule",
    "model/autoencoder": "ldm.modules.autoencoder.AutoencoderModule",
    "model/contrastive": "ldm.modules.contrastive.ContrastiveModule",
    "data/webdataset": "ldm.data.datamodule.WebDataModule",
    "data": "ldm.data.shards.WriteConfig",         # conf/data.yaml (ldm-data)
    "eval": "ldm.eval.evaluator.EvalConfig",       # conf/eval.yaml (ldm-eval)
    "sample": "ldm.cli.sample.SampleConfig",       # conf/sample.yaml (ldm-sample)
    "export": "ldm.cli.export.ExportConfig",       # conf/export.yaml (ldm-export)
    "encode": "ldm.data.encoding.EncodeConfig",    # conf/encode.yaml (ldm-encode)
}
# Named sizes, each stored as an option of its own group (`- /unet@unet: sd15`). Their home is the Python registry.
NAMED_SIZES: dict[str, str] = {"unet": "ldm.nn.unet.UNET_CONFIGS"}


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and what to do."""


REQUIRED = "REQUIRED"  # what an experiment sets for a model key the command line must give (`???` would be dropped
#                         in the merge onto a schema's null)


def check_required(config: Any, hints: dict[str, str]) -> None:
    """Raise ConfigError for the first key of `hints` that `config` leaves at REQUIRED, with that key's hint."""
    missing = [key for key in hints if getattr(config, key) == REQUIRED]
    if missing:
        raise ConfigError(f"model.{missing[0]} is required by this experiment: {hints[missing[0]]}")


def is_int(value: Any) -> bool:
    """True for an integer of any kind (Python's, numpy's) that is not a bool (JSON's and YAML's true/false are
    bools, and Python counts them as ints)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless `value` is one of `choices` (for use in a schema's __post_init__)."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {choices}")


def batch_entry(batch: Mapping[str, Any], key: str, config_key: str) -> Any:
    """`batch[key]`, where `key` is the config's `config_key` (model.image_key, ...); a ConfigError naming it and the
    entries the batch has where it has none."""
    if key not in batch:
        raise ConfigError(f"{config_key}={key!r}: the batch has no entry {key!r}, only {sorted(batch)} (ldm's loaders "
                          f"name a sample's image 'image', its caption (KEY.txt) 'caption' and its label 'label', "
                          f"whatever the shard members are called): leave {config_key} at its default, or give a "
                          f"data module whose batches hold {key!r}")
    return batch[key]


def check_min(minimum: float, **values: float | None) -> None:
    """Raise ConfigError naming the first key whose value is below `minimum`, infinite or NaN (None: unset,
    allowed)."""
    for key, value in values.items():
        if value is not None and not minimum <= value < math.inf:
            raise ConfigError(f"{key}={value} must be a finite number >= {minimum:g}" if value == math.inf else
                              f"{key}={value} must be >= {minimum:g}")


def unwritable(path: str | Path) -> tuple[str, Path] | None:
    """Why no folder can be written at `path`, and where: its nearest existing ancestor (or itself) is a file, a link
    that leads nowhere or a folder this user may not write in; None when it can."""
    existing = Path(path).absolute()
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    problem = "a link that leads nowhere" if existing.is_symlink() and not existing.exists() else \
        "Not a directory" if not existing.is_dir() else \
        "Permission denied" if not os.access(existing, os.W_OK | os.X_OK) else None
    return None if problem is None else (problem, existing)


def expand_home(path: str | None) -> str | None:
    """`path` with a leading `~` expanded (Hydra passes a quoted "~/x" on as it is, and the shell expands `key=~/x`
    only for keys without a dot); None or "" as given."""
    return str(Path(path).expanduser()) if path else path


def check_output_dir(key: str, path: str | None) -> str | None:
    """The output folder `path` with `~` expanded, as the readers of paths take it (not a folder named "~" here);
    ConfigError when it exists as a file or cannot be made (mkdir would fail with a bare errno, after the work)."""
    if not path:
        return path
    path = str(Path(path).expanduser())
    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{key}={path} is a file: give a folder (created when missing)")
    if (found := unwritable(path)) is not None:
        raise ConfigError(f"{key}={path} cannot be written ({found[0]}: {found[1]}): give a folder you can write "
                          f"(created when missing)")
    return path


def check_positive(**values: float | None) -> None:
    """Raise ConfigError naming the first key whose value is not > 0, or infinite, or NaN (None: unset, allowed)."""
    for key, value in values.items():
        if value is not None and not 0 < value < math.inf:
            raise ConfigError(f"{key}={value} must be a finite number > 0" if value == math.inf else
                              f"{key}={value} must be > 0")


def to_dataclass(schema: type[T], node: DictConfig | dict | T | None, prefix: str = "") -> T:
    """Validate `node` against the dataclass `schema` and return an instance of it.

    Unknown keys and wrong types raise ConfigError naming `prefix.key`; `_target_` is ignored.
    """
    if isinstance(node, schema):
        return node
    if node is None:
        node = {}
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = {k: v for k, v in dict(node).items() if k != "_target_"}
    where = f"{prefix}." if prefix else ""
    refuse_nan(node, where)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return _to_object(merged, where)
    except ConfigKeyError as err:
        key = f"{where}{err.full_key}" if getattr(err, "full_key", None) else where.rstrip(".")
        owner = err.object_type if dataclasses.is_dataclass(err.object_type) else schema
        fields = sorted(f.name for f in dataclasses.fields(owner))
        raise ConfigError(f"unknown config key '{key}' ({err.msg.splitlines()[0]}); valid keys of {owner.__name__}: "
                          f"{fields}") from None
    except ValidationError as err:
        key = f"{where}{err.full_key}" if getattr(err, "full_key", None) else where.rstrip(".")
        raise ConfigError(f"bad value for config key '{key}': {err.msg.splitlines()[0]}") from None
    except ConfigError as err:
        raise ConfigError(_with_prefix(str(err), where)) from None


def refuse_nan(node: dict[str, Any], where: str = "") -> None:
    """ConfigError naming the first float NaN in a config container (nested keys, lists as key[i]): every comparison
    with NaN is False, so no range check catches it."""
    if (key := _nan_key(node)) is not None:
        raise ConfigError(f"bad value for config key '{where}{key}': nan is not a number; give one")


def _nan_key(value: Any, key: str = "") -> str | None:
    """The dotted key of the first float NaN in a config container (lists as key[i]), None when there is none."""
    if isinstance(value, float) and math.isnan(value):
        return key
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _nan_key(v, f"{key}[{k}]" if isinstance(k, int) else f"{key}.{k}" if key else str(k))
        if found is not None:
            return found
    return None


def _with_prefix(message: str, where: str) -> str:
    """A nested schema's message with its node's prefix: on the key it starts with (`norm_groups=0 must ...` ->
    `model.unet.norm_groups=0 must ...`), else before it (`model.unet: ...`)."""
    if not where or message.startswith((where, f"{where.rstrip('.')}:")):
        return message
    return f"{where}{message}" if re.match(r"[A-Za-z_][\w.]*(=|\[)", message) else f"{where.rstrip('.')}: {message}"


def _to_object(node: DictConfig, where: str) -> Any:
    """`OmegaConf.to_object`, building nested dataclass nodes first, so that a check in a nested schema's
    `__post_init__` (which knows only its own keys) names the full key: model.unet.norm_groups, not norm_groups."""
    for key in node:
        child = node[key]
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            _to_object(child, f"{where}{key}.")
    try:
        return OmegaConf.to_object(node)
    except ConfigError as err:
        raise ConfigError(_with_prefix(str(err), where)) from None


def schema_node(target: str) -> type:
    """The dataclass stored for `target` (a value of SCHEMAS): a schema dataclass as it is; for a class with a
    `Config` schema, that schema plus a `_target_` field naming the class (the `<Class>Node` of this module)."""
    obj = hydra.utils.get_class(target)
    if dataclasses.is_dataclass(obj):
        return obj
    name = f"{obj.__name__}Node"
    node = globals().get(name)
    if node is None:
        node = dataclasses.make_dataclass(name, [("_target_", str, dataclasses.field(default=target))],
                                          bases=(obj.Config,))
        # note: a composed config holds a reference to its node class, and the submitit launcher pickles the
        # config; with this module and name, pickle finds the class again (through __getattr__ in a new process).
        node.__module__, node.__qualname__ = __name__, name
        globals()[name] = node
    return node


def __getattr__(name: str) -> type:
    """`ldm.config.<Class>Node`, built on first use (module-level __getattr__, PEP 562)."""
    for target in SCHEMAS.values():
        if f"{target.rsplit('.', 1)[-1]}Node" == name:
            return schema_node(target)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_schemas(*paths: str) -> None:
    """Store schemas in Hydra's ConfigStore; call it before composing conf/ (every CLI does, at import).

    Args:
        *paths: keys of SCHEMAS, or folders of them ("model" stores model/ldm, model/autoencoder, ...); none: all.
            A key is taken alone ("data" is ldm-data's schema, not data/webdataset too: that one imports Lightning,
            9 of ldm-data's 13 s). The named sizes (NAMED_SIZES) are stored with any model schema.
    """
    def matches(key: str, path: str) -> bool:
        return key == path or (path not in SCHEMAS and key.startswith(f"{path}/"))

    selected = [p for p in SCHEMAS if not paths or any(matches(p, q) for q in paths)]
    unknown = [q for q in paths if not any(matches(p, q) for p in SCHEMAS)]
    if unknown:
        raise KeyError(f"no schema {unknown}; known: {sorted(SCHEMAS)}")
    store = ConfigStore.instance()
    for path in selected:
        group, _, name = path.rpartition("/")
        store.store(group=f"schema/{group}".rstrip("/"), name=name, node=schema_node(SCHEMAS[path]))
    if any(path.startswith("model/") for path in selected):
        for group, registry in NAMED_SIZES.items():
            for name, config in hydra.utils.get_object(registry).items():
                store.store(group=group, name=name, node=config)


def compose_node(name: str, overrides: Sequence[str] = (), conf_dir: str | None = None) -> DictConfig:
    """One file of conf/ composed with its schema, e.g. `compose_node("model/ldm/tiny")`: the full node that
    `ldm-train model=ldm/tiny` places under `model` (interpolations into other nodes, such as ${seed}, unresolved).

    Args:
        name: the file's path under conf/, without .yaml.
        overrides: value overrides relative to the node, e.g. ["lr=1e-3", "unet.model_channels=16"].
        conf_dir: the config directory; None: ldm.cli.common.CONF_DIR.
    """
    from ldm.cli.common import CONF_DIR  # note: imported here, ldm.cli.common imports this module

    register_schemas()
    # Composed as a primary config, a file lands at its folder's package (model/ldm/tiny: model.ldm).
    package = name.rpartition("/")[0].replace("/", ".")
    prefixed = [re.sub(r"^([+~]*)", rf"\g<1>{package}.", o) if package else o for o in overrides]
    global_hydra = GlobalHydra.instance()
    outer = global_hydra.hydra  # a notebook's own hydra.initialize(...), taken aside and put back after
    global_hydra.clear()
    try:
        with hydra.initialize_config_dir(config_dir=conf_dir or CONF_DIR, version_base="1.3"):
            cfg = hydra.compose(config_name=name, overrides=prefixed)
    finally:
        if outer is not None:
            GlobalHydra.instance().clear()
            GlobalHydra.instance().initialize(outer)
    return OmegaConf.select(cfg, package) if package else cfg


def instantiate(node: DictConfig, prefix: str = "", **kwargs: Any) -> Any:
    """Build `node._target_` from its validated `Config` dataclass: `cls(config, **kwargs)`."""
    target = node.get("_target_") if node is not None else None
    if not target:
        raise ConfigError(f"config node '{prefix}' has no _target_ naming the class to build")
    cls = hydra.utils.get_class(target)
    schema = getattr(cls, "Config", None)
    if schema is None:
        raise ConfigError(f"{target} declares no `Config` dataclass schema")
    return cls(to_dataclass(schema, node, prefix), **kwargs)


def asdict(config: Any) -> dict[str, Any]:
    """A dataclass config as plain nested dicts (what checkpoints store)."""
    return dataclasses.asdict(config)


def override_value(value: Any) -> str:
    """`value` as a Hydra override writes it (`null`, `true`, `[1,2]`), for a message's fix to paste."""
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return json.dumps(value, separators=(",", ":")) if value is None or isinstance(value, (bool, list, dict)) \
        else str(value)


def hydra_quoted(text: str) -> str:
    """`text` as a Hydra override value: as it is where Hydra's unquoted grammar takes it, else in Hydra's double
    quotes (where backslashes are escapes only before a quote or the end)."""
    return text if re.fullmatch(r"[\w\-+./:@%*?]*", text, re.ASCII) else \
        '"' + re.sub(r'(\\*)("|$)', lambda m: m[1] * 2 + "\\" * bool(m[2]) + m[2], text) + '"'


def pasteable(overrides: dict[str, Any]) -> str:
    """`key=value` overrides to paste into a shell: a string that Hydra's unquoted grammar would not take (a space, a
    letter beyond ASCII, a quote, `~`) in Hydra's quotes (`hydra_quoted`), and each override in the shell's quotes
    where it needs them."""
    return " ".join(shlex.quote(f"{key}={hydra_quoted(value) if isinstance(value, str) else override_value(value)}")
                    for key, value in overrides.items())
