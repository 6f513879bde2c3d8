"""ldm-train: fit an autoencoder, a contrastive text encoder or a latent diffusion model from a Hydra-composed config.

    ldm-train experiment=quickstart_vae paths.output_dir=runs/vae
    ldm-train experiment=quickstart_clip paths.output_dir=runs/clip
    ldm-train experiment=quickstart_ldm model.autoencoder_path=runs/vae/export \
              model.conditioner.name_or_path=runs/clip/export ckpt_path=last
    ldm-train -m hparams_search=ldm_optuna hydra/launcher=slurm        # a sweep; each trial returns its metric

A run directory that already holds `checkpoints/last.ckpt` is resumed when `auto_resume` is true (the default), so
running the same command again, or a requeued SLURM job, continues where the run stopped.
"""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from ldm import __version__
from ldm import config as configs
from ldm.callbacks.checkpoint import AtomicCheckpointIO, Checkpoint
from ldm.cli.common import CONF_DIR, print_config_tree, resolve_output_dir, save_config

# Attributes `compile: true` compiles when a module has no `compile_networks()` method: the trainable network.
COMPILE_ATTRIBUTES = ("unet", "autoencoder")


class TrainingDiverged(RuntimeError):
    """The NaN guard stopped the run after too many non-finite steps in a row."""


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Every non-null entry of the `callbacks` group, in config order."""
    return [hydra.utils.instantiate(node) for node in (cfg or {}).values() if node is not None]


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return [hydra.utils.instantiate(node) for node in (cfg or {}).values() if node is not None]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, auto_resume: bool = False) -> str | None:
    """The checkpoint to resume from.

    `last` means `checkpoints/last.ckpt` of this run directory (none yet: start fresh); with `auto_resume` and no
    `ckpt_path`, that file is taken whenever it exists; any other path must exist.
    """
    last = output_dir / "checkpoints" / "last.ckpt"
    if ckpt_path is None:
        if auto_resume and last.exists():
            rank_zero_info(f"auto_resume: resuming from {last}")
            return str(last)
        return None
    if ckpt_path == "last":
        if last.exists():
            return str(last)
        rank_zero_info(f"ckpt_path=last: no {last} yet, starting from scratch")
        return None
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; pass an existing checkpoint, "
                                f"ckpt_path=last to resume the run in paths.output_dir, or ckpt_path=null")
    return ckpt_path


def finish_loggers(loggers: list[Logger], exit_code: int) -> None:
    """Close W&B runs with the right exit status and say how to upload offline runs."""
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            run = logger.experiment
            offline = bool(getattr(run, "offline", False))  # note: settings.mode reads "dryrun" for offline=true
            run_dir = Path(run.dir).parent
            run.finish(exit_code=exit_code)
            if offline:
                rank_zero_info(f"W&B run saved offline in {run_dir}; upload it with: wandb sync {run_dir}")


def apply_backend_switches(cfg: DictConfig) -> None:
    """`tf32`: TensorFloat-32 matmuls and convolutions on Ampere and newer GPUs (no effect on CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
    torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")


def apply_module_switches(module: L.LightningModule, cfg: DictConfig) -> None:
    """`channels_last` converts the module's 4-D weights; `compile` compiles the trainable network in place.

    A module controls what gets compiled by defining `compile_networks()`; otherwise the first of
    COMPILE_ATTRIBUTES it has is compiled with `nn.Module.compile()`, which keeps state-dict keys unchanged.
    """
    if cfg.channels_last:
        module.to(memory_format=torch.channels_last)
    if not cfg.compile:
        return
    if callable(getattr(module, "compile_networks", None)):
        module.compile_networks()
        return
    for name in COMPILE_ATTRIBUTES:
        network = getattr(module, name, None)
        if isinstance(network, torch.nn.Module):
            network.compile()
            rank_zero_info(f"compile: torch.compile on module.{name}")
            return
    raise configs.ConfigError(f"compile=true but {type(module).__name__} has no compile_networks() method and none "
                              f"of the attributes {list(COMPILE_ATTRIBUTES)}; set compile=false")


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


def is_multirun() -> bool:
    """True inside a Hydra multirun (-m) job."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def check_launch(trainer: L.Trainer) -> None:
    """Refuse what cannot work: Lightning starting DDP processes itself inside a multirun job.

    Lightning starts the other ranks by re-running the command line, which a multirun job does not have. With
    `hydra/launcher=slurm` srun starts every rank instead (the cluster environment creates the processes).
    """
    environment = getattr(trainer.strategy, "cluster_environment", None)
    if is_multirun() and trainer.world_size > 1 and environment is not None \
            and not environment.creates_processes_externally:
        raise configs.ConfigError(f"trainer with {trainer.world_size} processes inside a multirun (-m): Lightning "
                                  f"cannot start DDP processes from a sweep job on one machine; run each "
                                  f"configuration as its own command, or sweep with hydra/launcher=slurm and "
                                  f"hydra.launcher.tasks_per_node=trainer.devices")


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, fit with validation, and return the final logged metrics."""
    output_dir = resolve_output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True)
    apply_backend_switches(cfg)
    print_config_tree(cfg, order=("experiment", "model", "data", "trainer", "logger", "callbacks", "paths"))
    save_config(cfg, output_dir)

    datamodule = configs.instantiate(cfg.data, "data")
    module = configs.instantiate(cfg.model, "model")
    apply_module_switches(module, cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    for callback in callbacks:
        if isinstance(callback, Checkpoint):
            callback.run_info = {"ldm_version": __version__, "config": resolved}
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                                 plugins=trainer_plugins())
    check_launch(trainer)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    rank_zero_info(describe_batch_and_lr(cfg, trainer))

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, auto_resume=bool(cfg.get("auto_resume")))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException:
        finish_loggers(loggers, exit_code=1)
        raise
    halted = [cb for cb in callbacks if getattr(cb, "halted", False)]
    finish_loggers(loggers, exit_code=1 if halted else 0)
    if halted:
        raise TrainingDiverged(halted[0].message)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    rank_zero_info(f"run directory: {output_dir}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The CLI; returns `metrics[optimized_metric]` for a Hydra sweeper when `optimized_metric` is set.

    In a multirun, a run that fails (other than by a ConfigError) prints its traceback and returns None, so the sweep
    goes on: the Optuna sweeper records the trial as failed. (Not nan: the Optuna 2.x that hydra-optuna-sweeper needs
    rejects a nan value with an error that ends the whole sweep.)
    """
    metric_name = cfg.get("optimized_metric")
    try:
        metrics = train(cfg)
    except configs.ConfigError:
        raise  # a config mistake fails every trial alike: stop the sweep
    except Exception as err:
        if not is_multirun():
            raise
        traceback.print_exc()
        print(f"trial failed ({type(err).__name__}: {err}); the sweep goes on without its {metric_name or 'result'}")
        return None
    if not metric_name:
        return None
    if metric_name not in metrics:
        raise configs.ConfigError(f"optimized_metric={metric_name!r} was not logged; logged metrics: {sorted(metrics)}")
    return metrics[metric_name]


if __name__ == "__main__":
    # note: run as `python -m ldm.cli.train`, this file is __main__, and submitit (hydra/launcher=local|slurm) would
    # pickle `main` by value with everything it references; the imported module's `main` pickles by reference.
    from ldm.cli.train import main as importable_main

    importable_main()
