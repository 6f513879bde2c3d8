"""Test-only callbacks and helpers for the scale tests; the CLI subprocesses import them through PYTHONPATH=tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.environments import LightningEnvironment
from omegaconf import DictConfig

from ldm import seeding
from ldm.cli.common import CONF_DIR

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent


def tiny_overrides(shards: Path, output_dir: Path, max_steps: int, every: int, trainer: str = "cpu") -> list[str]:
    """A few steps of the tiny autoencoder on the shapes shards, validation and checkpoints every `every` steps, with
    the `trainer` config group (cpu; ddp_cpu, or gpu / ddp / fsdp in tests/test_gpu.py)."""
    return [
        f"paths.output_dir={output_dir}",
        f"data.train_shards={shards}/train-*.tar",
        f"data.val_shards={shards}/val-*.tar",
        "data.batch_size=4",
        "data.num_workers=0",
        f"trainer={trainer}",
        f"trainer.max_steps={max_steps}",
        f"trainer.val_check_interval={every}",
        "trainer.limit_val_batches=1",
        "trainer.log_every_n_steps=1",
        "+trainer.enable_model_summary=false",
        "callbacks.progress=null",
        "logger=csv",
    ]


def tiny_autoencoder_export(directory: Path) -> Path:
    """A random KL-f4 autoencoder export for 32 px images (4 x 8 x 8 latents, as model=ldm/tiny expects)."""
    from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL

    torch.manual_seed(0)
    config = AutoencoderConfig(resolution=32, ch=16, ch_mult=[1, 2, 2], num_res_blocks=1, norm_groups=8)
    return AutoencoderKL(config).save_pretrained(directory, latent_stats={"scale_factor": 0.8, "global_std": 1.25})


def tiny_class_model_export(root: Path) -> Path:
    """A class-conditional tiny LDM (3 classes whose labels go into the UNet: no cross-attention), saved as an
    export at root / "class_model" (its autoencoder at root / "ae")."""
    from dataclasses import asdict

    from ldm.modules.latent_diffusion import LatentDiffusionModule
    from ldm.nn.unet import unet_config

    unet = asdict(unet_config("tiny", context_dim=None, num_classes=3))
    module = LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(root / "ae")), "unet": unet,
                                    "conditioner": {"kind": "class", "num_classes": 3, "class_embed": "unet"},
                                    "ema_decay": None})
    return module.pipeline.save_pretrained(root / "class_model")


def tiny_ldm_overrides(autoencoder: Path) -> list[str]:
    """model=ldm/tiny shrunk further: a 16-channel UNet and a one-layer byte text encoder."""
    return [
        "model=ldm/tiny", f"model.autoencoder_path={autoencoder}", "model.warmup_steps=2",
        "model.unet.model_channels=16", "model.unet.head_dim=8", "model.unet.context_dim=32",
        "model.unet.attention_levels=[1]", "model.conditioner.width=32", "model.conditioner.num_layers=1",
        "model.conditioner.num_heads=2",
    ]


def frozen_text_encoder_overrides(directory: Path) -> list[str]:
    """A random byte text encoder shaped as `tiny_ldm_overrides`' one, saved to `directory`, and the overrides that
    condition the tiny LDM on it frozen (as a pretrained encoder is) instead of training a new one."""
    from ldm.conditioning import ByteTextEncoder

    torch.manual_seed(0)
    encoder = ByteTextEncoder(width=32, num_layers=1, num_heads=2, max_length=72).save_pretrained(directory)
    return [f"model.conditioner.name_or_path={encoder}", "model.conditioner.trainable=false"]


def compose_train(overrides: Sequence[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, as the CLI would compose it (without Hydra's runtime)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI subprocess: tests/ importable (for the callbacks below), W&B offline."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}


def run_cli(args: Sequence[str], env: dict[str, str] | None = None, timeout: int = 300,
            module: str = "ldm.cli.train") -> subprocess.CompletedProcess:
    """`python -m ldm.cli.train ARGS` in the repository, to completion."""
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=cli_env(env), capture_output=True,
                          text=True, timeout=timeout)


def wait_for_step(progress: Path, proc: subprocess.Popen, step: int, timeout: float = 300) -> None:
    """Wait until the `Progress` callback of the training process `proc` has written a step >= `step`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if progress.exists() and progress.read_text() and int(progress.read_text()) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


def fake_scontrol(tmp_path: Path) -> tuple[Path, Path]:
    """A folder holding an `scontrol` stand-in that appends its arguments to a log file: (folder, log)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    script.chmod(0o755)
    return bin_dir, log


def load_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class OwnEnvironment(LightningEnvironment):
    """A researcher's own plugin, for `+trainer.plugins=[...]`."""


class StepRecorder(L.Callback):
    """Record `train/*` metrics and a checksum of the trainable weights after every step on this rank into
    `<dirpath>/steps-rank<R>.json` (rewritten after every step, so a run stopped by a signal leaves its steps too)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        record = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        record["weights"] = sum(p.detach().double().sum().item() for p in pl_module.parameters() if p.requires_grad)
        if getattr(pl_module, "ema", None) is not None:
            record["ema"] = sum(p.double().sum().item() for p in pl_module.ema.module.parameters())
        self.steps[trainer.global_step] = record
        self._write(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module)

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        weights = [p.detach().double().sum().item() for p in pl_module.parameters()]
        (self.dirpath / f"steps-rank{trainer.global_rank}.json").write_text(
            json.dumps({"steps": self.steps, "weights": weights}))


class GradNormProbe(L.Callback):
    """Append the total norm of the trainable parameters' gradients after each step (what the optimizer stepped
    with, clipping included) to `<dirpath>/grad-norms.json`."""

    def __init__(self, dirpath: str):
        self.path = Path(dirpath) / "grad-norms.json"
        self.norms: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        grads = [p.grad.double() for p in pl_module.parameters() if p.requires_grad and p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        self.path.write_text(json.dumps(self.norms))


class NoiseProbe(L.Callback):
    """Record the (seed, rank, step, micro) the module asks `step_generator` for, and a fingerprint of that noise."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.calls: list[dict[str, Any]] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        namespace = sys.modules[type(pl_module).__module__]
        real = seeding.step_generator

        def probe(seed: int, rank: int, step: int, device: Any = "cpu", micro: int = 0) -> torch.Generator:
            fingerprint = torch.randn(8, generator=real(seed, rank, step, micro=micro)).sum().item()
            self.calls.append({"seed": seed, "rank": rank, "step": step, "micro": micro, "fingerprint": fingerprint,
                               "true_rank": trainer.global_rank, "training": pl_module.training})
            return real(seed, rank, step, device, micro)

        namespace.step_generator = probe

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"noise-rank{trainer.global_rank}.json").write_text(json.dumps(self.calls))


class Progress(L.Callback):
    """Write the global step to `path` after every training batch, then sleep (a run slow enough to signal)."""

    def __init__(self, path: str, sleep: float = 0.0):
        self.path, self.sleep = Path(path), sleep

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.path.write_text(str(trainer.global_step))
        time.sleep(self.sleep)


class Sabotage(L.Callback):
    """Do what the file at `path` says as training starts: `raise` an error, or `nan`: fill every parameter (the
    frozen autoencoder's too) with NaN, so that val/loss is nan; nothing when the file is missing. The command line
    stays the same, as a continued Optuna study needs."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        mode = self.path.read_text().strip() if self.path.exists() else ""
        if mode == "raise":
            raise RuntimeError("sabotaged")
        if mode == "nan":
            with torch.no_grad():
                for parameter in pl_module.parameters():
                    parameter.fill_(float("nan"))


class NanInjector(L.Callback):
    """Fill the batch images with NaN at the given global steps on the given ranks (all ranks: `ranks` empty)."""

    def __init__(self, steps: Sequence[int], ranks: Sequence[int] = (), key: str = "image"):
        self.steps, self.ranks, self.key = set(steps), set(ranks), key

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.global_step in self.steps and (not self.ranks or trainer.global_rank in self.ranks):
            batch[self.key].fill_(float("nan"))


class SignalAtStep(L.Callback):
    """Send this process `signal_name` at the start of the training batch at `step` (a stand-in for SLURM's warning),
    or with `during=validation` at the start of the validation that follows that step; on `ranks` only (all: []).
    Outside fit: `during=construction` when the run builds its callbacks, `during=teardown` once fit is over (after
    the callbacks listed before this one have torn down)."""

    def __init__(self, step: int = 0, signal_name: str = "SIGUSR1", during: str = "train", ranks: Sequence[int] = ()):
        self.step, self.signum, self.during, self.ranks = step, signal.Signals[signal_name], during, list(ranks)
        self.sent = False  # once: with gradient accumulation several batches start at one global step
        if during == "construction":
            os.kill(os.getpid(), self.signum)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.during == "teardown":
            os.kill(os.getpid(), self.signum)

    def _send(self, trainer: L.Trainer, during: str) -> None:
        if self.ranks and trainer.global_rank not in self.ranks:  # the signal reaches these ranks only
            return
        if trainer.global_step == self.step and during == self.during and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._send(trainer, "train")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._send(trainer, "validation")


class StopAtStep(L.Callback):
    """Set `trainer.should_stop` at the end of the batch that reaches `step` (with `after`, of the after-th batch
    after it: a micro-batch under gradient accumulation), as Lightning's Timer does when `trainer.max_time` runs out
    (it looks at every batch), or EarlyStopping when validation stops improving."""

    def __init__(self, step: int, after: int = 0):
        self.step, self.after = step, after
        self.batches = -1  # batches since the one that reached `step`

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            self.batches += 1
            if self.batches >= self.after:
                trainer.should_stop = True


class StopAtEpochEnd(L.Callback):
    """Set `trainer.should_stop` at the end of the first training epoch, where Lightning's Timer looks too (and
    EarlyStopping with `check_on_train_epoch_end`)."""

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.should_stop = True


class GatherProbe(L.Callback):
    """Ask the module to gather a (2, 1) tensor holding this rank's number, and record what every rank got back, and
    the loss of this rank's share of the batch (the step's output) by step."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        mine = torch.full((2, 1), float(trainer.global_rank), requires_grad=True)
        gathered = pl_module._gather(mine)
        gathered.sum().backward()
        self.losses[trainer.global_step] = float(outputs["loss"])
        self.dirpath.mkdir(parents=True, exist_ok=True)
        (self.dirpath / f"gather-rank{trainer.global_rank}.json").write_text(json.dumps(
            {"gathered": gathered.detach().flatten().tolist(), "grad": mine.grad.flatten().tolist(),
             "losses": self.losses}))


class CpuFSDPStrategy(L.pytorch.strategies.FSDPStrategy):
    """Lightning's FSDP strategy on CPU processes (gloo), to test sharded training without GPUs.

    note: three things differ from `trainer=fsdp` on GPUs, none in our code. Lightning refuses `FSDPStrategy` itself
    without a GPU accelerator (a subclass passes its check); torch's FSDP wants `device_id=cpu` spelled out on a
    machine without an accelerator; and torch's full optimizer state dict (torch 2.14, `_allgather_orig_param_states`)
    gathers every state (exp_avg, exp_avg_sq) into one reused buffer and keeps views of it, relying on `.cpu()` to copy
    them, which it does from a GPU but not on the CPU: every state would read as the last one gathered. The states are
    copied here before the next gather overwrites them, as `.cpu()` does on a GPU.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        from torch.distributed.fsdp import _optim_utils

        unflatten = _optim_utils._unflatten_orig_param_states
        if getattr(unflatten, "copies_states", False):
            return

        def copying(fsdp_param_info, output_states, state_name, *rest):
            for states in output_states.values():
                if isinstance(states.get(state_name), torch.Tensor):
                    states[state_name] = states[state_name].clone()
            return unflatten(fsdp_param_info, output_states, state_name, *rest)

        copying.copies_states = True
        _optim_utils._unflatten_orig_param_states = copying

    @contextlib.contextmanager
    def model_sharded_context(self):
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import enable_wrap

        with enable_wrap(wrapper_cls=FullyShardedDataParallel, cpu_offload=self.cpu_offload,
                         mixed_precision=self.mixed_precision_config, sharding_strategy=self.sharding_strategy,
                         device_id=torch.device("cpu"), **self.kwargs):
            yield


def component_factory(what: str = "lr_monitor", **kwargs: Any) -> Any:
    """A factory function as a callback's or logger's `_target_` (Hydra instantiates any callable), taking whatever
    keys the config gives (tests/test_train_cli.py)."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler, LearningRateMonitor
    from lightning.pytorch.loggers import WandbLogger

    if what == "accumulation":
        return GradientAccumulationScheduler({0: 2})
    if what == "wandb":
        return WandbLogger(offline=True, **kwargs)
    return LearningRateMonitor(**kwargs)
