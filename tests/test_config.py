"""Schema validation: a misspelt key, a wrong type or a value outside a fixed set fails with the key named; the
schemas registered with Hydra, so that conf/ states every default once."""

import dataclasses
import json
import os
import pickle
import shlex
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from ldm import config as configs
from ldm.cli.common import CONF_DIR
from ldm.config import SCHEMAS, ConfigError, check_choice, compose_node, instantiate, to_dataclass
from ldm.nn.unet import UNET_CONFIGS


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
    with pytest.raises(ConfigError, match=r"sampler='DDIM'"):  # as written: the samplers compare names exactly
        to_dataclass(Outer, {"sampler": "DDIM"}, prefix="model")


# --------------------------------------------------------------------------------------------------------------------
# conf/ extends the schemas registered with Hydra: composition gives every field, a YAML lists only what it changes.

CONF = Path(CONF_DIR)
# Every file of conf/ whose node a dataclass validates: model and data options, and the primary configs of the CLIs
# other than ldm-train (ldm-data, ldm-eval, ldm-sample, ...).
SCHEMA_FILES = sorted(p.relative_to(CONF).with_suffix("").as_posix()
                      for p in [*CONF.glob("model/*/*.yaml"), *CONF.glob("data/*.yaml"), *CONF.glob("*.yaml")]
                      if "/schema/" in p.read_text())


def _schema_of(name: str) -> type:
    """The dataclass behind conf/<name>.yaml, read from its defaults list (`- /schema/<path>@_here_`)."""
    entries = [e for e in OmegaConf.load(CONF / f"{name}.yaml").defaults if isinstance(e, str)]
    paths = [e.split("@")[0].removeprefix("/schema/") for e in entries if e.startswith("/schema/")]
    assert len(paths) == 1, f"conf/{name}.yaml must extend exactly one schema, found {paths}"
    target = hydra.utils.get_class(SCHEMAS[paths[0]])
    return target if dataclasses.is_dataclass(target) else target.Config


def _missing_keys(node: dict, schema: type, where: str) -> list[str]:
    """Fields of the dataclass `schema` (and of its nested dataclass fields) that `node` does not hold."""
    hints = typing.get_type_hints(schema)
    missing = [f"{where}.{f.name}" for f in dataclasses.fields(schema) if f.name not in node]
    for key, value in node.items():
        nested = [t for t in (typing.get_args(hints.get(key)) or (hints.get(key),)) if dataclasses.is_dataclass(t)]
        if nested and isinstance(value, dict):
            missing += _missing_keys(value, nested[0], f"{where}.{key}")
    return missing


def _leaves(node: Any, where: str = "") -> dict[str, Any]:
    """Dotted key -> value of every leaf of a plain nested dict (lists are leaves)."""
    if not isinstance(node, dict):
        return {where: node}
    return {k: v for key, value in node.items() for k, v in _leaves(value, f"{where}.{key}" if where else key).items()}


def _messages(err: BaseException | None) -> str:
    """An exception's message and those of its causes (Hydra names the full key in the cause)."""
    return "" if err is None else f"{err}\n{_messages(err.__cause__)}"


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_composition_gives_the_full_schema(name):
    # Every key exists after composition, so `model.conditioner.num_classes=10` works without Hydra's `+key=` syntax.
    node = OmegaConf.to_container(compose_node(name), resolve=False)
    assert _missing_keys(node, _schema_of(name), name) == []


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_yaml_lists_only_what_differs_from_what_it_extends(name, tmp_path):
    # The same file reduced to its defaults list composes to what it extends (the schema, a named size); no value of
    # the file may equal the value it replaces there. A default is stated once, in the dataclass.
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    OmegaConf.save(OmegaConf.masked_copy(raw, [k for k in ("defaults", "hydra") if k in raw]), conf / f"{name}.yaml")
    base = _leaves(OmegaConf.to_container(compose_node(name, conf_dir=str(conf)), resolve=False))
    body = OmegaConf.to_container(OmegaConf.masked_copy(raw, [k for k in raw if k not in ("defaults", "hydra")]))
    restated = {key: value for key, value in _leaves(body).items() if key in base and base[key] == value}
    assert restated == {}, f"conf/{name}.yaml restates what it extends; delete these lines: {restated}"


def test_named_unet_sizes_have_one_home():
    # model/ldm/sd15 takes SD 1.5's UNet from UNET_CONFIGS; model/ldm/tiny starts from "tiny" and changes two keys.
    sd15 = OmegaConf.to_object(compose_node("model/ldm/sd15").unet)
    assert sd15 == UNET_CONFIGS["sd15"]
    tiny = OmegaConf.to_object(compose_node("model/ldm/tiny").unet)
    assert tiny == dataclasses.replace(UNET_CONFIGS["tiny"], attention_levels=[0, 1], use_linear_proj=True)
    # Another size on the command line; the model file's own changes still apply on top.
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        small = hydra.compose("train", overrides=["model=ldm/tiny", "unet@model.unet=small"]).model.unet
    assert (small.model_channels, small.context_dim, small.attention_levels) == (128, 512, [0, 1])


def test_recipes_resting_on_schema_defaults_keep_their_numbers():
    # kl_f8 and sd15 list only what differs from the schemas, whose defaults are LDM's KL-f8 and SD 1.5's objective:
    # a changed default would change these recipes silently, so their published numbers are pinned here.
    kl_f8 = compose_node("model/autoencoder/kl_f8")
    assert (kl_f8.net.ch, kl_f8.net.ch_mult, kl_f8.net.num_res_blocks, kl_f8.net.embed_dim) == (128, [1, 2, 4, 4], 2, 4)
    assert (kl_f8.loss.rec_loss, kl_f8.loss.lpips_weight, kl_f8.loss.kl_weight, kl_f8.loss.gan_loss) == \
        ("l1", 1.0, 1e-6, "hinge")
    assert (kl_f8.loss.disc_start, kl_f8.loss.disc_weight, kl_f8.ema_decay, kl_f8.betas) == \
        (50001, 0.5, None, [0.5, 0.9])
    sd15 = compose_node("model/ldm/sd15")
    schedule = sd15.diffusion.schedule
    assert (sd15.diffusion.prediction, sd15.lr, sd15.conditioner.cond_drop_prob) == ("eps", 1e-4, 0.1)
    assert (schedule.num_train_timesteps, schedule.beta_schedule, schedule.beta_start, schedule.beta_end) == \
        (1000, "scaled_linear", 0.00085, 0.012)
    assert (schedule.zero_terminal_snr, schedule.timestep_spacing, schedule.steps_offset) == (False, "leading", 1)


def test_misspelt_key_or_wrong_type_in_a_yaml_fails_at_composition_naming_the_full_key(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    tiny = conf / "model" / "ldm" / "tiny.yaml"
    original = tiny.read_text()
    tiny.write_text(original.replace("  num_layers: 2\n", "  num_layres: 2\n"))
    with pytest.raises(ConfigCompositionException) as err:
        compose_node("model/ldm/tiny", conf_dir=str(conf))
    assert "model.ldm.conditioner.num_layres" in _messages(err.value)
    tiny.write_text(original.replace("warmup_steps: 50", "warmup_steps: fifty"))
    with pytest.raises(ConfigCompositionException) as err:
        compose_node("model/ldm/tiny", conf_dir=str(conf))
    assert "model.ldm.warmup_steps" in _messages(err.value)


def test_wrong_type_on_the_command_line_fails_at_composition_naming_the_full_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_node("model/ldm/tiny", ["unet.model_channels=many"])
    assert "model.ldm.unet.model_channels" in _messages(err.value)


def test_compose_node_works_beside_a_notebooks_own_hydra_initialize():
    """It raised "GlobalHydra is already initialized" inside `hydra.initialize_config_dir(...)` (a notebook's way)."""
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        assert compose_node("model/ldm/tiny", ["lr=0.5"]).lr == 0.5
        cfg = hydra.compose(config_name="train", overrides=["model=ldm/tiny", "paths.output_dir=/tmp/unused"])
        assert cfg.model.unet.model_channels == compose_node("model/ldm/tiny").unet.model_channels


def test_output_folders_expand_the_home_folder_and_the_reference_cache_follows_ldm_cache_dir(monkeypatch, tmp_path):
    """`output_dir="~/x"` from Python made a folder named "~" here (the paths read were expanded); `evaluate(cfg)` and
    the FID callback cached reference statistics under ~/.cache whatever LDM_CACHE_DIR said (ldm-eval's yaml read
    it)."""
    from ldm.callbacks.fid import FIDCallback
    from ldm.cli.export import ExportConfig
    from ldm.cli.sample import SampleConfig
    from ldm.eval.evaluator import EvalConfig

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert configs.check_output_dir("output_dir", "~/runs/x") == str(tmp_path / "home" / "runs" / "x")
    assert SampleConfig(ckpt_path="c", prompts=["a"], output_dir="~/s").output_dir == str(tmp_path / "home" / "s")
    assert ExportConfig(ckpt_path="c", output_dir="~/e").output_dir == str(tmp_path / "home" / "e")
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "cache"))
    expected = str(tmp_path / "cache" / "reference_stats")
    evaluation = EvalConfig(ckpt_path="c", output_dir="~/r")
    assert evaluation.output_dir == str(tmp_path / "home" / "r") and evaluation.cache_dir == expected
    assert FIDCallback(val_shards="v-*.tar").cache_dir == expected
    monkeypatch.setenv("LDM_CACHE_DIR", "")  # empty: unset, as the shell's ${LDM_CACHE_DIR:-~/.cache/ldm}
    assert EvalConfig(ckpt_path="c", output_dir="r").cache_dir == "~/.cache/ldm/reference_stats"


def test_composed_config_pickles_by_reference():
    # The submitit launcher pickles the composed config; its node classes are found again by name.
    node = compose_node("model/ldm/tiny")
    node_class = OmegaConf.get_type(node)
    assert node_class.__module__ == "ldm.config" and getattr(configs, node_class.__name__) is node_class
    assert OmegaConf.get_type(pickle.loads(pickle.dumps(node))) is node_class
    with pytest.raises(AttributeError):
        configs.NoSuchNode  # noqa: B018


def test_a_schema_key_is_registered_alone_a_folder_with_everything_under_it():
    # ldm-data registers "data", its own schema; "data/webdataset" as well would import Lightning (9 of 13 s at start).
    code = ("import json, sys; from hydra.core.config_store import ConfigStore;"
            " from ldm.config import register_schemas;"
            " register_schemas('data'); lightning = 'lightning' in sys.modules; register_schemas('model');"
            " repo = ConfigStore.instance().repo['schema'];"
            " print(json.dumps([{k: sorted(v) if isinstance(v, dict) else None for k, v in repo.items()}, lightning]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    stored, imported_lightning = json.loads(out)
    assert stored == {"data.yaml": None, "model": ["autoencoder.yaml", "contrastive.yaml", "ldm.yaml"]}
    assert not imported_lightning
    with pytest.raises(KeyError, match="no schema"):
        configs.register_schemas("dat")


# One error type for every bad config value: stage 1, contrastive, data, eval and sample raise ConfigError, which a
# sweep treats alike (it stops) and which still is a ValueError for callers that catch that.
BAD_VALUES = [
    ("model/autoencoder/kl_tiny", ["net.resolution=34"], r"resolution=34 is not divisible"),
    ("model/autoencoder/kl_tiny", ["net.norm_groups=7"], r"^model\.net: .*norm_groups=7"),
    ("model/autoencoder/kl_tiny", ["net.dropout=1.5"], r"^model\.net\.dropout=1.5 must lie in \[0, 1\)"),
    ("model/autoencoder/kl_tiny", ["betas=[0.5]"], "betas"),
    ("model/autoencoder/kl_tiny", ["loss.rec_loss=l3"], r"^model\.loss\.rec_loss='l3' is not allowed; choose one of"),
    ("model/autoencoder/kl_tiny", ["loss.gan_loss=wgan"], "gan_loss='wgan'"),
    ("model/autoencoder/kl_tiny", ["loss.disc.norm=layer"], r"^model\.loss\.disc\.norm='layer'"),
    ("model/autoencoder/kl_tiny", ["loss.disc.n_layers=0"], "n_layers=0"),
    ("model/contrastive/tiny", ["image.resolution=32", "text.num_heads=3"],
     r"^model\.text\.width=64 is not divisible by num_heads=3"),
    # out of range: a negative bound on the gradient norm would turn every step into gradient ascent
    ("model/autoencoder/kl_tiny", ["grad_clip=0"], r"^model\.grad_clip=0.0 must be > 0, or null for no clipping"),
    ("model/autoencoder/kl_tiny", ["lr=-1"], r"^model\.lr=-1.0 must be > 0"),
    ("model/autoencoder/kl_tiny", ["ema_decay=1.5"], r"^model\.ema_decay=1.5 must lie in \(0, 1\)"),
    ("model/autoencoder/kl_tiny", ["warmup_steps=-3"], r"^model\.warmup_steps=-3 must be >= 0"),
    ("model/autoencoder/kl_tiny", ["loss.kl_weight=-1"], r"^model\.loss\.kl_weight=-1.0 must be >= 0"),
    ("model/autoencoder/kl_tiny", ["loss.disc_factor=-1"], r"^model\.loss\.disc_factor=-1.0 must be >= 0"),
    ("model/autoencoder/kl_tiny", ["loss.disc.ndf=0"], r"^model\.loss\.disc\.ndf=0 must be >= 1"),
    ("model/autoencoder/kl_tiny", ["net.num_res_blocks=0"], r"^model\.net\.num_res_blocks=0 must be >= 1"),
    ("model/contrastive/tiny", ["image.resolution=32", "embed_dim=0"], r"^model\.embed_dim=0 must be >= 1"),
    ("model/contrastive/tiny", ["image.resolution=32", "weight_decay=-1"], r"^model\.weight_decay=-1.0 must be"),
    ("model/contrastive/tiny", ["image.resolution=32", "text.dropout=2"], r"^model\.text\.dropout=2.0 must lie in"),
    ("model/ldm/tiny", ["autoencoder_path=x", "betas=[0.9,1.5]"], r"^model\.betas=\[0.9, 1.5\] must hold two values"),
    ("model/ldm/tiny", ["autoencoder_path=x", "diffusion.schedule.beta_schedule=foo"],
     r"^model\.diffusion\.schedule\.beta_schedule='foo' is not allowed"),  # a nested schema's check: full key
    ("model/ldm/tiny", ["autoencoder_path=x", "unet.norm_groups=7"], r"^model\.unet: level 0 width .* norm_groups=7"),
    # the first encoder block normalises ch channels, below every level's ch * mult
    ("model/autoencoder/kl_tiny", ["net.ch=24", "net.ch_mult=[2,4]", "net.norm_groups=16"],
     r"^model\.net: channel count 24 .* norm_groups=16"),
    ("model/ldm/tiny", ["autoencoder_path=x", "conditioner.num_heads=0"], r"^model\.conditioner\.num_heads=0 must be"),
    ("model/ldm/tiny", ["autoencoder_path=x", "conditioner.num_layers=0"],
     r"^model\.conditioner\.num_layers=0 must be"),
    ("model/contrastive/tiny", ["image.resolution=32", "init_temperature=5.0"], "init_temperature"),
    ("data/webdataset", ["train_shards=x.tar", "val_shards=null", "batch_size=0"], "data.batch_size=0"),
    ("data", ["output_dir=out", "source=bad"], "source='bad'"),
    ("data", ["output_dir=out", "resolution=32", "num_samples=0", "val_samples=0"], "would write no shards"),
    ("data", ["output_dir=out", "source=folder", "input_dir=in", "holdout=[a red star]"],
     r"holdout=\[.a red star.\] would be ignored with source=folder"),
    ("data", ["output_dir=out", "source=folder", "input_dir=in", "num_samples=2"],
     r"num_samples=2 would be ignored with source=folder"),
    ("eval", ["ckpt_path=a.ckpt", "output_dir=out", "feature_dim=5"], "feature_dim=5"),
    ("sample", ["ckpt_path=a.ckpt", "output_dir=out", "prompts=[a]", "num_steps=0"], "num_steps=0"),
    # NaN passes every range check (each comparison is False): refused wherever it stands, nested keys included
    ("sample", ["ckpt_path=a.ckpt", "output_dir=out", "prompts=[a]", "guidance_scale=nan"],
     r"'guidance_scale': nan is not a number"),
    ("sample", ["ckpt_path=a.ckpt", "output_dir=out", "prompts=[a]", "eta=inf"], r"eta=inf must be a finite number"),
    ("eval", ["ckpt_path=a.ckpt", "output_dir=out", "guidance_scales=[1,inf]"], r"guidance_scales=\[1.0, inf\]"),
    ("model/ldm/tiny", ["autoencoder_path=x", "val_guidance_scale=nan"], r"'model\.val_guidance_scale': nan is not"),
    ("model/autoencoder/kl_tiny", ["loss.disc_weight=nan"], r"'model\.loss\.disc_weight': nan is not a number"),
    ("model/ldm/tiny", ["autoencoder_path=x", "betas=[0.9,nan]"], r"'model\.betas\[1\]': nan is not a number"),
    # infinity passed the range checks too: lr=inf diverged at step 5, logit_mean=inf trained at t=999 alone (loss 0)
    ("model/ldm/tiny", ["autoencoder_path=x", "lr=inf"], r"^model\.lr=inf must be a finite number > 0"),
    ("model/ldm/tiny", ["autoencoder_path=x", "weight_decay=inf"], r"^model\.weight_decay=inf must be a finite"),
    ("model/ldm/tiny", ["autoencoder_path=x", "diffusion.offset_noise=inf"],
     r"^model\.diffusion\.offset_noise=inf must be a finite number >= 0"),
    ("model/ldm/tiny", ["autoencoder_path=x", "diffusion.timestep_sampling=logit_normal", "diffusion.logit_mean=inf"],
     r"^model\.diffusion\.logit_mean=inf must be a finite number"),
    ("model/ldm/tiny", ["autoencoder_path=x", "diffusion.offset_noise=-0.1"],  # named min_snr_gamma first
     r"^model\.diffusion\.offset_noise=-0\.1 must be >= 0$"),
    # settings that apply to another choice were ignored silently
    ("model/ldm/tiny", ["autoencoder_path=x", "diffusion.logit_mean=1.0"],
     r"^model\.diffusion\.logit_mean=1\.0 / logit_std=1\.0 apply to timestep_sampling=logit_normal"),
    ("model/autoencoder/kl_tiny", ["grad_clip=inf"], r"^model\.grad_clip=inf must be a finite number > 0"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_VALUES)
def test_every_bad_config_value_raises_config_error(name, overrides, message):
    node = compose_node(name, overrides)
    if "seed" in node and OmegaConf.is_interpolation(node, "seed"):
        node.seed = 0  # ${seed} lives in the primary config
    with pytest.raises(ConfigError, match=message):
        if "_target_" in node:
            instantiate(node, name.split("/")[0])  # builds the object: constructor checks count too
        else:
            to_dataclass(_schema_of(name), node)


def test_range_checks_refuse_nan_for_configs_built_in_python():
    with pytest.raises(ConfigError, match="lr=nan must be > 0"):
        configs.check_positive(lr=float("nan"))
    with pytest.raises(ConfigError, match="lr=0 must be > 0"):
        configs.check_positive(lr=0)
    with pytest.raises(ConfigError, match="warmup_steps=nan must be >= 0"):
        configs.check_min(0, warmup_steps=float("nan"))


def test_help_of_a_command_lists_its_keys_not_ldm_trains_groups(tmp_path: Path):
    """`ldm-data --help` listed conf/'s groups (experiment, trainer, ...), which only ldm-train takes; and without
    conf/ (a wheel install) every command stopped with Hydra's traceback instead of one line naming LDM_CONF_DIR."""
    ldm_data = str(Path(sys.executable).parent / "ldm-data")
    shown = subprocess.run([ldm_data, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120).stdout
    assert "output_dir:" in shown and "num_samples:" in shown
    assert "experiment:" not in shown and "Configuration groups" not in shown
    missing = subprocess.run([ldm_data, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                             env={**os.environ, "LDM_CONF_DIR": str(tmp_path / "nowhere")})
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no configs at" in missing.stderr and "LDM_CONF_DIR" in missing.stderr
    shutil.copytree(CONF_DIR, tmp_path / "conf_copy")  # a relative LDM_CONF_DIR is the working directory's
    copied = subprocess.run([ldm_data, "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                            env={**os.environ, "LDM_CONF_DIR": "conf_copy"})
    assert copied.returncode == 0 and "output_dir:" in copied.stdout, copied.stderr[-2000:]


def test_pasteable_overrides_reach_hydra_as_written_through_a_shell():
    """A printed next-step command with a path holding a space or a letter beyond ASCII (a macOS home folder) gave a
    Hydra grammar error when pasted (`name_or_path=/runs/clip sp/export`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values = {"a.path": "/tmp/runs/clip sp/Données/export", "a.quoted": 'say "x" \\ y\\', "a.end": "C:\\runs\\",
              "a.plain": "runs/clip/export", "a.glob": "data/*.tar", "a.none": None, "a.list": [1, 2]}
    line = configs.pasteable(values)
    assert "a.plain=runs/clip/export" in line.split() and "'a.list=[1,2]'" in line.split()  # (zsh globs [)
    parsed = OverridesParser.create().parse_overrides(shlex.split(line))
    assert {o.key_or_group: o.value() for o in parsed} == values


def test_an_override_omegaconf_fails_to_apply_is_named_in_one_line():
    """`tags.x=1` (an item of a list by name): OmegaConf's ValueError passes through Hydra's override loop uncaught,
    a page of traceback; named with the list's own spelling."""
    from ldm.cli.common import override_not_applied

    with pytest.raises(ValueError) as error, hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra.compose(config_name="train", overrides=["tags.x=1"])
    assert override_not_applied(error.value) == ("tags.x=1: tags is a list, whose items are named by their index "
                                                 "(tags.0=VALUE); or give the whole list, tags=[A,B]")
    with pytest.raises(AssertionError) as error, hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        hydra.compose(config_name="data", overrides=["sizes.0=large"])  # (null: an AssertionError of OmegaConf's)
    assert override_not_applied(error.value) == ("sizes.0=large: sizes is null, so it has no items to set: give the "
                                                 "whole value, sizes=[A,B]")
    assert override_not_applied(ValueError("raised elsewhere")) is None


def test_an_override_hydra_cannot_read_is_refused_with_one_that_reads():
    """Hydra answers a value with a letter beyond ASCII or a `~` with its lexer's exception: ldm refuses it in one
    line with the override quoted (each element of a list or a sweep on its own: quoting the whole made one string
    of them), and reads nothing else as an override (a flag's value `--config-dir /a=b` was refused)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from ldm.cli.common import unparsable_override

    parser = OverridesParser.create()
    fixes = {"paths.output_dir=/Users/me/Données/run": ("paths.output_dir", "/Users/me/Données/run"),
             "paths.output_dir=~/runs": ("paths.output_dir", "~/runs"),
             "data.train_shards=[/d/é/a.tar,/d/é/b.tar]": ("data.train_shards", ["/d/é/a.tar", "/d/é/b.tar"]),
             # spaces around the elements, which Hydra drops unquoted: the quoted form kept them (' /d/é/b.tar')
             "data.train_shards=[/d/é/a.tar, /d/é/b.tar]": ("data.train_shards", ["/d/é/a.tar", "/d/é/b.tar"])}
    for arg, (key, value) in fixes.items():
        refusal = unparsable_override(["experiment=x", arg])
        assert refusal.startswith(f"{arg}: Hydra cannot read this override ("), refusal
        (override,) = parser.parse_overrides(shlex.split(refusal.rsplit("quotes: ", 1)[1]))
        assert (override.key_or_group, override.value()) == (key, value)
    sweep = unparsable_override(["run_name=ü,v"]).rsplit("quotes: ", 1)[1]
    assert [getattr(v, "text", v) for v in parser.parse_overrides(shlex.split(sweep))[0].sweep_iterator()] == \
        ["ü", "v"]
    # a key, an unclosed list, nested or quoted values, calls, braces: no quoted form offered (one that quoted the
    # whole read as another structure: a list of one string, a string for a sweep's choice(...))
    for arg in ("é=1", "data.train_shards=[a,é", "x=[a,[é,b]]", "x=[/d/é/a.tar],[/d/b.tar]", "x={a:1,b:é}",
                "x=choice(é,b)", 'x=é,"a,b"', "x=é\\,b", "data.train_shards=/d/é/{a,b}.tar"):
        assert unparsable_override([arg]).endswith("""Hydra's quotes (key="value", inside the shell's quotes)""")
    assert unparsable_override(["--config-dir", "/tmp/cd=x", "-cn", "a=b", "-m", "--cfg", "job", "a=1,2",
                                "b=range(1,3)", "c=choice(1,2)", "~d", "+e=", "++f=3", "g=", "h=${paths.root_dir}",
                                "i='é ü'", "j=[1,2]", "k={a: 1}", "hydra/launcher=slurm", "hydra.verbose=true",
                                "l=interval(0.1,1)", "m=tag(log,interval(1e-4,1e-2))", "n=glob(*)"]) is None


def test_an_option_of_a_group_kept_in_subfolders_is_listed_and_a_repeated_key_named():
    """model's options all lie in subfolders (autoencoder/kl_f8...), where Hydra's error lists none (model=kl_f8, the
    experiment's name); a brace pattern the shell expanded gave data.train_shards several times, the last one kept."""
    from ldm.cli.common import nested_group_option, null_group_override, repeated_keys

    refusal = nested_group_option(["trainer=cpu", "model=kl_f8"])
    assert refusal.startswith("model=kl_f8: the config group model has no option 'kl_f8'; choose one of [") and \
        "'autoencoder/kl_f8'" in refusal and "'ldm/tiny'" in refusal
    for fine in (["model=autoencoder/kl_f8"], ["experiment=kl_f88"], ["model=null"], ["model=a,b", "-m"],
                 ["--config-dir", "/mine", "model=kl_f8"]):  # other groups: Hydra lists their options itself
        assert nested_group_option(fine) is None, fine
    # a flag's value is no override (a --config-path value of logger=null was refused as one)
    assert nested_group_option(["-cp", "model=kl_f8"]) is None
    assert null_group_override(["--config-name", "logger=null"], "train") is None
    assert null_group_override(["logger=null"], "train").startswith("logger=null: logger is a config group")
    assert repeated_keys(["data.train_shards=a-0.tar", "data.train_shards=a-1.tar", "seed=1", "--cfg", "job",
                          "data.batch_size=4", "data.batch_size=2",  # a script's default overridden: not named
                          "-cd", "x=1", "x=2"]) == ["data.train_shards"]  # (x=1: the folder flag's value)
