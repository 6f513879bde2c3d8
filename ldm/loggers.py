"""A CSV metrics logger that keeps every step of every run segment.

Lightning's CSVLogger deletes `metrics.csv` when its directory already holds files, so a resumed or requeued run (the
same `paths.output_dir`) kept only its own steps. This logger appends: a new segment adds its rows after the old ones,
and when a segment logs a metric the file's header lacks, the file is rewritten once, atomically, with the wider
header (older rows get empty cells). A run resumed from an older checkpoint than the newest rows (after a SIGKILL)
logs those steps again; both rows stay, in the order they were written.
"""

from __future__ import annotations

import csv
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from ldm.config import ConfigError, is_int
from ldm.io import atomic_open

METRICS_NAME = "metrics.csv"


class AppendingCSVLogger(Logger):
    """`<save_dir>/<name>/metrics.csv` (one row per logged step) and `hparams.yaml`, appended across restarts.

    Args:
        save_dir: the run directory.
        name: the subfolder of `save_dir` that holds the files.
        flush_logs_every_n_steps: buffered rows are written at most this many logging calls apart (and at the end).
    """

    def __init__(self, save_dir: str, name: str = "csv", flush_logs_every_n_steps: int = 100) -> None:
        super().__init__()
        if not isinstance(save_dir, str | os.PathLike) or not str(save_dir):
            raise ConfigError(f"logger.csv.save_dir={save_dir!r} must be a folder (default: ${{paths.output_dir}}, the "
                              f"run directory)")
        if not isinstance(name, str):
            raise ConfigError(f"logger.csv.name={name!r} must be a folder name under logger.csv.save_dir (default: "
                              f"csv; '' for save_dir itself)")
        if not is_int(flush_logs_every_n_steps) or flush_logs_every_n_steps < 1:
            raise ConfigError(f"logger.csv.flush_logs_every_n_steps={flush_logs_every_n_steps!r} must be a whole "
                              f"number >= 1")
        self.directory = str(save_dir)
        self.folder = name
        self.flush_every = flush_logs_every_n_steps
        self.hparams: dict[str, Any] = {}
        self._rows: list[dict[str, Any]] = []  # logged, not yet written

    @property
    @override
    def name(self) -> str:
        return self.folder

    @property
    @override
    def version(self) -> str:
        return ""

    @property
    @override
    def save_dir(self) -> str:
        return self.directory

    @property
    @override
    def log_dir(self) -> str:
        return str(Path(self.directory) / self.folder)

    @property
    def metrics_file(self) -> Path:
        return Path(self.log_dir) / METRICS_NAME

    @override
    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        self.hparams.update(vars(params) if isinstance(params, Namespace) else params)  # every call's, merged
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        save_hparams_to_yaml(Path(self.log_dir) / "hparams.yaml", self.hparams)  # as Lightning's CSVLogger does

    @override
    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        row = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        self._rows.append({**row, "step": step if step is not None else len(self._rows)})
        if len(self._rows) >= self.flush_every:
            self.save()

    @override
    @rank_zero_only
    def save(self) -> None:
        if not self._rows:
            return
        path = self.metrics_file
        header = self._header(path)
        keys = sorted(set(header).union(*self._rows))
        if header and keys == header:
            with open(path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=keys).writerows(self._rows)
        else:  # new file, or new columns: rewrite it whole with the wider header
            old = []
            if header:
                with open(path, newline="") as f:
                    old = list(csv.DictReader(f))
            with atomic_open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=keys)
                writer.writeheader()
                writer.writerows(old + self._rows)
        self._rows = []

    @staticmethod
    def _header(path: Path) -> list[str]:
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return next(csv.reader(f), [])

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()
