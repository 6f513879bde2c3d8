"""Throughput in every run: images per second (global and per device), the time each step waited for data, and on
GPUs the model's FLOP/s, MFU against the device's peak and the peak memory.

Every `trainer.log_every_n_steps` optimizer steps rank 0 logs one line (and the same numbers, `throughput/*`, to the
run's loggers); at the end of training one summary line covers the run's training (a resumed run's: the segment since
the resume, with its first and last step):

    throughput step 50: 161.3 images/s (161.3 per device x 1), data wait 2.1 ms/batch (1.1%), 0.41 TFLOP/s per device
    throughput summary: 2200 steps, 70400 images in 430.2 s of training: 163.6 images/s (163.6 per device x 1), ...

Rates over each logging interval come from Lightning's `Throughput` (`lightning.fabric.utilities.throughput`). The
model's FLOPs per sample are counted by torch's `FlopCounterMode` (what Lightning's `measure_flops` runs): forward and
backward of the real step, whatever the module computes, on the first training step of a fresh run and again on the
second batch of each new kind of step (the autoencoder's discriminator joins at `disc_start`; a batch's kind is known
once it has stepped, so its first batch is charged the previous kind's count, corrected when the new one is known;
a run that stops on that batch keeps the previous kind's count for it). The counts are kept in checkpoints and a
resumed run takes them from there: counting runs under a dispatch mode that changes convolution
gradients in the last bits, so it must count the same batches as the run would have uninterrupted. Validation
time is left out of training time, and so is work that callbacks wrap in `paused(trainer)` (the FID evaluation, image
grids). Data wait is the time from the end of one training step (or of validation) to the start of the next (or of
validation, or the end of training): loading the batch, plus the loop's own work between steps (a checkpoint written
then counts too, the last one included).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput as WindowedThroughput
from lightning.fabric.utilities.throughput import get_available_flops
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode
from typing_extensions import override

from ldm.callbacks.step_boundary import StepBoundary, logging_due
from ldm.config import ConfigError

log = logging.getLogger(__name__)


def _mkldnn_convolution_flop(x_shape: list[int], w_shape: list[int], *args: Any, out_shape: list[int] | None = None,
                             **kwargs: Any) -> int:
    return flop_counter.conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


def _count_cpu_kernels() -> None:
    """Count the CPU kernels torch has no formula for: those SDPA dispatches to, as torch counts its GPU flash kernels
    (attention counted as 0 FLOPs, about 4% of a UNet step), and oneDNN's convolution, which `ldm.nn.linear` runs
    large products through (their forward counted as 0: a third of each product's FLOPs)."""
    aten = torch.ops.aten
    for name, formula, raw in (
            ("_scaled_dot_product_flash_attention_for_cpu", flop_counter.sdpa_flop, True),  # already shape-wrapped
            ("_scaled_dot_product_flash_attention_for_cpu_backward", flop_counter.sdpa_backward_flop, True),
            ("mkldnn_convolution", _mkldnn_convolution_flop, False)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=raw)(formula)


_count_cpu_kernels()

# Dense peak FLOP/s by compute dtype, per device name fragment (lower case; the first fragment found in
# torch.cuda.get_device_name() wins, so the specific names come first). From NVIDIA's datasheets, without the 2:4
# sparsity factor. note: Lightning has a table too, but it quotes H200 with sparsity (twice H100 SXM's dense peak),
# maps "NVIDIA H200" and "NVIDIA L40S" to no entry or to the L4, and gives the 4090 its fp32 rate for bf16; devices
# not listed here fall back to it (`get_available_flops`).
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "h100 pcie": {"fp32": 51.2e12, "tf32": 378e12, "bf16": 756e12, "fp16": 756e12},
    "h100 nvl": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "h100": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},  # SXM
    "h200 nvl": {"fp32": 60e12, "tf32": 417.5e12, "bf16": 835.5e12, "fp16": 835.5e12},
    "h200": {"fp32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},  # SXM: H100 SXM's compute
    "a100": {"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},  # SXM and PCIe alike
    "l40s": {"fp32": 91.6e12, "tf32": 183e12, "bf16": 362.05e12, "fp16": 362.05e12},
    "l40": {"fp32": 90.5e12, "tf32": 90.5e12, "bf16": 181.05e12, "fp16": 181.05e12},  # Lightning: the L4's
    "rtx 4090": {"fp32": 82.6e12, "tf32": 82.6e12, "bf16": 165.2e12, "fp16": 165.2e12},  # fp32 accumulate
}
_TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(precision: str) -> str:
    """The dtype matmuls run in under a Trainer `precision` ("bf16-mixed", "16-mixed", "32-true", ...): bf16, fp16,
    tf32 (fp32 with TensorFloat-32 allowed, as `tf32: true` sets) or fp32."""
    precision = str(precision)
    if precision.startswith("bf16"):
        return "bf16"
    if precision.startswith("16"):
        return "fp16"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "fp32"


def peak_flops(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of `device` for `precision`, the dtype it is quoted for); None on CPUs and unknown GPUs."""
    dtype = compute_dtype(precision)
    if device.type != "cuda":
        return None, dtype
    if dtype == "tf32" and torch.cuda.get_device_capability(device) < (8, 0):
        dtype = "fp32"  # TensorFloat-32 needs Ampere or newer
    name = torch.cuda.get_device_name(device).lower()
    for fragment, table in PEAK_FLOPS.items():
        if fragment in name:
            return table[dtype], dtype
    available = get_available_flops(device, "tfloat32" if dtype == "tf32" else _TORCH_DTYPES[dtype])
    return (float(available) if available else None), dtype


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the length of its first tensor (or list) value."""
    if isinstance(batch, dict):
        tensors = [v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
        batch = tensors[0] if tensors else next(iter(batch.values()))
    elif isinstance(batch, (list, tuple)):
        batch = batch[0]
    return len(batch)


@contextmanager
def paused(trainer: L.Trainer) -> Iterator[None]:
    """Leave the time spent inside out of the `Throughput` numbers: neither training time nor data wait (evaluation
    that a callback runs from a training hook)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        leave_out(trainer, time.perf_counter() - start)


def leave_out(trainer: L.Trainer, seconds: float) -> None:
    """Leave `seconds` of work just done out of the `Throughput` numbers (as `paused` does; a resumed epoch's read
    up to its position)."""
    for callback in trainer.callbacks:
        if isinstance(callback, Throughput):
            callback.exclude(seconds)


class Throughput(StepBoundary):
    """Log images/s, data wait, FLOP/s, MFU and peak memory every `trainer.log_every_n_steps` optimizer steps and
    once at the end of training (rank 0; see the module docstring).

    Args:
        count_flops: count the model's FLOPs (forward + backward of a training batch) for FLOP/s and MFU: on the
            first batch, and again on the second batch of each new kind, a kind being the set of optimizers a batch
            steps (the autoencoder's discriminator joins at `disc_start`; a micro-batch inside gradient accumulation
            steps none; the first batch, charged the last count, is corrected then), per sample (a resume may change
            the batch size).
    """

    def __init__(self, count_flops: bool = True):
        super().__init__()
        if not isinstance(count_flops, bool):  # "maybe" counted
            raise ConfigError(f"callbacks.throughput.count_flops={count_flops!r} must be true or false")
        self.count_flops = count_flops
        self.flops_per_sample: dict[str, float] = {}  # batch kind -> forward + backward FLOPs per sample, this rank
        self._restored: dict[str, Any] | None = None  # what a checkpoint held beside the counts
        self.peak: float | None = None
        self.dtype = "fp32"
        self.last: dict[str, float] = {}  # the numbers of the last line logged
        self.summary: dict[str, float] = {}  # the numbers of the summary line
        self._counter: FlopCounterMode | None = None
        self._recounted: list[torch.nn.Module] = []  # modules whose checkpointing recomputation the count leaves out

    # -- state: the FLOP count travels with the checkpoint -------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        if getattr(self, "_open", False):  # a callback saving at its own batch end (SlurmRequeue) runs before this
            self._step_end = time.perf_counter()  # one's: the step ended here, the save is data wait
        self._settle()
        return {"flops_per_sample": dict(self.flops_per_sample), "count_next": getattr(self, "_count_next", False)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flops_per_sample = dict(state_dict.get("flops_per_sample") or {})
        self._restored = {"count_next": state_dict.get("count_next"),  # None: a checkpoint of older code
                          "per_batch": state_dict.get("flops_per_batch")}  # whose one count was per batch

    # -- hooks -----------------------------------------------------------------------------------------------------

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.device = trainer.strategy.root_device
        self.world_size = trainer.world_size
        self.peak, self.dtype = peak_flops(self.device, trainer.precision)
        self.window = WindowedThroughput(available_flops=self.peak, world_size=self.world_size, window_size=2)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._t0 = self._ready = time.perf_counter()
        self._step_end: float | None = None  # set by a save inside the batch's end (`state_dict`)
        self._first_step = trainer.global_step  # > 0: resumed there
        self._paused = 0.0  # seconds of validation inside training
        self._batches = self._samples = self._steps = 0
        self._wait = 0.0  # data wait, summed over the run
        self._flops = 0.0  # FLOPs of the batches so far
        self._stepping: set[int] = set()  # optimizers the current batch stepped
        self._kind: str | None = None  # those of the last batch that stepped
        self._pending: float | None = None  # a count whose kind the batch's step has yet to tell
        self._owed: dict[str, list[float]] = {}  # kind without a count -> [samples, FLOPs charged for them]
        restored = self._restored or {"count_next": None, "per_batch": None}
        self._legacy = restored["per_batch"]  # taken as the first batch's count, not counted again
        # a batch is counted only with count_flops: the first of a run without counts (also one resumed from a
        # checkpoint of count_flops=false), or the one a checkpoint was waiting to count
        self._count_next = self.count_flops and (
            (not self.flops_per_sample and self._legacy is None) or bool(restored["count_next"]))
        self._open = False  # inside a training batch whose bookkeeping (`_settle`) is still to do
        self._counts_left = 4  # kinds that alternate batch by batch must not be counted forever
        self._mark = {"batches": 0, "samples": 0, "wait": 0.0, "time": 0.0, "flops": 0.0}  # at the last line
        self.window.update(time=0.0, batches=0, samples=0, flops=0)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        now = time.perf_counter()
        self._wait += now - self._ready
        self._stepping, self._size, self._open = set(), batch_size_of(batch), True
        if self._count_next and self._counter is None:
            self._recounted = [m for m in pl_module.modules() if hasattr(m, "recomputation_counts")]
            for module in self._recounted:  # gradient checkpointing's recomputation: counted apart, left out
                module.recomputation_counts = []
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._stepping.add(next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), -1))

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._settle()
        size = self._size
        per_sample = self.flops_per_sample.get(self._kind, self._pending)
        if per_sample is None and self.flops_per_sample:
            per_sample = next(reversed(self.flops_per_sample.values()))  # a new kind's first batch: the last count,
            owed = self._owed.setdefault(self._kind, [0, 0.0])               # corrected once its own is counted
            owed[0] += size
            owed[1] += size * per_sample
        if per_sample is not None:
            self._flops += size * per_sample
        self._batches += 1
        self._samples += size
        if self.stepped(trainer):  # not mid-accumulation
            self._steps += 1
            if logging_due(trainer):  # on schedule after a resume too
                try:
                    self._log_interval(trainer)
                except Exception as err:  # noqa: BLE001 -- a measurement must never stop a training run
                    log.warning("throughput: could not measure this interval (%s: %s)", type(err).__name__, err)
        self._ready = self._step_end or time.perf_counter()
        self._step_end = None

    def exclude(self, seconds: float) -> None:
        """Take `seconds` of work just done (see `paused`) out of training time and of the next step's data wait;
        work inside validation (grids of its first batch) is already out."""
        if hasattr(self, "_t0") and getattr(self, "_val_start", None) is None:
            self._paused += seconds
            self._ready += seconds

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and hasattr(self, "_t0"):  # validation inside fit, not the sanity check
            self._val_start = time.perf_counter()
            self._wait += self._val_start - self._ready  # a signal's save at the step's end, before validation

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if getattr(self, "_val_start", None) is not None:
            now = time.perf_counter()
            self._paused += now - self._val_start
            self._ready, self._val_start = now, None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._counter is not None:  # the run ended inside the first step
            self._counter.__exit__(None, None, None)
            self._counter = None
            self._end_recount()
        if not hasattr(self, "_t0") or self._batches == 0:
            return
        self._wait += time.perf_counter() - self._ready  # the last step's checkpoint
        numbers = self._numbers(self._train_time(), self._batches, self._samples, self._wait,
                                self._flops or None)
        self.summary = numbers
        if trainer.is_global_zero:
            segment = f" (steps {self._first_step + 1}-{trainer.global_step} of a run resumed at step " \
                f"{self._first_step})" if self._first_step else ""
            log.info("throughput summary: %d steps%s, %d images in %.1f s of training: %s", self._steps, segment,
                     self._samples * self.world_size, numbers["seconds"], self._describe(numbers))

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
            self._end_recount()

    # -- numbers -------------------------------------------------------------------------------------------------------

    def _settle(self) -> None:
        """The FLOP bookkeeping of the batch just trained, once: its count (if counted), the kind of its step, and
        whether the next batch is to be counted. At the batch's end, or earlier from `state_dict`."""
        if not getattr(self, "_open", False):
            return
        self._open, size = False, max(self._size, 1)
        if self._legacy is not None:
            self._pending, self._legacy = self._legacy / size, None
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._pending = (self._counter.get_total_flops() - self._end_recount()) / size
            self._counter, self._count_next = None, False
            self._counts_left -= 1
        if self._stepping:  # a micro-batch inside gradient accumulation steps none: it keeps the kind of its step
            self._kind = ",".join(str(i) for i in sorted(self._stepping))
            if self._kind not in self.flops_per_sample:
                if self._pending is not None:  # counted on this batch, or on a micro-batch of its step
                    self.flops_per_sample[self._kind] = self._pending
                    samples, charged = self._owed.pop(self._kind, (0, 0.0))
                    self._flops += samples * self._pending - charged
                elif self.count_flops and self._counts_left > 0:
                    self._count_next = True  # a new kind (the discriminator joined): counted on the next batch
            self._pending = None

    def _end_recount(self) -> int:
        """The FLOPs of gradient checkpointing's recomputation in the step just counted (no model FLOPs, as MFU is
        defined, and benchmarks/gpu.py counts them)."""
        recomputed = 0
        for module in self._recounted:
            recomputed += sum(counter.get_total_flops() for counter in module.recomputation_counts or [])
            module.recomputation_counts = None
        self._recounted = []
        return recomputed

    def _train_time(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # note: otherwise the clock stops before the queued kernels do
        return time.perf_counter() - self._t0 - self._paused

    def _log_interval(self, trainer: L.Trainer) -> None:
        elapsed = self._train_time()
        m = self._mark
        batches, samples = self._batches - m["batches"], self._samples - m["samples"]
        flops = self._flops - m["flops"] if self._flops else None
        self.window.update(time=elapsed, batches=self._batches, samples=self._samples, flops=flops)
        rates = self.window.compute()
        numbers = self._numbers(elapsed - m["time"], batches, samples, self._wait - m["wait"], flops, rates)
        self._mark = {"batches": self._batches, "samples": self._samples, "wait": self._wait, "time": elapsed,
                      "flops": self._flops}
        self.last = numbers
        if trainer.is_global_zero:
            log.info("throughput step %d: %s", trainer.global_step, self._describe(numbers))
            metrics = {f"throughput/{k}": v for k, v in numbers.items() if k != "seconds"}
            for logger in trainer.loggers:  # at the step Lightning gives the batch's own metrics: the steps before it
                logger.log_metrics(metrics, step=trainer.global_step - 1)

    def _numbers(self, seconds: float, batches: int, samples: int, wait: float, flops: float | None,
                 rates: dict[str, float] | None = None) -> dict[str, float]:
        """Per-device and global rates over an interval of `seconds` with `batches` / `samples` / `flops` on this
        rank; the data wait per batch (a micro-batch under gradient accumulation)."""
        seconds = max(seconds, 1e-9)
        per_device = rates["device/samples_per_sec"] if rates else samples / seconds
        numbers = {"seconds": seconds, "images_per_sec": per_device * self.world_size,
                   "images_per_sec_per_device": per_device, "data_wait_ms": 1e3 * wait / max(batches, 1),
                   "data_wait_fraction": wait / seconds}
        if flops is not None:
            rate = rates.get("device/flops_per_sec") if rates else None
            numbers["flops_per_sec_per_device"] = rate if rate is not None else flops / seconds
            if self.peak:
                numbers["mfu"] = numbers["flops_per_sec_per_device"] / self.peak
        if self.device.type == "cuda":
            numbers["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return numbers

    def _describe(self, n: dict[str, float]) -> str:
        parts = [f"{n['images_per_sec']:.1f} images/s ({n['images_per_sec_per_device']:.1f} per device x "
                 f"{self.world_size})",
                 f"data wait {n['data_wait_ms']:.1f} ms/batch ({100 * n['data_wait_fraction']:.1f}%)"]
        if "flops_per_sec_per_device" in n:
            parts.append(f"{n['flops_per_sec_per_device'] / 1e12:.3g} TFLOP/s per device")
        if "mfu" in n:
            parts.append(f"MFU {100 * n['mfu']:.1f}% of {self.peak / 1e12:.0f} TFLOP/s ({self.dtype})")
        if "peak_memory_gib" in n:
            parts.append(f"peak memory {n['peak_memory_gib']:.2f} GiB")
        return ", ".join(parts)
