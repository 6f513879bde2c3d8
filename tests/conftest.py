"""Shared test setup: offline hubs and loggers, and small shapes shards written once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 train / 16 val shapes samples at 32 px, 16 per shard (4 + 1 shards), seed 0, with summary.json."""
    from ldm.cli.data import write_dataset

    out = tmp_path_factory.mktemp("shapes_shards")
    write_dataset({"source": "shapes", "output_dir": str(out), "num_samples": 64, "val_samples": 16,
                   "resolution": 32, "seed": 0, "samples_per_shard": 16})
    return out
