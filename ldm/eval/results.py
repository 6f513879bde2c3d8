"""Results files: every row holds the metrics and the protocol that produced them.

`results.jsonl` is the record (one JSON object a line, appended); `results.csv` is rewritten from it after every
append, with the union of all rows' columns, so rows of different sweeps (generation, reconstruction) sit in one table.
Nested values (lists, dicts) go into the CSV as JSON strings.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.io import atomic_open

JSONL_NAME = "results.jsonl"
CSV_NAME = "results.csv"
# Columns that lead the CSV when present; the rest follow in first-seen order.
LEADING_COLUMNS = ("checkpoint", "checkpoint_kind", "weights", "sampler", "num_steps", "guidance_scale", "num_samples",
                   "resolution", "seed", "fid", "kid", "clip_score", "shapes_color_accuracy", "rfid", "psnr", "ssim",
                   "lpips")


def read_results(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / JSONL_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def append_results(output_dir: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Append `rows` to results.jsonl and rewrite results.csv from the whole file."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / JSONL_NAME, "a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    write_csv(read_results(output_dir), output_dir / CSV_NAME)


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
