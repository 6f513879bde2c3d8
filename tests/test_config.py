"""Schema validation: a misspelt key, a wrong type or a value outside a fixed set fails with the key named."""

from dataclasses import dataclass, field

import pytest

from ldm.config import ConfigError, check_choice, to_dataclass


@dataclass
class Inner:
    channels: int = 8
    mult: list[int] = field(default_factory=lambda: [1, 2])


@dataclass
class Outer:
    lr: float = 1e-4
    sampler: str = "ddim"
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        check_choice("sampler", self.sampler, ["ddpm", "ddim"])


def test_valid_node_builds_dataclass_and_ignores_target():
    cfg = to_dataclass(Outer, {"_target_": "x.Y", "lr": 3e-4, "inner": {"channels": 16}}, prefix="model")
    assert isinstance(cfg, Outer) and isinstance(cfg.inner, Inner)
    assert cfg.lr == 3e-4 and cfg.inner.channels == 16 and cfg.inner.mult == [1, 2]


def test_unknown_key_is_named_with_prefix():
    with pytest.raises(ConfigError, match=r"model\.lerning_rate") as err:
        to_dataclass(Outer, {"lerning_rate": 1.0}, prefix="model")
    assert "lr" in str(err.value)  # the valid keys are listed


def test_unknown_nested_key_is_named():
    with pytest.raises(ConfigError, match=r"model\.inner\.chanels"):
        to_dataclass(Outer, {"inner": {"chanels": 4}}, prefix="model")


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match=r"model\.inner\.channels"):
        to_dataclass(Outer, {"inner": {"channels": "many"}}, prefix="model")


def test_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"sampler='euler'.*\['ddpm', 'ddim'\]"):
        to_dataclass(Outer, {"sampler": "euler"}, prefix="model")
