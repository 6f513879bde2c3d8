"""ldm-train's configuration surface: every experiment, trainer and launcher composes; typos fail naming the key; the
console script trains a few steps and leaves a resumable run directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict
from scale_helpers import REPO, cli_env, compose_train, tiny_overrides
from test_config import _missing_keys

from ldm import config as configs
from ldm.cli.common import CONF_DIR, check_trainer
from ldm.cli.train import apply_ddp_needs, build_trainer, instantiate_callbacks, train
from ldm.config import ConfigError
from ldm.data.datamodule import WebDataModule
from ldm.modules.latent_diffusion import LatentDiffusionModule

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (Path(CONF_DIR) / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_validates(experiment):
    cfg = compose_train([f"experiment={experiment}", "paths.output_dir=/tmp/unused"])
    required = [k for k in ("init_from", "autoencoder_path") if cfg.model.get(k) == "REQUIRED"]
    if required:  # the experiment's own keys for the command line: refused, naming the first
        with pytest.raises(ConfigError, match=rf"model.{required[0]} is required by this experiment: .* e\.g\. "
                                              rf"model.{required[0]}="):
            configs.to_dataclass(hydra.utils.get_class(cfg.model._target_).Config, cfg.model, "model")
        for key in required:
            cfg.model[key] = "/tmp/unused/sd"
    if "autoencoder_path" in cfg.model and cfg.model.autoencoder_path is None:
        cfg.model.autoencoder_path = "/tmp/unused/export"  # required on the command line for stage 2
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for group in ("model", "data"):  # the schemas check every key and type, without building anything
        schema = hydra.utils.get_class(cfg[group]._target_).Config
        configs.to_dataclass(schema, cfg[group], group)


def test_cfg_job_prints_every_schema_key_and_the_experiment_prompts():
    # The console script stores the schemas before Hydra composes: --cfg job shows the full, validated config.
    result = subprocess.run([sys.executable, "-m", "ldm.cli.train", "experiment=quickstart_ldm", "--cfg", "job"],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = OmegaConf.to_container(OmegaConf.create(result.stdout))
    assert _missing_keys(cfg["model"], LatentDiffusionModule.Config, "model") == []
    assert _missing_keys(cfg["data"], WebDataModule.Config, "data") == []
    assert cfg["model"]["_target_"] == "ldm.modules.latent_diffusion.LatentDiffusionModule"
    assert cfg["model"]["val_prompts"][0] == "a large red circle in the center on a white background"
    # The model alone samples the validation batch's captions: no shapes prompts outside the shapes experiments.
    assert compose_train(["model=ldm/tiny"]).model.val_prompts == []


def test_process_count_reads_devices_as_lightning_does():
    """The world size a resume is checked against: `trainer.devices="2"` (a string, which Lightning takes as 2) was
    counted as 1 process, and a legitimate mid-epoch resume of a 2-process run refused as 2 -> 1."""
    from ldm.cli.common import process_count

    for devices, nodes, count in ((2, 1, 2), ("2", 1, 2), ("0,1", 2, 4), ([0, 1, 2], 1, 3), ("auto", 1, 1), (1, 3, 3)):
        assert process_count({"devices": devices, "num_nodes": nodes, "accelerator": "cpu"}) == count, devices


def test_the_config_tree_cuts_long_lists(capsys: pytest.CaptureFixture):
    """A shard list of 20,000 paths (a documented form of data.train_shards) printed 20,000 lines at every start:
    lists of more than 8 items show their first three and a count; config.yaml keeps them whole."""
    from ldm.cli.common import print_config_tree

    shards = [f"/data/{i:05d}.tar" for i in range(20000)]
    print_config_tree(OmegaConf.create({"data": {"train_shards": shards, "seeds": [1, 2]}, "tags": list("abcdefghij")}))
    out = capsys.readouterr().out
    assert "/data/00002.tar" in out and "/data/00003.tar" not in out and "... and 19997 more (20000 in all)" in out
    assert "- 1\n" in out and "... and 7 more (10 in all)" in out and len(out.splitlines()) < 30


@pytest.mark.parametrize("trainer", TRAINERS)
def test_every_trainer_config_composes(trainer):
    cfg = compose_train([f"trainer={trainer}", "paths.output_dir=/tmp/unused"])
    assert cfg.trainer._target_ == "lightning.Trainer"
    if trainer in ("gpu", "ddp", "fsdp"):
        assert cfg.trainer.precision == "bf16-mixed"
    if trainer in ("ddp", "ddp_cpu", "fsdp"):
        hydra.utils.instantiate(cfg.trainer.strategy)  # the strategy's arguments are valid


@pytest.mark.parametrize("trainer", TRAINERS)
def test_a_gpu_trainer_is_refused_by_name_where_torch_sees_no_gpu(trainer):
    """`ldm-train trainer=gpu` (or ddp / fsdp) copied to a CPU machine stops before anything is built or printed."""
    node = compose_train([f"trainer={trainer}", "paths.output_dir=/tmp/unused"]).trainer
    if node.get("accelerator") in ("gpu", "cuda") and not torch.cuda.is_available():
        with pytest.raises(configs.ConfigError, match=f"trainer.accelerator={node.accelerator} but torch sees no "
                                                      f"CUDA GPU on this machine; use trainer=cpu"):
            check_trainer(node)
    else:
        check_trainer(node)


def test_trainer_keys_are_lightnings_arguments_or_hydras_own():
    """A key the Trainer does not take failed inside Lightning, after the config tree, without a hint; Hydra's own
    instantiation keys (`_convert_`, `_recursive_`) are no Trainer arguments and pass."""
    node = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused"]).trainer
    with open_dict(node):
        node.profiler, node.detect_anomaly, node._convert_ = "simple", True, "all"
    check_trainer(node)
    with open_dict(node):
        node.max_stepz = 3
    with pytest.raises(configs.ConfigError, match=r"^trainer\.max_stepz is not an argument of Lightning's Trainer: "
                                                  r"did you mean trainer\.max_steps\?$"):
        check_trainer(node)


def test_devices_and_precision_are_checked_before_the_config_tree():
    """trainer.devices=0 or precision=17 failed inside Lightning's Trainer, after the config tree, naming `trainer`."""
    from ldm.cli.common import check_devices

    for devices in (1, 2, -1, "auto", "2", "0,1", "1,", [0, 1]):
        check_devices(devices)
    for devices in (0, -3, "abc", "00", [], [-1], [0, 0], "0,0", True):  # "00" and [0, 0] passed, Lightning refused
        with pytest.raises(configs.ConfigError, match=r"trainer\.devices=.* must be a number of devices >= 1, -1"):
            check_devices(devices)
    node = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused"]).trainer
    for devices in (1, 2, "2", "auto"):
        node.devices = devices
        check_trainer(node)
    default = compose_train(["trainer=default", "paths.output_dir=/tmp/unused"]).trainer  # accelerator auto
    for devices in (0, -1, "0,1", [0, 1]):  # Lightning's CPU accelerator takes a count alone
        for trainer in (node, default) if not torch.cuda.is_available() else (node,):
            trainer.devices = devices
            with pytest.raises(configs.ConfigError, match=r"trainer\.devices=.* must be a number of processes >= 1, "
                                                          r"or auto on the CPU"):
                check_trainer(trainer)
    node.devices = 1
    for precision in ("32-true", "bf16-mixed", 32):
        node.precision = precision
        check_trainer(node)
    for precision in ("16-mixed", 16):  # Lightning ran bf16-mixed instead, the run's config saying 16-mixed
        node.precision = precision
        with pytest.raises(configs.ConfigError, match=rf"trainer\.precision={precision} \(fp16 with a GradScaler\) "
                                                      r"needs a CUDA GPU; on the CPU use trainer\.precision=bf16"):
            check_trainer(node)
    node.precision = "transformer-engine"  # accepted, then the Trainer failed after the config tree was printed
    with pytest.raises(configs.ConfigError, match=r"transformer-engine needs a CUDA GPU and NVIDIA's transformer_eng"):
        check_trainer(node)
    node.precision = 17
    with pytest.raises(configs.ConfigError, match=r"trainer\.precision=17 is not a precision Lightning takes"):
        check_trainer(node)
    node.precision = "32-true"
    for key in ("accumulate_grad_batches", "max_steps", "num_nodes"):  # accepted, then Lightning failed at batch 1
        with pytest.raises(configs.ConfigError, match=rf"trainer\.{key}=null must be an integer"):
            check_trainer({**node, key: None})
    # Lightning keeps max_steps=True (one step) and 2.5 as given
    for key, value, kind in (("max_steps", True, "bool"), ("accumulate_grad_batches", True, "bool"),
                             ("max_steps", 2.5, "float"), ("check_val_every_n_epoch", 1.0, "float")):
        with pytest.raises(configs.ConfigError, match=rf"trainer\.{key}={value} must be an integer \(got {kind}\)"):
            check_trainer({**node, key: value})
    for key, value, message in (("accumulate_grad_batches", 0, "must be >= 1"), ("max_steps", -2, "must be >= -1"),
                                ("val_check_interval", 0, "must be > 0: training batches between validations")):
        with pytest.raises(configs.ConfigError, match=rf"trainer\.{key}={value} {message}"):
            check_trainer({**node, key: value})
    for precision in ("64-true", 64):  # accepted, then the fp32 autoencoder and latents met fp64 weights at step 1
        node.precision = precision
        with pytest.raises(configs.ConfigError, match=rf"trainer\.precision={precision} would train in fp64.* use "
                                                      r"trainer\.precision=32-true"):
            check_trainer(node)


def test_compile_on_the_cpu_without_a_compiler_is_refused_at_start(monkeypatch: pytest.MonkeyPatch):
    """inductor builds C++ for the CPU: without a compiler the run stopped after its first step, in inductor's words
    (InvalidCxxCompiler), naming no config key."""
    node = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused"]).trainer
    for works in (sys.executable, f"/usr/bin/env {sys.executable}"):  # a command, as inductor splits it (ccache g++)
        monkeypatch.setenv("CXX", works)  # (any program that exists: what is looked for is the file)
        check_trainer(node, compile_networks=True)
    for missing in ("/nonexistent/g++", "", 'g++ "'):  # an empty CXX, or quotes left open: inductor fails too
        monkeypatch.setenv("CXX", missing)
        given = re.escape(missing)
        with pytest.raises(configs.ConfigError, match=rf"^compile=true on the CPU needs a C\+\+ compiler for torch."
                                                      rf"compile \(inductor builds its kernels with CXX='{given}', "
                                                      rf"not found\): .* or set compile=false$"):
            check_trainer(node, compile_networks=True)
    check_trainer(node)  # eager: no compiler needed


@pytest.mark.parametrize(("devices", "num_nodes", "processes"), [(1, 1, 1), (2, 1, 2), ([0, 1], 1, 2), (1, 4, 4)])
def test_fsdp_over_several_processes_refuses_what_it_cannot_run(devices, num_nodes, processes,
                                                                monkeypatch: pytest.MonkeyPatch):
    """The latent diffusion model shards its UNet (tests/test_scale_fsdp.py), but not compiled; the autoencoder and the
    contrastive encoder read parameters that FSDP keeps sharded outside its forward: one process, or DDP."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the GPU checks are not the ones here
    node = compose_train(["trainer=fsdp", "paths.output_dir=/tmp/unused"]).trainer
    node.devices, node.num_nodes = devices, num_nodes
    check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule")
    if processes == 1:
        check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule", compile_networks=True)
    else:
        with pytest.raises(configs.ConfigError, match=rf"^compile=true with trainer=fsdp over {processes} processes is "
                                                      rf"not supported: .* set compile=false, or use trainer=ddp$"):
            check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule", compile_networks=True)
    for model in ("ldm.modules.autoencoder.AutoencoderModule", "ldm.modules.contrastive.ContrastiveModule"):
        if processes == 1:
            check_trainer(node, model)
            continue
        name = model.rsplit(".", 1)[-1]
        with pytest.raises(configs.ConfigError, match=rf"^trainer=fsdp over {processes} processes is not supported "
                                                      rf"for {name} .* use trainer=ddp$"):
            check_trainer(node, model)
    # FSDP restored the AdamW moments of NHWC weights scrambled (resumed runs diverged from uninterrupted ones)
    with pytest.raises(configs.ConfigError, match=r"^channels_last=true with trainer=fsdp is not supported: .* set "
                                                  r"channels_last=false, or use trainer=ddp$"):
        check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule", channels_last=True)
    ddp = compose_train(["trainer=ddp", "paths.output_dir=/tmp/unused"]).trainer
    ddp.devices, ddp.num_nodes = devices, num_nodes
    check_trainer(ddp, "ldm.modules.autoencoder.AutoencoderModule")
    check_trainer(ddp, "ldm.modules.latent_diffusion.LatentDiffusionModule", channels_last=True)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("gradient_clip_val", 1.0, "set model.grad_clip"), ("accumulate_grad_batches", 2, "raise data.batch_size")])
def test_trainer_arguments_the_manual_autoencoder_cannot_honour_are_refused_before_it_is_built(key, value, message):
    node = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused", f"trainer.{key}={value}"]).trainer
    with pytest.raises(ConfigError, match=rf"trainer.{key}={value} is not supported by AutoencoderModule.*{message}"):
        check_trainer(node, "ldm.modules.autoencoder.AutoencoderModule")
    check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule")  # automatic optimization: fine
    if key == "accumulate_grad_batches":  # micro-batches of InfoNCE are not one larger batch
        with pytest.raises(ConfigError, match=rf"trainer.{key}={value} is not supported by ContrastiveModule: InfoNCE"):
            check_trainer(node, "ldm.modules.contrastive.ContrastiveModule")


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_spawn_find_unused_parameters_true", "ddp_fork",
                                      "ddp_notebook", {"_target_": "lightning.pytorch.strategies.DDPStrategy",
                                                       "start_method": "spawn"}])
def test_strategies_that_start_the_ranks_from_this_process_are_refused(strategy):
    """Spawned or forked ranks ran without Hydra's logging (no throughput lines, an empty train.log), left the signal
    to the launcher (SIGTERM killed it, the ranks ran on orphaned) and reported a config mistake as a squashed
    traceback."""
    node = compose_train(["trainer=ddp_cpu", "paths.output_dir=/tmp/unused"]).trainer
    node.strategy = strategy
    with pytest.raises(ConfigError, match=r"trainer\.strategy(\.start_method)?=\S*(spawn|fork|notebook)\S* starts the "
                                          r"ranks from ldm-train's own process.*use trainer=ddp_cpu on the CPU"):
        check_trainer(node)
    node.strategy = {"_target_": "lightning.pytorch.strategies.DDPStrategy", "start_method": "popen"}
    check_trainer(node)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_precision_weights_are_refused_naming_the_mixed_precision(precision):
    """`-true` half precisions cast the weights: the fp32 latents then meet a bf16 UNet at the first step."""
    node = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused", f"trainer.precision={precision}"]).trainer
    with pytest.raises(ConfigError, match=rf"trainer.precision={precision} .*use trainer.precision=bf16-mixed"):
        check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule")
    node.precision = "bf16-mixed"
    check_trainer(node, "ldm.modules.latent_diffusion.LatentDiffusionModule")


@pytest.mark.parametrize(("overrides", "expected"), [
    (["trainer=ddp_cpu"], None), (["trainer=ddp_cpu", "trainer.strategy=ddp"], "ddp_find_unused_parameters_true"),
    (["trainer=ddp_cpu", "trainer.strategy=ddp_find_unused_parameters_false"], "ddp_find_unused_parameters_true"),
    (["trainer=cpu", "trainer.strategy=ddp_find_unused_parameters_true"], "ddp_find_unused_parameters_true"),
    (["trainer=cpu", "trainer.devices=2"], "ddp_find_unused_parameters_true"),  # auto: Lightning would pick DDP
    (["trainer=cpu"], "auto")])  # one process: nothing to search
def test_ddp_searches_unused_parameters_for_the_gan_autoencoder_however_the_strategy_is_named(overrides, expected):
    """The autoencoder's two backward passes leave parameters without gradients: DDP must look for them, whether
    trainer.strategy is a node (trainer=ddp_cpu), a registry name or auto over several processes; the diffusion
    model keeps DDP's faster default."""
    for model, searches in (("quickstart_vae", True), ("quickstart_ldm", False)):
        cfg = compose_train(overrides + ["paths.output_dir=/tmp/unused", f"experiment={model}"])
        given = cfg.trainer.strategy
        apply_ddp_needs(cfg)
        if expected is None:
            assert cfg.trainer.strategy.find_unused_parameters is searches
        else:
            assert cfg.trainer.strategy == (expected if searches else given)
            L.Trainer(accelerator="cpu", devices=2, strategy=cfg.trainer.strategy, logger=False)  # a known name


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_configs_compose(launcher):
    with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra.compose(config_name="train", overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("LocalLauncher" if launcher == "local" else "SlurmLauncher")
    if launcher == "slurm":  # submitit must send our requeue signal and never requeue by itself
        assert cfg.hydra.launcher.additional_parameters.signal.startswith("USR1@")
        assert cfg.hydra.launcher.max_num_timeout == 0


@pytest.mark.parametrize(("overrides", "bar"), [([], True), (["callbacks.progress=null"], False),
                                                 (["+trainer.enable_progress_bar=false"], False)])
def test_the_progress_bar_is_the_progress_callback_alone(overrides, bar):
    # Lightning adds its own bar (up to 100 redraws a second) when the callbacks have none: nulling ours leaves none.
    cfg = compose_train(["paths.output_dir=/tmp/unused", *overrides])
    trainer = build_trainer(cfg, instantiate_callbacks(cfg.callbacks), [])
    if bar:
        assert type(trainer.progress_bar_callback).__name__ == "RichProgressBar"
        assert trainer.progress_bar_callback.refresh_rate == 10
    else:
        assert trainer.progress_bar_callback is None


def test_plugins_of_ones_own_join_the_commands():
    """`+trainer.plugins=[...]` passed the Trainer-argument check, then ldm-train's own plugins replaced them."""
    from scale_helpers import OwnEnvironment

    from ldm.callbacks.checkpoint import AtomicCheckpointIO

    cfg = compose_train(["paths.output_dir=/tmp/unused", "trainer=ddp_cpu", "trainer.devices=2",
                         "+trainer.plugins=[{_target_: scale_helpers.OwnEnvironment}]"])
    trainer = build_trainer(cfg, instantiate_callbacks(cfg.callbacks), [])
    assert isinstance(trainer.strategy.cluster_environment, OwnEnvironment)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


@pytest.mark.parametrize("extra", [["logger=none"], ["debug=fast_dev_run"]])
def test_a_run_without_loggers(shapes_shards, tmp_path, extra):
    """No loggers: the learning-rate monitor of the default callbacks, which Lightning refuses then, is left out."""
    out = tmp_path / "run"
    overrides = [o for o in tiny_overrides(shapes_shards, out, max_steps=2, every=2) if o != "logger=csv"]
    train(compose_train([*overrides, *extra, "model.net.ch=16"]))
    assert not (out / "csv").exists() and not (out / "wandb").exists()


def test_misspelt_override_is_named():
    with pytest.raises(ConfigCompositionException, match="max_stepz"):
        compose_train(["trainer.max_stepz=3"])
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_train(["model.lrr=1e-4"])


def test_misspelt_added_model_key_is_named_before_training(shapes_shards, tmp_path):
    cfg = compose_train(tiny_overrides(shapes_shards, tmp_path / "run", max_steps=1, every=1) + ["+model.lrr=1e-4"])
    with pytest.raises(configs.ConfigError, match=r"model\.lrr"):
        train(cfg)
    # top-level keys were not checked: `+seeed=3` trained with seed 42, and `+unet=small` (what Hydra's own message
    # suggests for `unet=small`) added a node nothing reads
    base = tiny_overrides(shapes_shards, tmp_path / "run", max_steps=1, every=1)
    with pytest.raises(configs.ConfigError, match=r"seeed: ldm-train reads no top-level key 'seeed' .*did you mean "
                                                  r"seed\?"):
        train(compose_train([*base, "+seeed=3"]))
    for added, fix in (("+unet=small", r"unet@model\.unet=OPTION \(a config group\)"),  # (the CLI names small)
                       ("+unet.model_channels=32", r"model\.unet\.model_channels=32"),
                       ("+lr=1e-3", r"model\.lr=0\.001"),
                       ("+diffusion.prediction=eps", r"model\.diffusion\.prediction=eps")):
        with pytest.raises(configs.ConfigError, match=rf"no top-level key .* model\.\w+ is where it acts: {fix}$"):
            train(compose_train([*base, "experiment=quickstart_ldm", added]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("experiment", [None, *sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))])
def test_the_top_level_keys_are_those_ldm_train_checks(experiment):
    from ldm.cli.train import TOP_LEVEL_KEYS

    cfg = compose_train([] if experiment is None else [f"experiment={experiment}"])
    assert sorted(cfg) == sorted(TOP_LEVEL_KEYS)


def test_train_checks_the_config_as_the_command_does(shapes_shards, tmp_path):
    """`ldm.cli.train.train(cfg)` is the command as a function: a negative seed ended in Lightning's bare ValueError,
    and max_steps=0 exported untrained weights, where ldm-train refused both."""
    base = tiny_overrides(shapes_shards, tmp_path / "run", max_steps=1, every=1)
    with pytest.raises(configs.ConfigError, match=r"seed=-1 must be an integer in \[0, 2\*\*32\)"):
        train(compose_train([*base, "seed=-1"]))
    with pytest.raises(configs.ConfigError, match="trainer.max_steps=0 trains nothing"):
        train(compose_train([*base, "trainer.max_steps=0"]))
    # NaN in a node Hydra builds without a schema (a callback's FID guidance failed at its first evaluation)
    with pytest.raises(configs.ConfigError, match=r"'callbacks\.checkpoint\.every_n_train_steps': nan is not a "):
        train(compose_train([*base, "callbacks.checkpoint.every_n_train_steps=nan"]))
    with pytest.raises(configs.ConfigError, match=r"trainer\.gradient_clip_val=inf must be a finite number >= 0"):
        train(compose_train([*base, "trainer.gradient_clip_val=inf"]))  # failed at the first step, naming no key
    with pytest.raises(configs.ConfigError, match=r"model\.lr_decay_steps=100 applies to lr_schedule=wsd"):
        train(compose_train([*base, "model.lr_decay_steps=100"]))  # ignored silently, then refused at fit start
    assert not (tmp_path / "run").exists()


def test_a_refused_resume_leaves_the_runs_config(shapes_shards, tmp_path):
    """A resume refused for its latent scale had already replaced config.yaml with the refused config."""
    from scale_helpers import tiny_autoencoder_export, tiny_ldm_overrides

    out = tmp_path / "run"
    overrides = [*tiny_overrides(shapes_shards, out, max_steps=1, every=1),
                 *tiny_ldm_overrides(tiny_autoencoder_export(tmp_path / "ae")), "model.val_num_steps=2"]
    train(compose_train(overrides))
    saved = (out / "config.yaml").read_text()
    with pytest.raises(configs.ConfigError, match=r"trained with latent scale .* model.latent_scale="):
        train(compose_train([*overrides, "trainer.max_steps=2", "model.latent_scale=0.5"]))
    assert (out / "config.yaml").read_text() == saved


def test_ldm_train_console_script_leaves_a_resumable_run(shapes_shards, tmp_path):
    out = tmp_path / "my run"  # (the printed `wandb sync` command is pasted: the space quoted)
    overrides = [o for o in tiny_overrides(shapes_shards, out, max_steps=2, every=2) if o != "logger=csv"]
    script = Path(sys.executable).parent / "ldm-train"
    result = subprocess.run([str(script), *overrides, "model.net.ch=16", "logger=wandb"], cwd=REPO, env=cli_env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "global batch size 4 = data.batch_size 4 x 1 processes (1 nodes) x 1 accumulation steps" in output
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert OmegaConf.load(out / "config.yaml").paths.output_dir == str(out)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb")), runs
    assert f"upload it with: wandb sync '{runs[0]}'" in output
    # the same command, further: the run resumes, its W&B run gets a second offline folder, and the command to
    # upload names both
    result = subprocess.run([str(script), *overrides, "model.net.ch=16", "logger=wandb", "trainer.max_steps=4"],
                            cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_id = runs[0].name.split("-", 3)[-1]  # offline-run-<date>_<time>-<id>
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert f"upload them with: wandb sync '{out / 'wandb'}'/offline-run-*-{run_id}" in result.stdout + result.stderr


def test_a_checkpoint_written_without_fsdp_is_not_resumed_under_fsdp(tmp_path: Path):
    """Lightning's FSDP restore maps optimizer state by parameter position among all the module's parameters, DDP's
    by position in the optimizer: it stopped with a bare KeyError; now the start names the trainer to continue with."""
    import torch

    from ldm.cli.train import check_checkpoint_trainer

    for written, name in (({"_target_": "lightning.pytorch.strategies.DDPStrategy"}, "ddp"), ("auto", "single")):
        torch.save({"state_dict": {}, "ldm": {"config": {"trainer": {"strategy": written}}}}, tmp_path / f"{name}.ckpt")
    fsdp = compose_train(["trainer=fsdp", "paths.output_dir=/tmp/unused"]).trainer
    for name in ("ddp", "single"):
        path = str(tmp_path / f"{name}.ckpt")
        with pytest.raises(ConfigError, match=r"not FSDP.*continue it with " + ("trainer=ddp" if name == "ddp" else
                                                                                "the single-process trainer")):
            check_checkpoint_trainer(torch.load(path, weights_only=True), path, fsdp)
    ddp = torch.load(tmp_path / "ddp.ckpt", weights_only=True)
    check_checkpoint_trainer(ddp, str(tmp_path / "ddp.ckpt"), compose_train(["trainer=ddp_cpu"]).trainer)  # fine


def test_logger_and_callback_keys_are_checked_before_anything_is_built(monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture):
    """A misspelt W&B key failed at the logger's first use (after the config tree, exit 1, a failed trial in a
    sweep), a misspelt callback key at instantiation; a bad CSV value came wrapped in Hydra's message. And W&B's own
    off switch (WANDB_MODE=disabled) was overridden by the logger's offline mode, which wrote a run anyway."""
    from ldm.cli.common import describe_error
    from ldm.cli.train import check_components, check_config, instantiate_callbacks, instantiate_loggers

    base = ["trainer=cpu", "paths.output_dir=/tmp/unused", "logger=wandb"]
    for extra, message in [
            (["+logger.wandb.offlin=false"], r"logger\.wandb\.offlin is not an argument of "
                                             r"lightning\.pytorch\.loggers\.WandbLogger \(did you mean "
                                             r"logger\.wandb\.offline\?\)"),
            (["+callbacks.throughput.count_flop=false"], r"callbacks\.throughput\.count_flop is not an argument .* "
                                                         r"\(did you mean callbacks\.throughput\.count_flops\?\)"),
            (["+callbacks.extra._target_=no.such.Class"], r"callbacks\.extra\._target_=no\.such\.Class cannot be "
                                                          r"imported \(ModuleNotFoundError"),
            # a misspelt class read "No module named ...; 'ldm.callbacks.nan_guard' is not a package"
            (["+callbacks.extra._target_=ldm.callbacks.nan_guard.NanGuardd"],
             r"callbacks\.extra\._target_=ldm\.callbacks\.nan_guard\.NanGuardd: module ldm\.callbacks\.nan_guard has "
             r"no 'NanGuardd': did you mean ldm\.callbacks\.nan_guard\.NanGuard\?"),
            (["+callbacks.extra._target_=ldm.callbacks.nan_guard.NanGuardd.Inner"],  # (inside a misspelt class)
             r"module ldm\.callbacks\.nan_guard has no 'NanGuardd': did you mean "
             r"ldm\.callbacks\.nan_guard\.NanGuard\?"),
            (["+callbacks.extra._target_=ldm.callbacks.nan_guard.NanGuard.create"],  # a class's attribute
             r"_target_=ldm\.callbacks\.nan_guard\.NanGuard\.create: ldm\.callbacks\.nan_guard\.NanGuard has no "
             r"'create'"),
            # a class Lightning cannot call: "'OrderedDict' object has no attribute 'on_exception'" mid-run
            (["+callbacks.extra._target_=collections.OrderedDict"],
             r"callbacks\.extra\._target_=collections\.OrderedDict is not a lightning\.pytorch\.Callback \(Lightning "
             r"calls its hooks\): subclass it"),
            (["+logger.extra._target_=collections.OrderedDict"],
             r"logger\.extra\._target_=collections\.OrderedDict is not a lightning\.pytorch\.loggers\.Logger"),
            # Lightning's: accumulation the contrastive model refuses, a schedule length and a printed global batch
            # that ignored it; a tuner that took the module's batch_size method for a number, after the build
            (["+callbacks.gas._target_=lightning.pytorch.callbacks.GradientAccumulationScheduler",
              "+callbacks.gas.scheduling={0:2}"], r"callbacks\.gas: GradientAccumulationScheduler is not supported: "
                                                   r".* set trainer\.accumulate_grad_batches; remove callbacks\.gas"),
            (["+callbacks.bsf._target_=lightning.pytorch.callbacks.BatchSizeFinder"], r"set data\.batch_size"),
            (["+callbacks.lrf._target_=lightning.pytorch.callbacks.LearningRateFinder"], r"set model\.lr"),
            # W&B's values: a pydantic ValidationError at the first use (exit 1, a failed trial in a sweep), or a
            # string tags split into its letters, offline=maybe taken as true
            (["logger.wandb.project=123"], r"logger\.wandb\.project=123 must be a string \(or null\): Hydra reads it "
                                           r"as int; quote it, 'logger\.wandb\.project=\"123\"'"),
            (["+logger.wandb.entity=[1]"], r"logger\.wandb\.entity=\[1\] must be a string"),
            (["logger.wandb.tags=notalist"], r"logger\.wandb\.tags='notalist' must be a list of strings: "
                                             r"'logger\.wandb\.tags=\[notalist\]'"),
            (["logger.wandb.offline=maybe"], r"logger\.wandb\.offline='maybe' must be true or false"),
            (["logger.wandb.log_model=maybe"], r"logger\.wandb\.log_model='maybe' must be false, true .* or all"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_components(compose_train(base + extra))
    for extra, message in [  # the top-level keys the W&B node reads (and the message names them, not W&B's key)
            (["run_name=0.001"], r"run_name=0\.001 must be a string \(or null\): Hydra reads it as float; quote it, "
                                 r"'run_name=\"0\.001\"'"),
            (["tags=baseline"], r"tags='baseline' must be a list of strings: 'tags=\[baseline\]'"),
            (["tags=[2024,baseline]"], r"tags=\[2024, 'baseline'\] must be a list of strings: "
                                       r"'tags=\[\"2024\",baseline\]'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_config(compose_train(base + extra))
    check_components(compose_train(base + ["logger.wandb.log_model=all", "tags=[a,b]", "run_name=my_run"]))
    # under Hydra's main, the fix quotes the value as typed (1.10, which Hydra reads as 1.1)
    from hydra.core.hydra_config import HydraConfig

    for typed_overrides, checked, message in (
            (["run_name=1.10"], ["run_name=1.10"],
             r"run_name=1\.1 must be a string .* quote it, 'run_name=\"1\.10\"'$"),
            # quoted already, or interpolating: as the value reads (the typed text quoted twice did not parse)
            (['run_name="${seed}"'], ["run_name=${seed}"], r"""quote it, 'run_name="42"'$"""),
            (["tags=[v1.10,2.10]"], ["tags=[v1.10,2.10]"],
             r"""must be a list of strings: 'tags=\[v1\.10,"2\.10"\]'$"""),
            (["tags=1.10"], ["tags=1.10"], r"""must be a list of strings: 'tags=\["1\.10"\]'$"""),
            (["tags=[a,'b,c',1.10,${seed}]"], ["tags=[a,'b,c',1.10,${seed}]"],
             r"""must be a list of strings: 'tags=\[a,"b,c","1\.10","42"\]'$""")):
        with hydra.initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            typed = hydra.compose(config_name="train", overrides=[*base, *typed_overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(typed)
        try:
            with pytest.raises(ConfigError, match=message):
                check_config(compose_train(base + checked))
        finally:
            HydraConfig.instance().cfg = None
    check_components(compose_train(base + ["+logger.wandb.group=ablation"]))  # a wandb.init argument
    assert not [r for r in caplog.records if r.name == "hydra.utils"]  # (Hydra's own reason, at ERROR, before ours)
    # a factory function (Hydra instantiates any callable): it imports; what it builds is checked when built
    factory = compose_train(base + ["+callbacks.extra._target_=os.getcwd"])
    check_components(factory)  # ("cannot be imported (ValueError: Located non-class ...)")
    with pytest.raises(ConfigError, match=r"callbacks\.extra: its _target_ built a str, not a lightning\.pytorch\."
                                          r"Callback: return one"):
        instantiate_callbacks(factory.callbacks)
    extra = ["+callbacks.extra._target_=scale_helpers.component_factory", "+callbacks.extra.what=accumulation"]
    factory = compose_train(base + extra)
    check_components(factory)  # one taking **kwargs: "issubclass() arg 1 must be a class"
    with pytest.raises(ConfigError, match=r"callbacks\.extra: GradientAccumulationScheduler is not supported"):
        instantiate_callbacks(factory.callbacks)  # (built by a factory: refused as the class named is)

    csv = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused", "logger=csv",
                         "logger.csv.flush_logs_every_n_steps=0"])
    with pytest.raises(Exception) as err:
        instantiate_loggers(csv.logger)
    assert describe_error(err.value) == (2, "logger.csv.flush_logs_every_n_steps=0 must be a whole number >= 1")
    for key, message in (("save_dir", "logger.csv.save_dir=None must be a folder"),  # (a stray ./None/csv/)
                         ("name", "logger.csv.name=None must be a folder name")):  # (a bare TypeError of `/`)
        with pytest.raises(Exception) as err:
            instantiate_loggers(compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused", "logger=csv",
                                               f"logger.csv.{key}=null"]).logger)
        assert describe_error(err.value)[0] == 2 and describe_error(err.value)[1].startswith(message)

    wandb = compose_train(base).logger
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test (the logger's offline mode rewrites it)
    assert [type(x).__name__ for x in instantiate_loggers(wandb)] == ["WandbLogger"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert instantiate_loggers(wandb) == []
    made = compose_train(["trainer=cpu", "paths.output_dir=/tmp/unused", "logger=csv",
                          "+logger.made._target_=scale_helpers.component_factory", "+logger.made.what=wandb"]).logger
    assert [type(x).__name__ for x in instantiate_loggers(made)] == ["AppendingCSVLogger"]  # (a factory's W&B too)


def test_a_failed_run_is_reported_without_the_sweep_extra(tmp_path):
    """optuna is in the `[sweep]` extra only, yet every failed ldm-train imported it to judge the failure: without it
    any mistake read "No module named 'optuna'" (exit status 1), and a grid sweep stopped at its first failed job."""
    code = ("import sys; sys.modules['optuna'] = None; from ldm.cli.train import main; "  # None: `import optuna` fails
            f"sys.argv = ['ldm-train', 'experiment=quickstart_vae', 'paths.output_dir={tmp_path / 'run'}', "
            f"'data.train_shards={tmp_path}/nowhere/train-*.tar', 'logger=csv']; main()")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "data.train_shards=" in result.stderr and "optuna" not in result.stderr


def test_a_resume_is_refused_for_a_network_that_only_computes_otherwise():
    """Settings that change what the weights compute but not their shapes: GroupNorm groups, attention heads as each
    attended width gets them (another spelling of the same heads resumes), a byte text encoder's heads; a run of
    model.init_from takes its layout from the source weights."""
    from ldm.cli.train import shapeless_changes

    written = {"model.unet.model_channels": 64, "model.unet.channel_mult": [1, 2], "model.unet.attention_levels": [1],
               "model.unet.mid_attention": True, "model.unet.num_heads": None, "model.unet.head_dim": 32,
               "model.unet.norm_groups": 8, "model.conditioner.kind": "byte", "model.conditioner.name_or_path": None,
               "model.conditioner.num_heads": 4}
    assert shapeless_changes(written, dict(written)) == []
    same_heads = {**written, "model.unet.num_heads": 4, "model.unet.head_dim": None}  # 128 // 32 = 4 everywhere
    assert shapeless_changes(written, same_heads) == []
    assert shapeless_changes(written, {**written, "model.unet.num_heads": 2, "model.unet.head_dim": None}) == [
        "attention heads per attended width: [4, 4] there, [2, 2] here (model.unet.num_heads / head_dim)"]
    older = {k: v for k, v in written.items() if k != "model.unet.mid_attention"}  # a key the config did not record
    assert shapeless_changes(older, {**older, "model.unet.num_heads": 2, "model.unet.head_dim": None}) == [
        "attention heads per attended width: [4, 4] there, [2, 2] here (model.unet.num_heads / head_dim)"]
    assert shapeless_changes(written, {**written, "model.unet.norm_groups": 16}) == [
        "model.unet.norm_groups: 8 there, 16 here"]
    assert shapeless_changes(written, {**written, "model.conditioner.num_heads": 2}) == [
        "model.conditioner.num_heads: 4 there, 2 here"]
    pretrained = {**written, "model.conditioner.name_or_path": "runs/clip/export"}  # the checkpoint's weights rule
    assert shapeless_changes(written, {**pretrained, "model.conditioner.num_heads": 2}) == [
        "model.conditioner.num_heads: 4 there, 2 here"]
    tower = {"model.image.norm_groups": 8, "model.text.num_heads": 4}  # the contrastive module's
    assert shapeless_changes(tower, {**tower, "model.image.norm_groups": 4}) == [
        "model.image.norm_groups: 8 there, 4 here"]
    imported = {**written, "model.init_from": "sd15"}
    assert shapeless_changes(imported, {**imported, "model.unet.norm_groups": 16}) == []


def test_a_target_whose_module_imports_a_missing_package_names_that_package(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    """`viz_tools.callbacks` importing a missing `viz` read "module viz_tools has no 'callbacks'" (the names' text
    compared, not their dotted parts): the user looked for a misspelling instead of the missing install."""
    from ldm.cli.train import import_target

    (tmp_path / "viz_tools").mkdir()
    (tmp_path / "viz_tools" / "__init__.py").write_text("")
    (tmp_path / "viz_tools" / "callbacks.py").write_text("import viz\nclass ImageLogger: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match=r"callbacks\.images\._target_=viz_tools\.callbacks\.ImageLogger cannot be "
                                          r"imported \(ModuleNotFoundError: No module named 'viz'\)"):
        import_target("viz_tools.callbacks.ImageLogger", "callbacks.images")



def test_another_validation_schedule_from_a_save_after_an_epochs_last_validation_is_refused():
    """A checkpoint saved after the validation of an epoch's last batch (a stop signal's second save, or
    every_n_train_steps=null) holds completed == ready, and Lightning's restart tells from the validation schedule
    whether that validation ran: resumed with val_check_interval 6 instead of 8 it trained a ninth batch in the old
    epoch (the next epoch's first, trained again right after) and logged a step twice. Another k alone resumes at
    the next epoch's start; so does a save at the batch's end (completed = ready - 1) under any schedule."""
    from ldm.cli.train import check_checkpoint_trainer

    def checkpoint(completed: int) -> dict:
        progress = {"is_last_batch": True, "current": {"ready": 8, "completed": completed}, "total": {"ready": 16}}
        trainer = {"accumulate_grad_batches": 2, "val_check_interval": 8, "check_val_every_n_epoch": 1}
        return {"ldm": {"config": {"trainer": trainer}}, "loops": {"fit_loop": {"epoch_loop.batch_progress": progress}}}

    def trainer(*overrides: str):
        return compose_train([*overrides, "paths.output_dir=/tmp/unused", "trainer.check_val_every_n_epoch=1"]).trainer

    with pytest.raises(ConfigError, match=r"trainer\.val_check_interval=6 \(written with 8\): ckpt_path=after\.ckpt "
                                          r"was saved after the validation of its epoch's last batch"):
        check_checkpoint_trainer(checkpoint(8), "after.ckpt", trainer("trainer.val_check_interval=6"))
    check_checkpoint_trainer(checkpoint(8), "after.ckpt", trainer("trainer.val_check_interval=8",
                                                                  "trainer.accumulate_grad_batches=3"))
    check_checkpoint_trainer(checkpoint(7), "batch_end.ckpt", trainer("trainer.val_check_interval=6"))
    check_checkpoint_trainer(checkpoint(8), "after.ckpt", trainer("trainer.val_check_interval=4"))  # 8 % 4: ran


def test_launches_that_would_hang_or_split_the_run_are_refused(shapes_shards, tmp_path, monkeypatch):
    """trainer.num_nodes=2 started as one plain process waited for the other nodes for good, in silence; under
    torchrun each rank resolved the default timestamped paths.output_dir at its own second, and a rank that started
    a second late wrote its log into a second folder."""
    from ldm.cli.train import check_config, check_launch

    for name in ("NODE_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    trainer = L.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False,
                        enable_checkpointing=False)
    message = r"trainer\.num_nodes=2, but this process was started with no cluster around it .* set " \
              r"trainer\.num_nodes=1$"
    with pytest.raises(ConfigError, match=message):
        check_launch(trainer)
    monkeypatch.setenv("NODE_RANK", "1")  # (Lightning then connects to 127.0.0.1: the same silent wait)
    with pytest.raises(ConfigError, match=message):
        check_launch(trainer)
    monkeypatch.setenv("MASTER_ADDR", "node0")  # each node started by hand, as Lightning documents
    check_launch(trainer)
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("NODE_RANK", "0")  # node 0 may leave MASTER_ADDR out (Lightning's docs)
    check_launch(trainer)

    overrides = [o for o in tiny_overrides(shapes_shards, tmp_path / "run", max_steps=1, every=1)
                 if not o.startswith("paths.output_dir=")]
    for name in ("NODE_RANK", "MASTER_ADDR", "LOCAL_RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    message = r"paths\.output_dir is a new timestamped directory .*torchrun's ranks, srun's tasks, each node's.* set " \
              r"paths\.output_dir to one folder for the run that every process sees \(under SLURM: paths=slurm\)$"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_config(compose_train(overrides))  # one process: one folder
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train(overrides))
    check_config(compose_train([*overrides, f"paths.output_dir={tmp_path / 'run'}"]))
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match=message):  # a node started by hand
        check_config(compose_train([*overrides, "trainer.num_nodes=2"]))
    monkeypatch.setenv("LOCAL_RANK", "1")  # a rank Lightning started: its launcher's folder comes with it
    check_config(compose_train([*overrides, "trainer.num_nodes=2"]))
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_NTASKS", "2")  # srun's tasks on one node
    with pytest.raises(ConfigError, match=message):
        check_config(compose_train(overrides))
    check_config(compose_train([*overrides, f"paths.output_dir={tmp_path / 'run'}"]))
