"""Shared test setup: offline hubs and loggers, and small shapes shards written once per session."""

from __future__ import annotations

import os
import signal

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# A test suite started in the background of a shell without job control (`make test &` in a script) inherits SIGINT
# ignored, and so would every command a test starts: Ctrl-C tests (which send SIGINT to ldm-data, ldm-encode) would
# find it ignored. With a handler here, the commands start with SIGINT's default (exec resets handled signals).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def hydra_schemas() -> None:
    """conf/ extends the dataclass schemas: store them in Hydra's ConfigStore before a test composes it, as every
    CLI does at import."""
    from ldm.config import register_schemas

    register_schemas()


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 train / 16 val shapes samples at 32 px, 16 per shard (4 + 1 shards), seed 0, with summary.json."""
    from ldm.cli.data import write_dataset

    out = tmp_path_factory.mktemp("shapes_shards")
    write_dataset({"source": "shapes", "output_dir": str(out), "num_samples": 64, "val_samples": 16,
                   "resolution": 32, "seed": 0, "samples_per_shard": 16})
    return out


@pytest.fixture
def single_torch_thread():
    """One intra-op thread for the test (note: on a shared 2-core machine torch's two spinning threads made short
    fits up to 8x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=[False, True], ids=["blas", "onednn"])
def onednn(request, monkeypatch) -> bool:
    """Both routes of fp32 CPU products (`ldm.nn.linear`) on any CPU, oneDNN's for products of any size; the route
    is otherwise the machine's and the shapes'."""
    import ldm.nn.linear

    monkeypatch.setattr(ldm.nn.linear, "ONEDNN_PRODUCTS", request.param)
    monkeypatch.setattr(ldm.nn.linear, "MIN_MACS", 1)
    return request.param

