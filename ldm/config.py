"""Dataclass schemas for Hydra config nodes: validation with messages that name the key and the fix.

Every configurable object (datamodule, LightningModule) declares its schema as a class attribute `Config`, a
dataclass. A config node names the class in `_target_`; `instantiate(node)` validates the node against the schema and
calls `cls(config)`. A misspelt key, a wrong type or a value outside a fixed set fails here, before anything is built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar

import hydra.utils
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and what to do."""


def check_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless `value` is one of `choices` (for use in a schema's __post_init__)."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not allowed; choose one of {choices}")


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
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
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
        raise ConfigError(f"{where}{err}" if where and not str(err).startswith(where) else str(err)) from None


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
