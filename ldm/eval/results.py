"""Reporting: results files in which every row holds the metrics and the protocol that produced them, the printed
rows, and the W&B table of samples.

`results.jsonl` is the record (one JSON object a line, appended); `results.csv` is rewritten from it after every
append, with the union of all rows' columns, so rows of different sweeps (generation, reconstruction) sit in one table.
Nested values (lists, dicts) go into the CSV as JSON strings.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ldm.io import atomic_open

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
# Columns that lead the CSV when present; the rest follow in first-seen order.
LEADING_COLUMNS = ("checkpoint", "checkpoint_kind", "weights", "sampler", "num_steps", "guidance_scale", "num_samples",
                   "resolution", "seed", "fid", "kid", "clip_score", "shapes_color_accuracy", "rfid", "psnr", "ssim",
                   "lpips")


def read_results(output_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of results.jsonl; a line that is not a JSON object (a write cut short by a kill or a crash) is left
    out with a warning naming it."""
    path = Path(output_dir) / JSONL_NAME
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            log.warning("%s line %d is not a results row (a write cut short?); left out of results.csv", path, number)
    return rows


def append_results(output_dir: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append `rows` to results.jsonl and rewrite results.csv from the whole file. A last line cut short (no
    newline) stays on its own line, so the new rows are whole."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / JSONL_NAME
    torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
    with open(path, "a") as f:
        if torn:
            f.write("\n")
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    rewrite_csv(output_dir)


def rewrite_csv(output_dir: str | Path) -> None:
    """Rewrite results.csv from results.jsonl, when there is one (also at a sweep's start: a run killed between its
    last append and the rewrite left the CSV a row short)."""
    rows = read_results(output_dir)
    if rows:
        write_csv(rows, Path(output_dir) / CSV_NAME)


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    columns = [c for c in LEADING_COLUMNS if c in seen] + [c for c in seen if c not in LEADING_COLUMNS]
    with atomic_open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})


def print_row(row: dict[str, Any]) -> None:
    """A row's sweep settings on one line, then `name: value` for each metric."""
    from ldm.eval.metrics import GENERATION_METRICS, RECONSTRUCTION_METRICS

    metric_names = [*GENERATION_METRICS, "kid_std", *RECONSTRUCTION_METRICS]
    where = ", ".join(f"{k}={row[k]}" for k in ("checkpoint", "weights", "sampler", "num_steps", "guidance_scale",
                                                 "num_samples", "resolution", "seed") if k in row)
    print(f"[ldm-eval] {where}", flush=True)
    for name in metric_names:
        if name in row:
            print(f"{name}: {row[name]:.6g}", flush=True)


class WandbTable:
    """A W&B run holding a table of sample images per results row, and the results table itself."""

    def __init__(self, cfg: Any):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, dir=cfg.output_dir,
                              mode="offline" if cfg.wandb.offline else "online", config=dataclasses.asdict(cfg),
                              job_type="eval")
        self.num_images = cfg.wandb.num_images
        self.names: dict[str, str] = {}  # checkpoint path -> its name in the table keys, unique in this run

    def checkpoint_name(self, checkpoint: str) -> str:
        """`<run>_<file stem>` (`runs/a/checkpoints/last.ckpt` -> `a_last`, `runs/a/export` -> `a_export`), made
        unique among this run's checkpoints, so that the tables of two runs' `last.ckpt` do not replace each other."""
        if checkpoint not in self.names:
            path = Path(checkpoint)
            run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            base = name = f"{run.name}_{path.stem}" if run.name else path.stem
            taken, n = set(self.names.values()), 1
            while name in taken:
                n += 1
                name = f"{base}-{n}"
            self.names[checkpoint] = name
        return self.names[checkpoint]

    def log_samples(self, row: dict[str, Any], images: torch.Tensor | None, prompts: list[str]) -> None:
        if images is None:
            return
        table = self.wandb.Table(columns=["checkpoint", "checkpoint_step", "sample", "seed", "prompt", "image"])
        # rank 0 holds global samples 0, W, 2W, ...: its k-th image is sample k * world_size.
        for k, image in enumerate(images[: self.num_images]):
            index = k * row["world_size"]
            table.add_data(row["checkpoint"], row.get("checkpoint_step"), index, row["seed"] + index, prompts[index],
                           self.wandb.Image(image.permute(1, 2, 0).numpy(), caption=prompts[index]))
        point = f"{row['sampler']}_{row['num_steps']}_cfg{row['guidance_scale']:g}"
        self.run.log({f"samples/{self.checkpoint_name(row['checkpoint'])}/{point}": table})

    def finish(self, rows: list[dict[str, Any]], exit_code: int = 0) -> None:
        if rows:
            columns = sorted({k for row in rows for k in row})
            data = [[json.dumps(row.get(c)) if isinstance(row.get(c), (list, dict)) else row.get(c) for c in columns]
                    for row in rows]
            self.run.log({"results": self.wandb.Table(columns=columns, data=data)})
        self.run.finish(exit_code=exit_code)
