"""WebDataModule under a real Lightning Trainer: epochs reshuffle, and resuming from a mid-epoch checkpoint replays
exactly the batches the uninterrupted run saw."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from ldm.data.datamodule import WebDataModule


class KeyRecorder(L.LightningModule):
    """Records the keys of every training batch; one parameter so the optimizer has something to step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, list[str]]] = []

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.seen.append((self.global_step, list(batch["key"])))
        return (self.weight - batch["image"].mean()) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(shards: Path, root: Path, ckpt_path: str | None = None, num_workers: int = 2, callbacks: tuple = (),
         **trainer_options) -> KeyRecorder:
    dm = WebDataModule(train_shards=str(shards / "train-00000[0-2].tar"), batch_size=4, num_workers=num_workers, seed=7,
                       shuffle_buffer=8)
    module = KeyRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=trainer_options.pop("max_steps", 20), max_epochs=-1,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(root),
                        callbacks=[ModelCheckpoint(dirpath=str(root / "ckpt"), every_n_train_steps=3, save_top_k=-1,
                                                   filename="step{step}", auto_insert_metric_name=False), *callbacks],
                        **trainer_options)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return module


def test_lightning_resume_replays_the_same_batches(shapes_shards: Path, tmp_path: Path):
    full = _fit(shapes_shards, tmp_path / "full").seen  # 12 batches per epoch: steps 0..19 span epochs 0 and 1
    assert [step for step, _ in full] == list(range(20))
    epoch0, epoch1 = [k for _, ks in full[:12] for k in ks], [k for _, ks in full[12:] for k in ks]
    assert len(set(epoch0)) == 48 and epoch0 != epoch1[: len(epoch0)], "each epoch reads all, in a new order"
    for step in (9, 12, 15):  # mid epoch 0 (odd: the workers' roles rotate), the end of epoch 0, mid epoch 1
        resumed = _fit(shapes_shards, tmp_path / f"resume{step}", str(tmp_path / "full" / "ckpt" / f"step{step}.ckpt"))
        assert resumed.seen == full[step:], f"resumed at step {step}"


def test_reading_up_to_a_resumed_position_is_left_out_of_the_throughput(shapes_shards: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch, caplog):
    """A run resumed mid-epoch reads (and decodes) the samples it trained before its first batch: that time was
    charged as the first step's data wait and training time (minutes in a large epoch, the resumed segment's numbers
    meaningless)."""
    import time

    from ldm.callbacks.throughput import Throughput
    from ldm.data.stream import ShardStream

    decode = ShardStream.decode_samples

    def slow(self, samples, skips):  # 40 ms a sample: 160 ms of data wait a step, 1.44 s to read up to step 9
        for sample in decode(self, samples, skips):
            time.sleep(0.04)
            yield sample

    monkeypatch.setattr(ShardStream, "decode_samples", slow)
    options = {"num_workers": 0}
    _fit(shapes_shards, tmp_path / "full", max_steps=9, **options)
    callback = Throughput(count_flops=False)
    with caplog.at_level("INFO", logger="ldm.data.datamodule"):
        _fit(shapes_shards, tmp_path / "resumed", str(tmp_path / "full" / "ckpt" / "step9.ckpt"), max_steps=12,
             callbacks=[callback], **options)
    assert "s to read up to the resumed position in the epoch (left out of the throughput numbers)" in caplog.text
    assert callback.summary["data_wait_ms"] < 300, callback.summary  # (480 + 160 ms for its first step)


@pytest.mark.parametrize("limit", [6, 0.5])
def test_resume_at_the_end_of_an_epoch_shortened_by_limit_train_batches(shapes_shards: Path, tmp_path: Path,
                                                                         limit: int | float):
    """limit_train_batches=6 (or half of the 12) ends every epoch early: the checkpoint at step 6 is the end of epoch
    0, and the resume trains epoch 1, not the batches of epoch 0 past the limit."""
    full = _fit(shapes_shards, tmp_path / "full", limit_train_batches=limit).seen
    resumed = _fit(shapes_shards, tmp_path / "resumed", str(tmp_path / "full" / "ckpt" / "step6.ckpt"),
                   limit_train_batches=limit).seen
    assert resumed == full[6:]


def test_overfit_batches_are_the_same_batches_every_epoch(shapes_shards: Path, tmp_path: Path):
    """debug=overfit (trainer.overfit_batches): Lightning cuts each epoch to a few batches, which must be the same
    ones every epoch, or the preset trains on the whole data set in short epochs and shows no wiring bug."""
    seen = _fit(shapes_shards, tmp_path / "overfit", overfit_batches=3, max_steps=9).seen
    epochs = [[k for _, ks in seen[i:i + 3] for k in ks] for i in (0, 3, 6)]
    assert epochs[0] == epochs[1] == epochs[2]


def test_an_accumulation_that_does_not_divide_the_epoch_is_warned_about(shapes_shards: Path, tmp_path: Path, caplog):
    """12 batches per epoch: with 5 micro-batches per step each epoch ends with a step of 2, whose gradient Lightning
    still divides by 5, so that step is not the global batch printed at start; 4 divides 12, and 10 of them
    (limit_train_batches=10) divide into steps of 5."""
    import logging

    message = "trainer.accumulate_grad_batches=5 does not divide the 12 batches per rank per epoch"
    with caplog.at_level(logging.WARNING, logger="ldm.data.datamodule"):
        _fit(shapes_shards, tmp_path / "five", accumulate_grad_batches=5, max_steps=1)
    assert message in caplog.text and "takes 2 micro-batch(es)" in caplog.text and "8 samples per rank, not the 20" \
        in caplog.text
    for name, options in (("four", {"accumulate_grad_batches": 4}),
                          ("limited", {"accumulate_grad_batches": 5, "limit_train_batches": 10})):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="ldm.data.datamodule"):
            _fit(shapes_shards, tmp_path / name, max_steps=1, **options)
        assert "does not divide" not in caplog.text, name
