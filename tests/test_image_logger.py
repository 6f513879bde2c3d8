"""The image-grid callback: one grid per optimizer step (not per micro-batch), and a failing grid does not stop the
run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from ldm.callbacks.image_logger import ImageLogger


class Grids(L.LightningModule):
    """A linear model whose `log_images` returns its input, or raises when `fail` is set."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.net = nn.Linear(4, 4)
        self.fail = fail
        self.modes: list[bool] = []  # training mode at each step

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.modes.append(self.training)
        return self.net(batch["x"]).pow(2).mean()

    def log_images(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.fail:
            raise RuntimeError("CUDA out of memory (simulated)")
        return {"inputs": batch["image"]}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ValidatedGrids(Grids):
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        pass


def fit(module: Grids, tmp_path: Path, accumulate: int, max_steps: int, every_n_steps: int = 1,
        **options) -> None:
    data = [{"x": torch.randn(2, 4), "image": torch.rand(2, 3, 8, 8) * 2 - 1} for _ in range(accumulate * max_steps)]
    val = {"val_dataloaders": DataLoader(data, batch_size=None)} if isinstance(module, ValidatedGrids) else {}
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path, **options,
                        callbacks=[ImageLogger(str(tmp_path / "images"), every_n_steps=every_n_steps)])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None), **val)


def test_one_grid_per_optimizer_step_under_accumulation(tmp_path: Path):
    fit(Grids(), tmp_path, accumulate=2, max_steps=2)
    written = sorted(p.name for p in (tmp_path / "images" / "train").iterdir())
    assert written == ["inputs_step0000001.png", "inputs_step0000002.png"], "none before the first step, none twice"


def test_one_validation_grid_per_validation_and_none_from_the_sanity_check(tmp_path: Path):
    """The first batch of each validation (steps 2 and 4), none of Lightning's sanity check before step 1 (untrained
    weights, written as step 0)."""
    fit(ValidatedGrids(), tmp_path, accumulate=1, max_steps=4, every_n_steps=0, val_check_interval=2,
        num_sanity_val_steps=2)
    written = sorted(p.name for p in (tmp_path / "images" / "val").iterdir())
    assert written == ["inputs_step0000002.png", "inputs_step0000004.png"]
    assert not (tmp_path / "images" / "train").exists()  # every_n_steps=0: no training grids


def test_grids_every_n_steps_of_the_steps_last_batch_and_of_validations_first(tmp_path: Path):
    """every_n_steps=2 under accumulation of 2: grids at steps 2 and 4, each of the batch that ended its step; at each
    validation, of its first batch; 4 images of 8 px, nrow=2 a row (22 px a side with the 2-px padding), clamped."""
    data = [{"x": torch.randn(4, 4), "image": torch.full((4, 3, 8, 8), -1.0 + 0.5 * i)} for i in range(8)]
    val = [{"x": torch.randn(4, 4), "image": torch.full((4, 3, 8, 8), 0.9 - 0.5 * i)} for i in range(3)]
    trainer = L.Trainer(accelerator="cpu", max_steps=4, accumulate_grad_batches=2, val_check_interval=4,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[ImageLogger(str(tmp_path / "images"), every_n_steps=2, nrow=2)])
    trainer.fit(ValidatedGrids(), train_dataloaders=DataLoader(data, batch_size=None),
                val_dataloaders=DataLoader(val, batch_size=None))
    grids = {}
    for path in sorted((tmp_path / "images").rglob("*.png")):
        with Image.open(path) as image:
            grids[f"{path.parent.name}/{path.name}"] = (image.size, image.getpixel((5, 5)))
    assert grids == {"train/inputs_step0000002.png": ((22, 22), (191, 191, 191)),  # batch 3: 0.5
                     "train/inputs_step0000004.png": ((22, 22), (255, 255, 255)),  # batch 7: 2.5, clamped to 1
                     "val/inputs_step0000002.png": ((22, 22), (242, 242, 242)),    # the first: 0.9
                     "val/inputs_step0000004.png": ((22, 22), (242, 242, 242))}


def test_a_failing_grid_is_a_warning_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    module = Grids(fail=True)
    with caplog.at_level("WARNING", logger="ldm.callbacks.image_logger"):
        fit(module, tmp_path, accumulate=1, max_steps=3)
    assert module.trainer.global_step == 3 and all(module.modes), "trained to the end, in train mode throughout"
    warnings = [r.getMessage() for r in caplog.records if "no train grids" in r.getMessage()]
    assert len(warnings) == 3 and "RuntimeError: CUDA out of memory (simulated)" in warnings[0]


def test_a_png_that_cannot_be_written_whole_raises_and_leaves_no_file(tmp_path: Path):
    """`ldm.images.write_png` (ldm-sample's images and grid, these grids) under a file size limit, as a full disk: an
    error naming the file, no part-written PNG (torchvision's write_png left truncated files and no error: ldm-sample
    said "wrote 2 images" and exited 0)."""
    script = f"""
import resource, signal, torch
from ldm.images import write_png
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the limit then fails the write with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
write_png(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
          {str(tmp_path / "noise.png")!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_bad_settings_are_refused_when_the_callback_is_built(tmp_path: Path):
    """every_n_steps=null crashed the run at its first step (None > 0); nrow=0 failed every grid with a warning each
    time; a fraction drew a grid at every step; -1 none, unsaid."""
    from ldm.config import ConfigError

    for kwargs, message in [({"every_n_steps": None}, r"every_n_steps=None must be a whole number of steps >= 0"),
                            ({"every_n_steps": 0.5}, r"every_n_steps=0\.5 must be"),
                            ({"every_n_steps": -1}, r"every_n_steps=-1 must be"),
                            ({"nrow": 0}, r"callbacks\.image_logger\.nrow=0 must be a whole number"),
                            ({"nrow": None}, r"nrow=None must be"), ({"nrow": 2.5}, r"nrow=2\.5 must be"),
                            ({"nrow": "4"}, r"nrow='4' must be"),
                            ({"log_on_validation": "no"}, r"log_on_validation='no' must be true or false")]:
        with pytest.raises(ConfigError, match=message):
            ImageLogger(str(tmp_path), **kwargs)
    assert ImageLogger(str(tmp_path), every_n_steps=0).every_n_steps == 0
