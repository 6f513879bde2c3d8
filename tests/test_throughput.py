"""The throughput callback: FLOPs of the real step, data wait, the peak table, and the line in a real ldm-train log."""

from __future__ import annotations

import contextlib
import csv
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from scale_helpers import run_cli, tiny_overrides
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ldm.callbacks import throughput
from ldm.callbacks.nan_guard import NanGuard
from ldm.callbacks.throughput import Throughput, peak_flops

B, D, H, OUT = 8, 32, 64, 16  # batch, input, hidden, output widths of the two-layer test model


class TwoLayers(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, H, bias=False), nn.ReLU(), nn.Linear(H, OUT, bias=False))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.net(batch["x"]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@contextlib.contextmanager
def timed(spent: list[float]):
    """Appends the seconds the block took to `spent`: the slow parts below say what they really cost (a sleep
    oversleeps on a busy machine), which the measured data wait is compared with."""
    start = time.perf_counter()
    yield
    spent.append(time.perf_counter() - start)


def ms_per_batch(spent: list[float], batches: int) -> float:
    return 1e3 * sum(spent) / batches


class SlowBatches(Dataset):
    """Batches that take `delay` seconds to load (in the main process: num_workers=0)."""

    def __init__(self, n: int, delay: float):
        self.n, self.delay, self.spent = n, delay, []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        with timed(self.spent):
            time.sleep(self.delay)
            return {"x": torch.randn(B, D), "caption": ["a"] * B}


def fit_six_steps(callback: Throughput, tmp_path: Path, delay: float) -> SlowBatches:
    """Six steps of TwoLayers on batches that take `delay` seconds to load, a throughput line every 3 steps."""
    trainer = L.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[callback])
    data = SlowBatches(6, delay)
    trainer.fit(TwoLayers(), train_dataloaders=DataLoader(data, batch_size=None))
    return data


def test_flops_of_the_real_step_and_the_data_wait(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    callback = Throughput()
    with caplog.at_level("INFO", logger=throughput.__name__):
        data = fit_six_steps(callback, tmp_path, delay=0.05)
    # Forward 2B(DH + H OUT); backward: both gradients of the second matmul, only the weight's of the first.
    per_batch = 2 * B * (D * H + H * OUT) + 4 * B * H * OUT + 2 * B * D * H
    assert callback.flops_per_sample == {"0": per_batch / B}  # one kind of step: optimizer 0's
    summary = callback.summary
    assert summary["data_wait_ms"] == pytest.approx(ms_per_batch(data.spent, 6), abs=10)  # each sleeps 50 ms
    assert summary["images_per_sec_per_device"] == summary["images_per_sec"] <= B / 0.05
    assert summary["flops_per_sec_per_device"] == pytest.approx(per_batch * 6 / summary["seconds"])
    last = callback.last  # the line of steps 4-6, by hand (the rates of the last interval only)
    assert last["images_per_sec"] == pytest.approx(3 * B / last["seconds"])
    assert last["flops_per_sec_per_device"] == pytest.approx(3 * per_batch / last["seconds"])
    assert last["data_wait_ms"] == pytest.approx(ms_per_batch(data.spent[3:], 3), abs=10)
    assert "mfu" not in summary and "peak_memory_gib" not in summary  # no peak or memory figure on CPU
    lines = [r.getMessage() for r in caplog.records if r.name == throughput.__name__]
    assert [line.split(":")[0] for line in lines] == ["throughput step 3", "throughput step 6", "throughput summary"]
    assert lines[-1].startswith("throughput summary: 6 steps, 48 images in ")


class UNetStep(L.LightningModule):
    """A tiny UNet's denoising step, with or without gradient checkpointing."""

    def __init__(self, checkpointing: bool):
        super().__init__()
        from ldm.nn.unet import UNet, unet_config

        torch.manual_seed(0)
        self.unet = UNet(unet_config("tiny", model_channels=16, norm_groups=8, context_dim=None, attention_levels=[],
                                     gradient_checkpointing=checkpointing))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.unet(batch["x"], torch.full((len(batch["x"]),), 10)).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_gradient_checkpointings_recomputation_is_no_model_flop(tmp_path: Path):
    """Checkpointing recomputes each block's forward in backward: counted, it raised the logged FLOP/s and MFU of the
    same model at the same speed by a quarter (benchmarks/gpu.py leaves it out, as MFU is defined)."""
    counts = []
    for checkpointing in (False, True):
        callback = Throughput()
        trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            callbacks=[callback])
        batches = [{"x": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i))} for i in range(2)]
        module = UNetStep(checkpointing)
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        counts.append(callback.flops_per_sample["0"])
        assert module.unet.recomputation_counts is None  # counted on the first step alone
    assert counts[0] > 0 and counts[1] == counts[0]


def test_mfu_is_the_flop_rate_over_the_devices_peak(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch):
    """With a peak known for the device (here a CPU given one), MFU = the model's FLOP/s per device / that peak, in
    every line and the summary."""
    peak = 2e9  # FLOP/s
    monkeypatch.setattr(throughput, "peak_flops", lambda device, precision: (peak, "float32"))
    callback = Throughput()
    with caplog.at_level("INFO", logger=throughput.__name__):
        fit_six_steps(callback, tmp_path, delay=0.01)
    per_batch = 2 * B * (D * H + H * OUT) + 4 * B * H * OUT + 2 * B * D * H
    summary = callback.summary
    assert summary["mfu"] == pytest.approx(per_batch * 6 / summary["seconds"] / peak)
    assert callback.last["mfu"] == pytest.approx(callback.last["flops_per_sec_per_device"] / peak)
    lines = [r.getMessage() for r in caplog.records if r.name == throughput.__name__]
    assert f", MFU {100 * summary['mfu']:.1f}% of " in lines[-1] and lines[-1].endswith("TFLOP/s (float32)")


def test_a_resume_that_turns_counting_on_counts_its_first_batch(tmp_path: Path):
    """A checkpoint of `count_flops=false` holds no counts: the resumed run with counting on counts its first batch,
    so its FLOP/s covers every batch it trained (it took none of them before)."""
    per_batch = 2 * B * (D * H + H * OUT) + 4 * B * H * OUT + 2 * B * D * H

    def fit(max_steps: int, count_flops: bool, ckpt_path: Path | None = None) -> Throughput:
        callback = Throughput(count_flops=count_flops)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            callbacks=[callback])
        trainer.fit(TwoLayers(), train_dataloaders=DataLoader(SlowBatches(8, 0.0), batch_size=None),
                    ckpt_path=ckpt_path)
        if ckpt_path is None:
            trainer.save_checkpoint(tmp_path / "off.ckpt")
        return callback

    assert fit(3, count_flops=False).flops_per_sample == {}
    resumed = fit(6, count_flops=True, ckpt_path=tmp_path / "off.ckpt")
    assert resumed.summary["flops_per_sec_per_device"] * resumed.summary["seconds"] == pytest.approx(3 * per_batch)


def test_attention_on_cpu_is_counted_as_torch_counts_its_gpu_kernels():
    """SDPA runs a CPU kernel that torch's FlopCounterMode has no formula for (it counted 0); the callback registers
    the flash kernels' formulas for it."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    q, k = torch.randn(2, 4, 64, 32, requires_grad=True), torch.randn(2, 4, 77, 32, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = nn.functional.scaled_dot_product_attention(q, k, k)
        out.sum().backward()
    assert counter.get_total_flops() == sdpa_flop_count(q.shape, k.shape, k.shape) + \
        sdpa_backward_flop_count(out.shape, q.shape, k.shape, k.shape) > 0


def test_count_flops_takes_a_boolean():
    from ldm.config import ConfigError

    with pytest.raises(ConfigError, match=r"callbacks\.throughput\.count_flops='maybe' must be true or false"):
        Throughput(count_flops="maybe")  # counted, as any non-empty string is true


def test_products_through_onednn_are_counted_as_on_blas(monkeypatch: pytest.MonkeyPatch):
    """`ldm.nn.linear` sends large fp32 products to oneDNN's convolution on CPUs where that is faster; torch has no
    formula for that op, so their forward counted 0 FLOPs (a whole SD 1.5 UNet step 12% short on those CPUs)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.nn import linear

    layer, x = linear.Linear(128, 512), torch.randn(256, 128, requires_grad=True)
    counts = []
    for route in (True, False):
        monkeypatch.setattr(linear, "ONEDNN_PRODUCTS", route)
        assert linear.onednn_product(x, layer.weight) == (route and torch.backends.mkldnn.is_available())
        with FlopCounterMode(display=False) as counter:
            layer(x).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts == [3 * 2 * 256 * 128 * 512] * 2  # forward, and the input's and the weight's gradients


class SlowCallback(L.Callback):
    """Spends 0.2 s after every step, inside `paused` (as the FID callback and the image logger do)."""

    def __init__(self):
        self.spent = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with throughput.paused(trainer), timed(self.spent):
            time.sleep(0.2)


def test_paused_work_is_neither_training_time_nor_data_wait(tmp_path: Path):
    callback = Throughput(count_flops=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[callback, slow := SlowCallback()])
    data = SlowBatches(4, 0.05)
    trainer.fit(TwoLayers(), train_dataloaders=DataLoader(data, batch_size=None))
    assert callback.summary["data_wait_ms"] == pytest.approx(ms_per_batch(data.spent, 4), abs=10)
    assert callback.summary["seconds"] < sum(slow.spent), "the 0.8 s of paused work is not training time"


class SlowCheckpoint(L.Callback):
    """Spends 0.3 s at the end of every second step, after the throughput callback (where Lightning puts its
    checkpoint callbacks), as a checkpoint written before that step's validation or at the run's end."""

    def __init__(self):
        self.spent = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % 2 == 0:
            with timed(self.spent):
                time.sleep(0.3)


class Validated(TwoLayers):
    def __init__(self, seconds: float = 0.0):
        super().__init__()
        self.seconds = seconds

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        time.sleep(self.seconds)


def test_a_checkpoint_before_validation_or_at_the_end_is_data_wait(tmp_path: Path):
    """Checkpoints at steps 2 (then validation) and 4 (the last): 0.6 s of data wait over 4 batches, not step time
    (validation's start used to drop the first, the end of training the second)."""
    callback = Throughput(count_flops=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[callback, slow := SlowCheckpoint()])
    train, val = (DataLoader(SlowBatches(n, 0.0), batch_size=None) for n in (4, 1))
    trainer.fit(Validated(), train_dataloaders=train, val_dataloaders=val)
    assert len(slow.spent) == 2
    assert callback.summary["data_wait_ms"] == pytest.approx(ms_per_batch(slow.spent, 4), abs=10)
    assert callback.summary["data_wait_fraction"] > 0.8


def test_validation_is_neither_training_time_nor_data_wait(tmp_path: Path):
    """Two validations of 0.5 s inside 4 fast steps: out of the training time and the data wait."""
    callback = Throughput(count_flops=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, val_check_interval=2, num_sanity_val_steps=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, callbacks=[callback])
    train, val = (DataLoader(SlowBatches(n, 0.0), batch_size=None) for n in (4, 1))
    trainer.fit(Validated(seconds=0.5), train_dataloaders=train, val_dataloaders=val)
    assert callback.summary["seconds"] < 0.5 and callback.summary["data_wait_ms"] < 50


class SavesFirst(L.Callback):
    """Saves a checkpoint in its own on_train_batch_end, before the throughput callback's (as SlurmRequeue does on
    a signal, listed before it), the save taking 0.1 s more."""

    def __init__(self, path: Path):
        self.path, self.spent = path, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with timed(self.spent):
            trainer.save_checkpoint(self.path)
            time.sleep(0.1)


def test_a_save_before_the_callbacks_batch_end_is_data_wait_too(tmp_path: Path):
    callback = Throughput(count_flops=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[saves := SavesFirst(tmp_path / "x.ckpt"), callback])
    trainer.fit(TwoLayers(), train_dataloaders=DataLoader(SlowBatches(4, 0.0), batch_size=None))
    assert callback.summary["data_wait_ms"] == pytest.approx(ms_per_batch(saves.spent, 4), abs=10)
    assert callback.summary["data_wait_ms"] >= 100


class LateCritic(L.LightningModule):
    """Manual optimization with a second network that joins at step 3, as the autoencoder's discriminator does at
    disc_start: from then on a batch costs more."""

    automatic_optimization = False

    def __init__(self):
        super().__init__()
        self.net, self.critic = nn.Linear(D, OUT, bias=False), nn.Linear(D, D, bias=False)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        net_opt, critic_opt = self.optimizers()
        net_opt.zero_grad()
        self.manual_backward(self.net(batch["x"]).pow(2).mean())
        net_opt.step()
        if self.global_step >= 3:  # from the third batch on (the net's step just counted)
            critic_opt.zero_grad()
            self.manual_backward(self.critic(batch["x"]).pow(2).mean())
            # as the autoencoder's discriminator: through the strategy, so global_step counts batches
            self.trainer.strategy.optimizer_step(critic_opt.optimizer, closure=lambda: None, model=self)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.net.parameters(), lr=0.01), torch.optim.SGD(self.critic.parameters(), lr=0.01)]


def test_a_step_that_grows_is_counted_again_and_a_resume_with_another_batch_size_scales(tmp_path: Path):
    """FLOPs are counted per sample for each kind of step (the optimizers it steps): the second network's work from
    step 3 on is counted, and a resume with smaller batches multiplies the counts by the samples it trains."""
    net = 2 * B * D * OUT + 2 * B * D * OUT          # forward, weight gradient (the input needs none)
    critic = 2 * B * D * D + 2 * B * D * D

    def fit(max_steps: int, batch: int, ckpt_path: Path | None = None) -> tuple[Throughput, L.Trainer]:
        callback = Throughput()
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                            callbacks=[callback])
        data = [{"x": torch.randn(batch, D), "caption": ["a"] * batch} for _ in range(20)]
        trainer.fit(LateCritic(), train_dataloaders=DataLoader(data, batch_size=None), ckpt_path=ckpt_path)
        return callback, trainer

    callback, trainer = fit(6, B)
    assert callback.flops_per_sample == {"0": net / B, "0,1": (net + critic) / B}
    # batches 0-1: the net alone; 2: the critic joins (charged the last count until batch 3 counts its kind, then
    # corrected: the whole critic step was charged as the net's alone); 3-5 counted
    want = 2 * net + 4 * (net + critic)
    assert callback.summary["flops_per_sec_per_device"] * callback.summary["seconds"] == pytest.approx(want)
    trainer.save_checkpoint(tmp_path / "step6.ckpt")
    resumed, _ = fit(8, B // 4, tmp_path / "step6.ckpt")
    assert resumed.flops_per_sample == callback.flops_per_sample  # taken from the checkpoint, not counted again
    assert resumed.summary["flops_per_sec_per_device"] * resumed.summary["seconds"] == \
        pytest.approx(2 * (net + critic) / 4)


def test_lines_stay_on_the_step_schedule_after_a_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    def fit(max_steps: int, ckpt_path: Path | None = None) -> L.Trainer:
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, log_every_n_steps=3, logger=False,
                            enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                            default_root_dir=tmp_path, callbacks=[Throughput(count_flops=False)])
        trainer.fit(TwoLayers(), train_dataloaders=DataLoader(SlowBatches(20, 0.0), batch_size=None),
                    ckpt_path=ckpt_path)
        return trainer

    fit(4).save_checkpoint(tmp_path / "step4.ckpt")
    with caplog.at_level("INFO", logger=throughput.__name__):
        fit(10, tmp_path / "step4.ckpt")
    messages = [r.getMessage() for r in caplog.records if r.name == throughput.__name__]
    assert [line.split(":")[0] for line in messages] == ["throughput step 6", "throughput step 9", "throughput summary"]
    # the summary covers the segment, and says so (it read as the whole run's)
    assert messages[-1].startswith("throughput summary: 6 steps (steps 5-10 of a run resumed at step 4), 48 images")


def test_no_step_logging_leaves_the_summary_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """trainer.log_every_n_steps=0 is Lightning's "no step logging": the throughput lines came at every step."""
    trainer = L.Trainer(accelerator="cpu", max_steps=3, log_every_n_steps=0, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[Throughput(count_flops=False), NanGuard()])
    with caplog.at_level("INFO", logger=throughput.__name__):
        trainer.fit(TwoLayers(), train_dataloaders=DataLoader(SlowBatches(5, 0.0), batch_size=None))
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.name == throughput.__name__] == [
        "throughput summary"]
    assert not any(key.startswith("train/grad_norm") for key in trainer.callback_metrics)


@pytest.mark.parametrize("name, capability, precision, want", [
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16-mixed", (312e12, "bf16")),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "32-true", (156e12, "tf32")),  # fp32 matmuls run as TensorFloat-32
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16-mixed", (989.4e12, "bf16")),
    ("NVIDIA H100 PCIe", (9, 0), "16-mixed", (756e12, "fp16")),
    ("NVIDIA H200", (9, 0), "bf16-mixed", (989.4e12, "bf16")),
    ("NVIDIA L40S", (8, 9), "32-true", (183e12, "tf32")),  # (tf32: true)
    ("NVIDIA L40", (8, 9), "bf16-mixed", (181.05e12, "bf16")),  # not the L4's 121e12 (Lightning matches "l4")
    ("NVIDIA GeForce RTX 4090", (8, 9), "bf16-true", (165.2e12, "bf16")),
    ("Tesla V100-SXM2-16GB", (7, 0), "32-true", (15.7e12, "fp32")),  # before Ampere: no TensorFloat-32
])
def test_peak_table(monkeypatch: pytest.MonkeyPatch, name: str, capability: tuple[int, int], precision: str,
                    want: tuple[float, str]):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert peak_flops(torch.device("cuda", 0), precision) == want
    assert peak_flops(torch.device("cpu"), precision)[0] is None


def test_the_line_is_in_the_log_of_a_real_ldm_train_run(shapes_shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    overrides = tiny_overrides(shapes_shards, out, max_steps=6, every=3) + ["trainer.log_every_n_steps=2",
                                                                             "model.net.ch=16"]
    result = run_cli(overrides, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = (out / "train.log").read_text()
    lines = [line.split(" - ", 1)[1] for line in log.splitlines() if "ldm.callbacks.throughput" in line]
    assert [line.split(":")[0] for line in lines] == ["throughput step 2", "throughput step 4", "throughput step 6",
                                                      "throughput summary"]
    assert all(" images/s (" in line and " per device x 1), data wait " in line and "TFLOP/s per device" in line
               for line in lines)
    assert lines[-1].startswith("throughput summary: 6 steps, 24 images in ")
    with open(next((out / "csv").rglob("metrics.csv"))) as f:
        logged = list(csv.DictReader(f))
    rows = [r for r in logged if r.get("throughput/images_per_sec")]
    # at the step of the same batches' losses (Lightning's: the steps before the batch), not one after
    assert [int(r["step"]) for r in rows] == [int(r["step"]) for r in logged if r.get("train/rec_loss")] == [1, 3, 5]
    assert all(float(r["throughput/images_per_sec"]) > 0 and float(r["throughput/data_wait_ms"]) >= 0 for r in rows)


class SaveAtBatchEnd(L.Callback):
    """Writes a checkpoint in its own on_train_batch_end, before the throughput callback's (as SlurmRequeue does)."""

    def __init__(self, batch: int, path: Path):
        self.batch, self.path = batch, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.batch:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("batch", [0, 2])
def test_a_checkpoint_saved_before_the_batch_end_holds_the_batchs_counts(tmp_path: Path, batch: int):
    """The state is that after the batch: its count taken (batch 0), or the new kind it revealed still to count
    (batch 2, the critic's first), so that a resume counts the batches an uninterrupted run counts."""
    callback = Throughput()
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[SaveAtBatchEnd(batch, tmp_path / "mid.ckpt"), callback])
    data = [{"x": torch.randn(B, D), "caption": ["a"] * B} for _ in range(4)]
    trainer.fit(LateCritic(), train_dataloaders=DataLoader(data, batch_size=None))
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]["Throughput"]
    assert state["flops_per_sample"] == {"0": callback.flops_per_sample["0"]}
    assert state["count_next"] is (batch == 2)
