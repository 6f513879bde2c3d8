"""WebDataModule on real shards: batch format, resize/crop, corrupt samples, missing shards, exact resume."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm import config as configs
from ldm.cli.data import write_dataset
from ldm.data import shapes
from ldm.data.datamodule import STOP_SIGNALS, WebDataModule, _stop_signals_ignored


def make_dm(shards: Path, **overrides) -> WebDataModule:
    kwargs = {"train_shards": str(shards / "train-{000000..000003}.tar"), "val_shards": str(shards / "val-*.tar"),
              "batch_size": 8, "num_workers": 0, "seed": 0, **overrides}
    dm = WebDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_batches_from_config(shapes_shards: Path):
    node = configs.compose_node("data/webdataset")  # the YAML composed with its schema, as ldm-train does
    node.train_shards, node.val_shards, node.seed, node.batch_size = str(shapes_shards), str(shapes_shards), 0, 8
    dm = configs.instantiate(node, "data")  # a directory stands for its train-*.tar / val-*.tar shards
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == len(loader) == 64 // 8  # 2 workers, 32 samples each, 4 full batches each
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"{i:09d}" for i in range(64)]
    for b in batches:
        assert b["image"].shape == (8, 3, 32, 32) and b["image"].dtype == torch.float32
        assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0 and b["image"].std() > 0.1
        assert all(isinstance(c, str) and c.startswith("a ") for c in b["caption"])
        assert b["label"].dtype == torch.long and b["label"].shape == (8,)
    # The batch holds exactly what was written: undo the [-1, 1] scaling and compare with the generator.
    b = batches[0]
    index = int(b["key"][0])
    want = np.asarray(shapes.ShapesDataset(64, 32, seed=0)[index]["image"]).transpose(2, 0, 1)
    assert np.array_equal(((b["image"][0] + 1) * 127.5).round().numpy().astype(np.uint8), want)
    assert b["caption"][0] == shapes.sample_spec(0, index).caption
    assert int(b["label"][0]) == shapes.sample_spec(0, index).label
    val = list(dm.val_dataloader())
    assert sorted(k for b in val for k in b["key"]) == [f"{i:09d}" for i in range(16)]


def test_non_square_resize_and_crop(tmp_path: Path):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(12):
        arr = np.zeros((32, 48, 3), np.uint8)  # 48 wide, 32 high
        arr[:, :, 0] = np.linspace(0, 255, 48)[None, :].astype(np.uint8)
        arr[:, :, 2] = 10 * i
        Image.fromarray(arr).save(src / f"{i}.png")
        (src / f"{i}.txt").write_text(f"image {i}")
    write_dataset({"source": "folder", "input_dir": str(src), "output_dir": str(tmp_path / "out"),
                   "resolution": None, "val_samples": 2, "samples_per_shard": 5})
    dm = WebDataModule(train_shards=str(tmp_path / "out"), resolution=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    for b in dm.train_dataloader():
        assert b["image"].shape == (2, 3, 16, 16)
        red = (b["image"][:, 0] + 1) * 127.5  # centre crop of a 24x16 resize: the middle of the red ramp
        assert red.min() > 40 and red.max() < 215
        assert "label" not in b and all(c.startswith("image ") for c in b["caption"])
    dm = WebDataModule(train_shards=str(tmp_path / "out"), resolution=16, batch_size=2, num_workers=0,
                       random_crop=True, hflip=True, seed=3)
    dm.setup("fit")
    first = torch.cat([b["image"] for b in dm.train_dataloader()])
    assert first.shape == (10, 3, 16, 16)


def _noise_image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [(48, 32), (32, 48), (47, 32), (50, 33)])
def test_resize_and_crop_are_pillows_bicubic_and_a_window_inside_it(size: tuple[int, int]):
    """The short side resized to the resolution (the long one rounded) with PIL's bicubic filter; the centre crop is
    the middle window, a random crop any window inside the resized image, each drawn (a window past its edge read
    black bands)."""
    import random

    from ldm.data.stream import resize_crop

    image, r = _noise_image(*size), 16
    w, h = (max(r, round(side * r / min(size))) for side in size)
    whole = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (w - r) // 2, (h - r) // 2
    assert np.array_equal(np.asarray(resize_crop(image, r, None)), np.asarray(whole.crop((left, top, left + r,
                                                                                          top + r))))
    windows = {(x, y): np.asarray(whole.crop((x, y, x + r, y + r))) for x in range(w - r + 1) for y in range(h - r + 1)}
    drawn = set()
    for seed in range(200):
        crop = np.asarray(resize_crop(image, r, random.Random(seed)))
        match = [offset for offset, window in windows.items() if np.array_equal(window, crop)]
        assert match, "a random crop is a window inside the resized image"
        drawn.update(match)
    assert drawn == set(windows)


@pytest.fixture(scope="module")
def non_square_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 noise images stored at 24 x 16 (ldm-data crop=false), 4 of them the validation split."""
    root = tmp_path_factory.mktemp("non_square")
    (root / "in").mkdir()
    for i in range(12):
        _noise_image(48, 32, i).save(root / "in" / f"{i}.png")
        (root / "in" / f"{i}.txt").write_text(f"image {i}")
    write_dataset({"source": "folder", "input_dir": str(root / "in"), "output_dir": str(root / "out"),
                   "resolution": 16, "crop": False, "val_samples": 4})
    return root / "out"


def _images_by_key(shards: Path, train: bool, **options) -> dict[str, torch.Tensor]:
    dm = WebDataModule(train_shards=f"{shards}/train-*.tar", val_shards=f"{shards}/val-*.tar", resolution=16,
                       batch_size=2, num_workers=0, **options)
    dm.setup("fit")
    loader = dm.train_dataloader() if train else dm.val_dataloader()
    return {k: x for b in loader for k, x in zip(b["key"], b["image"])}


def test_validation_is_never_augmented_and_a_flip_alone_keeps_the_centre_crop(non_square_shards: Path):
    plain = _images_by_key(non_square_shards, train=False)
    for options in ({"hflip": True}, {"random_crop": True}, {"hflip": True, "random_crop": True}):
        augmented = _images_by_key(non_square_shards, train=False, **options)
        assert augmented.keys() == plain.keys() and all(torch.equal(plain[k], augmented[k]) for k in plain), options
    centre = _images_by_key(non_square_shards, train=True, seed=0)
    flipped = _images_by_key(non_square_shards, train=True, seed=0, hflip=True)
    assert flipped.keys() == centre.keys()
    assert all(torch.equal(centre[k], x) or torch.equal(centre[k], x.flip(-1)) for k, x in flipped.items())
    assert any(not torch.equal(centre[k], x) for k, x in flipped.items())


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_corrupt_samples_are_skipped_and_reported(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    good = _png(np.full((32, 32, 3), 100, np.uint8))
    shard = tmp_path / "bad-000000.tar"
    with wds.TarWriter(str(shard)) as sink:
        for i in range(10):
            data = {3: good[: len(good) // 2], 7: b"this is not an image"}.get(i, good)  # truncated, garbage
            sink.write({"__key__": f"k{i:02d}", "png": data, "txt": f"sample {i}", "json": json.dumps({"label": i})})
    dm = WebDataModule(train_shards=str(shard), batch_size=5, num_workers=0)
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="ldm.data.datamodule"):
        keys = [k for b in dm.train_dataloader() for k in b["key"]]
    assert len(keys) == 10, "the quota (10 samples -> 2 full batches) is met by re-reading good samples"
    assert {"k03", "k07"}.isdisjoint(keys) and set(keys) == {f"k{i:02d}" for i in range(10)} - {"k03", "k07"}
    assert dm.num_skipped == 2
    assert sorted((Path(s).name, k) for s, k, _ in dm.skipped) == [("bad-000000.tar", "k03"), ("bad-000000.tar", "k07")]
    assert "bad-000000.tar" in caplog.text and "k03" in caplog.text and "k07" in caplog.text
    # A truncated tar: the samples before the cut are read, the rest of the shard is reported, nothing hangs.
    whole = shard.read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "cut-000000.tar").write_bytes(whole[: len(whole) * 2 // 3])
    (tmp_path / "cut" / "ok-000000.tar").write_bytes(whole)
    dm = WebDataModule(train_shards=[str(tmp_path / "cut" / "cut-000000.tar"), str(tmp_path / "cut" / "ok-000000.tar")],
                       batch_size=2, num_workers=2, samples_per_shard=10)
    dm.setup("fit")
    batches = list(dm.train_dataloader())
    assert len(batches) == len(dm.train_dataloader()) and dm.num_skipped >= 2


def test_missing_shards_fail_at_setup(tmp_path: Path):
    dm = WebDataModule(train_shards=str(tmp_path / "nowhere" / "train-*.tar"))
    with pytest.raises(FileNotFoundError, match=r"data\.train_shards=.*nowhere/train-\*\.tar"):
        dm.setup("fit")
    dm = WebDataModule(train_shards=str(tmp_path / "train-{000000..000003}.tar"))
    with pytest.raises(FileNotFoundError, match=r"data\.train_shards.*train-000000\.tar"):
        dm.setup("fit")
    with pytest.raises(configs.ConfigError, match="data.train_shards is required"):
        WebDataModule()


def _run(dm: WebDataModule, epochs: int, stop_after: int | None = None) -> list[tuple[list[str], torch.Tensor]]:
    """Batches of `epochs` train epochs, stopping after `stop_after` batches in all."""
    out = []
    for _ in range(epochs):
        for batch in dm.train_dataloader():
            out.append((batch["key"], batch["image"]))
            if stop_after is not None and len(out) == stop_after:
                return out
    return out


@pytest.mark.parametrize("stop_after", [5, 12, 17])  # mid epoch 0 (odd: roles rotate), end of epoch 0, mid epoch 1
def test_resume_is_exact(shapes_shards: Path, stop_after: int):
    opts = {"num_workers": 2, "batch_size": 4, "shuffle_buffer": 8, "random_crop": True, "hflip": True,
            "resolution": 24, "train_shards": str(shapes_shards / "train-00000[0-2].tar")}  # 48 samples, 12 batches
    full = _run(make_dm(shapes_shards, **opts), epochs=2)
    assert len(full) == 24
    epoch0, epoch1 = {k for ks, _ in full[:12] for k in ks}, {k for ks, _ in full[12:] for k in ks}
    assert epoch0 == epoch1 and len(epoch0) == 48, "each epoch reads every sample once"
    assert [ks for ks, _ in full[:12]] != [ks for ks, _ in full[12:]], "the order changes with the epoch"
    slot = lambda batches: {k for ks, _ in batches[::2] for k in ks}  # noqa: E731 -- one worker's (they alternate)
    assert slot(full[:12]) != slot(full[12:]), "each slot reads other samples in each epoch (shards reshuffled)"

    interrupted = make_dm(shapes_shards, **opts)
    head = _run(interrupted, epochs=2, stop_after=stop_after)
    state = interrupted.state_dict()
    assert state["epoch"] * 12 + state["batches"] == stop_after  # (0, 12) at the end of epoch 0
    resumed = make_dm(shapes_shards, **opts)
    resumed.load_state_dict(state)
    tail = []
    while len(head) + len(tail) < len(full):
        tail.extend(_run(resumed, epochs=1))
    for (keys, images), (want_keys, want_images) in zip(head + tail, full, strict=True):
        assert keys == want_keys
        assert torch.equal(images, want_images)


def test_data_seed_and_the_epoch_draw_the_flips(shapes_shards: Path):
    """Flips come from (data.seed, epoch, shard, key): another seed flips other images, and so does the next epoch
    (with the seed or the epoch left out of the draw, every seed or every epoch flipped the same ones)."""
    def images(seed: int, epochs: int = 1) -> list[dict[str, torch.Tensor]]:
        dm = make_dm(shapes_shards, seed=seed, hflip=True, random_crop=False, resolution=16, batch_size=4,
                     train_shards=str(shapes_shards / "train-000000.tar"))
        return [{k: image for keys, batch in _run(dm, epochs=1) for k, image in zip(keys, batch)}
                for _ in range(epochs)]

    (first, next_epoch), (second,), (again,) = images(0, epochs=2), images(1), images(0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    for other in (second, next_epoch):
        assert other.keys() == first.keys()
        flipped = [k for k in first if not torch.equal(first[k], other[k])]
        assert 0 < len(flipped) < len(first)
        assert all(torch.equal(first[k], other[k].flip(-1)) for k in flipped)


def test_one_slot_reads_one_shard_in_another_order_each_epoch(shapes_shards: Path):
    """The shuffle buffer is seeded per epoch: with one shard and one slot, where no reassignment of shards can change
    the order, each epoch still reads its samples in another order."""
    dm = make_dm(shapes_shards, num_workers=0, batch_size=4, shuffle_buffer=8,
                 train_shards=str(shapes_shards / "train-000000.tar"))
    epochs = [[k for ks, _ in _run(dm, epochs=1) for k in ks] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    # data.seed draws the order too: within the shard, and the shards' assignment to the loader's slots
    other = make_dm(shapes_shards, num_workers=0, batch_size=4, shuffle_buffer=8, seed=1,
                    train_shards=str(shapes_shards / "train-000000.tar"))
    reordered = [k for ks, _ in _run(other, epochs=1) for k in ks]
    assert sorted(reordered) == sorted(epochs[0]) and reordered != epochs[0]
    from ldm.data.stream import EpochPlan

    def segments(seed: int) -> tuple:
        return tuple(EpochPlan([f"s{i}" for i in range(6)], [10] * 6, seed=seed, rank=0, world_size=1,
                               num_workers=2, batch_size=2, train=True, resolution=8).segments(0))

    assert len({segments(seed) for seed in range(4)}) > 1


def test_resume_under_another_data_order_is_refused_mid_epoch(shapes_shards: Path):
    """A checkpoint 5 batches into an epoch read with 2 workers: 3 workers (or another shuffle buffer) would repeat
    some samples and miss others, so the resume is refused unless allowed. One at the end of an epoch starts the next
    under any settings, also when they make epochs longer; 1 -> 0 workers (one slot per rank either way) continues
    exactly."""
    opts = {"batch_size": 4, "shuffle_buffer": 8, "train_shards": str(shapes_shards / "train-00000[0-2].tar")}
    interrupted = make_dm(shapes_shards, num_workers=2, **opts)
    _run(interrupted, epochs=1, stop_after=5)
    state = interrupted.state_dict()
    resumed = make_dm(shapes_shards, num_workers=3, **opts)
    resumed.load_state_dict(state)
    with pytest.raises(configs.ConfigError, match=r"5 batches into epoch 0 .*data\.num_workers \(at least 1\) 2 -> 3"
                                                  r".*data\.allow_inexact_resume=true"):
        next(iter(resumed.train_dataloader()))
    reshuffled = make_dm(shapes_shards, num_workers=2, **{**opts, "shuffle_buffer": 50})
    reshuffled.load_state_dict(state)
    with pytest.raises(configs.ConfigError, match=r"data\.shuffle_buffer 8 -> 50"):
        next(iter(reshuffled.train_dataloader()))
    # the state of older ldm held no shuffle_buffer: it is taken from the run config the checkpoint records (the
    # resume went on unsaid)
    older = {k: v for k, v in state.items() if k != "shuffle_buffer"}
    reshuffled = make_dm(shapes_shards, num_workers=2, **{**opts, "shuffle_buffer": 50})
    recorded = {"ldm": {"config": {"data": {**opts, "num_workers": 2, "seed": 0}}}}
    reshuffled.check_resume(recorded, 1)
    reshuffled.load_state_dict(older)
    with pytest.raises(configs.ConfigError, match=r"data\.shuffle_buffer 8 -> 50"):
        next(iter(reshuffled.train_dataloader()))
    # ldm-train asks before it writes the run's config.yaml and logs (the refusal at the first batch came after them,
    # and they recorded the refused settings), for the new state and the older alike, and for the state of e51d6de,
    # which held neither shuffle_buffer nor the epoch's length (epoch_batches)
    oldest = {k: v for k, v in older.items() if k != "epoch_batches"}
    for saved in (state, older, oldest):
        with pytest.raises(configs.ConfigError, match=r"5 batches into epoch 0 .*data\.shuffle_buffer 8 -> 50"):
            make_dm(shapes_shards, num_workers=2, **{**opts, "shuffle_buffer": 50}).check_resume(
                {**recorded, "WebDataModule": saved}, 1)
    with pytest.raises(configs.ConfigError, match=r"world size \(devices x nodes\) 1 -> 2"):
        make_dm(shapes_shards, num_workers=2, **opts).check_resume({**recorded, "WebDataModule": state}, 2)
    make_dm(shapes_shards, num_workers=2, **opts).check_resume({**recorded, "WebDataModule": state}, 1)  # the same
    # shards added to the set (one still downloading): the epoch's order changes; refused as the settings are
    grown = make_dm(shapes_shards, num_workers=2, **{**opts, "train_shards": str(shapes_shards / "train-*.tar")})
    grown.load_state_dict(state)
    with pytest.raises(configs.ConfigError, match=r"the training shards \(data\.train_shards: their names, sample "
                                                  r"counts and order\) 3 shards of 48 samples \([0-9a-f]{8}\) -> 4 "
                                                  r"shards of 64 samples \([0-9a-f]{8}\)"):
        next(iter(grown.train_dataloader()))
    # the same shards listed in another order: another epoch order, which the message names as a possible cause
    listed = [str(shapes_shards / f"train-00000{i}.tar") for i in (1, 0, 2)]
    reordered = make_dm(shapes_shards, num_workers=2, **{**opts, "train_shards": listed})
    reordered.load_state_dict(state)
    with pytest.raises(configs.ConfigError, match=r"counts and order\) 3 shards of 48 samples \([0-9a-f]{8}\) -> 3"):
        next(iter(reordered.train_dataloader()))
    allowed = make_dm(shapes_shards, num_workers=3, allow_inexact_resume=True, **opts)
    allowed.load_state_dict(state)
    with pytest.warns(UserWarning, match="repeats some samples"):
        assert len(_run(allowed, epochs=1)) == 12 - 5

    later = make_dm(shapes_shards, num_workers=2, **opts)  # 7 of 12 batches: past the end of a batch-8 epoch (6)
    _run(later, epochs=1, stop_after=7)
    larger = make_dm(shapes_shards, num_workers=2, **{**opts, "batch_size": 8})
    larger.load_state_dict(later.state_dict())
    with pytest.raises(configs.ConfigError, match=r"7 batches into epoch 0 .*data\.batch_size 4 -> 8"):
        next(iter(larger.train_dataloader()))
    larger = make_dm(shapes_shards, num_workers=2, allow_inexact_resume=True, **{**opts, "batch_size": 8})
    larger.load_state_dict(later.state_dict())
    with pytest.warns(UserWarning, match="past the end of an epoch under the new data order .* epoch 0 runs again"):
        assert len(_run(larger, epochs=1)) == 6 and larger.state_dict()["epoch"] == 0, "allowed: epoch 0 again"

    ended = make_dm(shapes_shards, num_workers=2, **opts)  # a checkpoint at the end of epoch 0 (12 batches)
    _run(ended, epochs=1)
    longer = make_dm(shapes_shards, num_workers=2, **{**opts, "batch_size": 2})  # 24 batches per epoch
    longer.load_state_dict(ended.state_dict())
    with pytest.warns(UserWarning, match="ended epoch 0 after 12 batches; .* Lightning counts the next one from batch "
                                         "12: it trains 12 batches of epoch 1"):
        assert len(_run(longer, epochs=1)) == 24 and longer.state_dict()["epoch"] == 1, "epoch 1 from its start"
    # the same for an older state that records no epoch length: its end is this run's (12), as the first batch says
    ended_oldest = {k: v for k, v in ended.state_dict().items() if k not in ("shuffle_buffer", "epoch_batches")}
    make_dm(shapes_shards, num_workers=2, **{**opts, "shuffle_buffer": 50}).check_resume(
        {**recorded, "WebDataModule": ended_oldest}, 1)

    one = make_dm(shapes_shards, num_workers=1, **opts)
    full = _run(one, epochs=1)
    one = make_dm(shapes_shards, num_workers=1, **opts)
    head = _run(one, epochs=1, stop_after=5)
    zero = make_dm(shapes_shards, num_workers=0, **opts)
    zero.load_state_dict(one.state_dict())
    assert [keys for keys, _ in head + _run(zero, epochs=1)] == [keys for keys, _ in full]


@pytest.mark.parametrize("world, workers", [(1, 3), (3, 2)])
def test_validation_reads_every_sample_once(shapes_shards: Path, monkeypatch: pytest.MonkeyPatch, world: int,
                                            workers: int):
    """16 validation samples: one process with 3 workers evaluates all 16; 3 ranks x 2 workers all but 16 mod 3,
    with the same number of batches on every rank."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    keys, lengths = [], []
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        loader = make_dm(shapes_shards, batch_size=2, num_workers=workers).val_dataloader()
        batches = [b["key"] for b in loader]
        assert len(batches) == len(loader)
        lengths.append(len(batches))
        keys.extend(k for batch in batches for k in batch)
    assert len(keys) == len(set(keys)) == 16 - 16 % world
    assert len(set(lengths)) == 1, "equal batch counts on every rank"


def test_fewer_shards_than_slots(shapes_shards: Path, monkeypatch: pytest.MonkeyPatch):
    """One 16-sample shard over 3 ranks x 2 workers: each slot reads its own part of the shard, none twice."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    per_rank = []
    for rank in range(3):
        monkeypatch.setenv("RANK", str(rank))  # no trainer, no process group: the environment names the rank
        dm = make_dm(shapes_shards, train_shards=str(shapes_shards / "val-000000.tar"), batch_size=2, num_workers=2)
        loader = dm.train_dataloader()
        per_rank.append([b["key"] for b in loader])
        assert len(per_rank[-1]) == len(loader) == 2  # 16 // 6 = 2 samples per slot: one batch per worker
    keys = [k for batches in per_rank for batch in batches for k in batch]
    assert len(keys) == len(set(keys)) == 12, "16 - 16 mod 6 samples, each read once"


def test_cache_in_memory_serves_later_epochs_without_the_tars(shapes_shards: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """data.cache_in_memory: the same batches epoch after epoch (flips included), read from memory after the first."""
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        (tmp_path / name).write_bytes((shapes_shards / name).read_bytes())
    opts = {"train_shards": str(tmp_path / "train-*.tar"), "val_shards": None, "batch_size": 4, "shuffle_buffer": 8,
            "hflip": True}

    def epochs(loader, n: int) -> list[tuple[list[str], torch.Tensor]]:
        return [(b["key"], b["image"]) for _ in range(n) for b in loader]

    want = epochs(make_dm(shapes_shards, **opts).train_dataloader(), 2)
    dm = make_dm(shapes_shards, cache_in_memory=True, **opts)
    loader = dm.train_dataloader()
    got = epochs(loader, 1)
    for shard in tmp_path.glob("train-*.tar"):
        shard.write_bytes(b"")  # read again, a shard would now yield nothing and be reported as damaged
    got += epochs(loader, 1)
    assert dm.num_skipped == 0 and len(got) == len(want) == 24
    for (keys, images), (want_keys, want_images) in zip(got, want, strict=True):
        assert keys == want_keys and torch.equal(images, want_images)

    # Two ranks: a rank reads parts of shards, other parts in the next epoch (the shard order changes).
    monkeypatch.setenv("WORLD_SIZE", "2")
    opts["train_shards"] = str(shapes_shards / "train-*.tar")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        plain = epochs(make_dm(shapes_shards, **opts).train_dataloader(), 3)
        cached = epochs(make_dm(shapes_shards, cache_in_memory=True, **opts).train_dataloader(), 3)
        assert [k for k, _ in cached] == [k for k, _ in plain]
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(cached, plain, strict=True))

    with pytest.raises(configs.ConfigError, match=r"data.cache_in_memory=true .* set data.num_workers=0"):
        make_dm(shapes_shards, cache_in_memory=True, num_workers=1)

    # A validation that stops after 2 batches (trainer.limit_val_batches, as the quickstart's): what it read is kept
    # too (the whole shard's read had to finish before anything was kept, so every validation parsed the tar again).
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    (tmp_path / "val-000000.tar").write_bytes((shapes_shards / "val-000000.tar").read_bytes())
    dm = make_dm(shapes_shards, val_shards=str(tmp_path / "val-000000.tar"), batch_size=2, cache_in_memory=True)
    loader = dm.val_dataloader()

    def first_two() -> list[list[str]]:
        batches = iter(loader)
        return [next(batches)["key"] for _ in range(2)]

    first = first_two()
    (tmp_path / "val-000000.tar").write_bytes(b"")
    assert first_two() == first and dm.num_skipped == 0


def test_workers_started_by_spawn_begin_ignoring_stop_signals():
    """A spawned loader worker (macOS's start method) imports torch for seconds before its worker_init_fn ignores stop
    signals: a Ctrl-C to the process group then killed it, and the run ended unsaved ("DataLoader worker exited
    unexpectedly"). A process spawned inside `_stop_signals_ignored` ignores them from its start, and this process's
    handlers are put back after."""
    spawn = multiprocessing.get_context("spawn")
    before = [signal.getsignal(s) for s in STOP_SIGNALS]
    children = []
    for signum in STOP_SIGNALS:
        with _stop_signals_ignored():
            children.append(spawn.Process(target=time.sleep, args=(1.5,)))
            children[-1].start()
        os.kill(children[-1].pid, signum)  # while it starts (imports)
    for child in children:
        child.join(30)
        assert child.exitcode == 0
    assert [signal.getsignal(s) for s in STOP_SIGNALS] == before
    unprotected = spawn.Process(target=time.sleep, args=(1.5,))  # (the test would see the difference)
    unprotected.start()
    os.kill(unprotected.pid, signal.SIGTERM)
    unprotected.join(30)
    assert unprotected.exitcode != 0


def test_a_script_that_exits_holding_a_loader_iterator_ends(shapes_shards: Path):
    """Workers leave stop signals to a Trainer only when a Trainer iterates their loader: a script that exited while
    holding an iterator of a loader with workers hung forever (multiprocessing's exit handler sends one SIGTERM,
    which the workers ignored, and then waits for them)."""
    script = ("import lightning as L\n"
              "from ldm.data.datamodule import WebDataModule\n"
              f"dm = WebDataModule(train_shards={str(shapes_shards / 'train-*.tar')!r}, batch_size=4, num_workers=1)\n"
              "dm.setup('fit')\n"
              "if AFTER_FIT:\n"  # a finished fit leaves the datamodule's trainer set
              "    import torch\n"
              "    from torch import nn\n"
              "    class Probe(L.LightningModule):\n"
              "        def __init__(self):\n"
              "            super().__init__()\n"
              "            self.w = nn.Parameter(torch.zeros(1))\n"
              "        def training_step(self, batch, batch_idx):\n"
              "            return (self.w * batch['image'].mean()).sum()\n"
              "        def configure_optimizers(self):\n"
              "            return torch.optim.SGD(self.parameters(), lr=0.1)\n"
              "    L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,\n"
              "              enable_model_summary=False).fit(Probe(), datamodule=dm)\n"
              "it = iter(dm.train_dataloader())\n"
              "print('batch of', len(next(it)['image']), flush=True)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    for after_fit in (False, True):
        result = subprocess.run([sys.executable, "-c", f"AFTER_FIT = {after_fit}\n{script}"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and "batch of 4" in result.stdout, result.stderr[-2000:]
