"""Two real gloo processes, two workers each, over five uneven shards: no duplicates, equal batch counts, no hang."""

from __future__ import annotations

import datetime
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds

from ldm.data import shapes
from ldm.data.datamodule import WebDataModule
from ldm.data.shards import encode_image
from ldm.data.stream import EpochPlan

SHARD_SIZES = [20, 3, 11, 16, 7]  # 57 samples; no summary.json, so the datamodule counts tar headers
WORLD, WORKERS, BATCH = 2, 2, 4


def _write_uneven_shards(directory: Path) -> list[str]:
    dataset = shapes.ShapesDataset(sum(SHARD_SIZES), 16, seed=5)
    index = 0
    for s, size in enumerate(SHARD_SIZES):
        with wds.TarWriter(str(directory / f"train-{s:06d}.tar")) as sink:
            for _ in range(size):
                sample = dataset[index]
                sink.write({"__key__": f"{index:09d}", "png": encode_image(sample["image"], "png"),
                            "txt": sample["caption"], "json": json.dumps(sample["metadata"])})
                index += 1
    return [f"{i:09d}" for i in range(index)]


def _worker(rank: int, port: int, shard_dir: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        os.environ.pop("RANK", None)  # the datamodule must learn the rank from torch.distributed, not the env
        dm = WebDataModule(train_shards=f"{shard_dir}/train-*.tar", batch_size=BATCH, num_workers=WORKERS, seed=1,
                           shuffle_buffer=16)
        dm.setup("fit")
        epochs = []
        for _ in range(2):
            loader = dm.train_dataloader()
            keys, batches = [], 0
            for batch in loader:
                keys.extend(batch["key"])
                batches += 1
                dist.all_reduce(torch.ones(1))  # a collective per step, as DDP's gradient sync: hangs if uneven
            dist.barrier()
            epochs.append({"keys": keys, "batches": batches, "len": len(loader)})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(epochs))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_ddp_two_ranks_two_workers(tmp_path: Path):
    all_keys = set(_write_uneven_shards(tmp_path))
    # Forked ranks start in a moment (spawned ones re-import torch and Lightning); each rank forks its 2 workers.
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    slots = WORLD * WORKERS
    per_slot_batches = (len(all_keys) // slots) // BATCH  # 57 // 4 = 14 samples per slot -> 3 batches
    for epoch in range(2):
        runs = [r[epoch] for r in ranks]
        assert [run["batches"] for run in runs] == [WORKERS * per_slot_batches] * WORLD
        assert all(run["len"] == run["batches"] for run in runs)
        seen = [k for run in runs for k in run["keys"]]
        assert len(seen) == len(set(seen)), "no sample is read twice in an epoch"
        assert set(seen) <= all_keys
        left_out = len(all_keys) - len(seen)
        assert left_out == len(all_keys) - slots * per_slot_batches * BATCH  # 57 - 48 = 9
        assert left_out < slots * (BATCH + 1), "the documented bound"
    assert ranks[0][0]["keys"] != ranks[0][1]["keys"], "each epoch reshuffles"


def test_the_samples_no_range_covers_differ_from_epoch_to_epoch():
    """One shard of 16 samples over 2 ranks x 3 workers: 6 ranges of 2 samples leave 4 over. They were always the
    shard's last 4, never trained; now the ranges start at a position drawn per epoch and wrap round."""
    def covered(epoch: int, counts: list[int]) -> list[tuple[str, int]]:
        samples = []
        for rank in range(2):
            plan = EpochPlan([f"s{i}" for i in range(len(counts))], counts, seed=3, rank=rank, world_size=2,
                             num_workers=3, batch_size=2, train=True, resolution=8, epoch=epoch)
            for slot in range(rank * 3, rank * 3 + 3):
                samples += [(url, i) for url, lo, hi in plan.segments(slot) for i in range(lo, hi)]
        return samples

    seen = set()
    for epoch in range(20):
        samples = covered(epoch, [16])
        assert len(samples) == len(set(samples)) == 12  # each range 2 samples, none read twice
        seen.update(samples)
    assert seen == {("s0", i) for i in range(16)}
    # S divides N: the ranges start at the sequence's start, as before (the shards' order alone changes the epochs)
    plan = EpochPlan(["a", "b"], [6, 6], seed=3, rank=0, world_size=2, num_workers=3, batch_size=2, train=True,
                     resolution=8, epoch=5)
    assert plan.shift == 0 and sorted(covered(5, [6, 6])) == [(u, i) for u in ("s0", "s1") for i in range(6)]
