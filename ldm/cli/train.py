"""ldm-train: fit an autoencoder or a latent diffusion model from a Hydra-composed config.

    ldm-train experiment=quickstart_vae paths.output_dir=runs/vae
    ldm-train experiment=quickstart_ldm model.autoencoder_path=runs/vae/export ckpt_path=last
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from ldm import config as configs
from ldm.cli.common import CONF_DIR, print_config_tree, resolve_output_dir, save_config


def instantiate_callbacks(cfg: DictConfig | None) -> list[L.Callback]:
    """Every non-null entry of the `callbacks` group, in config order."""
    return [hydra.utils.instantiate(node) for node in (cfg or {}).values() if node is not None]


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    return [hydra.utils.instantiate(node) for node in (cfg or {}).values() if node is not None]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means the newest checkpoint of this run directory (none yet: start fresh); a path must exist."""
    if ckpt_path is None:
        return None
    if ckpt_path == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
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
            offline = run.settings.mode == "offline" if hasattr(run, "settings") else False
            run_dir = Path(run.dir).parent
            run.finish(exit_code=exit_code)
            if offline:
                rank_zero_info(f"W&B run saved offline in {run_dir}; upload it with: wandb sync {run_dir}")


def train(cfg: DictConfig) -> dict[str, float]:
    """Build everything from `cfg`, fit with validation, and return the final logged metrics."""
    output_dir = resolve_output_dir(cfg)
    L.seed_everything(cfg.seed, workers=True)
    print_config_tree(cfg, order=("experiment", "model", "data", "trainer", "logger", "callbacks", "paths"))
    save_config(cfg, output_dir)

    datamodule = configs.instantiate(cfg.data, "data")
    module = configs.instantiate(cfg.model, "model")
    callbacks = instantiate_callbacks(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in loggers:
        logger.log_hyperparams(_resolved(cfg))

    world = trainer.world_size * int(cfg.trainer.get("accumulate_grad_batches") or 1)
    rank_zero_info(f"global batch size {cfg.data.batch_size * world} = data.batch_size {cfg.data.batch_size} x "
                   f"{trainer.world_size} processes x {cfg.trainer.get('accumulate_grad_batches') or 1} accumulation; "
                   f"learning rate {cfg.model.get('lr', 'n/a')} (never rescaled)")

    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except BaseException:
        finish_loggers(loggers, exit_code=1)
        raise
    finish_loggers(loggers, exit_code=0)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    rank_zero_info(f"run directory: {output_dir}")
    return metrics


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
