"""Odd and damaged data: every Pillow mode becomes the right 8-bit RGB, missing captions are counted, damaged or
over-counted shards are named and never starve a data slot, skipped samples are a logged metric, and `ldm-data
source=folder` leaves out (and lists) what it cannot read instead of stopping."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import os
import shutil
import tarfile
import zlib
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.cli.data import write_dataset
from ldm.config import ConfigError
from ldm.data import encoding
from ldm.data.datamodule import WebDataModule, _count_tar_samples, shard_counts
from ldm.data.stream import EpochPlan, ShardStream
from ldm.images import ALPHA_BACKGROUND, decode_image, to_rgb
from ldm.loggers import AppendingCSVLogger

WHITE = np.array(ALPHA_BACKGROUND)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def rgb(image: Image.Image) -> np.ndarray:
    out = to_rgb(image)
    assert out.mode == "RGB"
    return np.asarray(out).astype(int)  # (H, W, 3)


# ----------------------------------------------------------------------------------------------------------------------
# Pillow modes.


def test_sixteen_bit_greys_are_scaled_not_clipped():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # -> 0, 1, 128, 255
    want = np.array([0, 1, 128, 255])
    little = Image.fromarray(values)                                  # I;16
    big = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    wide = Image.fromarray(values.astype(np.int32))                   # I (how older Pillows open 16-bit PNGs)
    for image in (little, big, wide):
        assert rgb(image)[0, :, 0].tolist() == want.tolist(), image.mode
        assert (rgb(image)[..., 0] == rgb(image)[..., 2]).all()
    from_png = decode_image(png_bytes(little))  # a real 16-bit PNG file
    assert Image.open(io.BytesIO(png_bytes(little))).mode == "I;16"
    assert np.asarray(from_png)[0, :, 1].tolist() == want.tolist()
    # every 16-bit value rounds to the nearest 8-bit one, and I's values outside [0, 65535] clip
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    assert (rgb(Image.fromarray(every))[..., 0] == np.clip(np.rint(every / 257.0), 0, 255)).all()
    assert rgb(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)))[0, :, 0].tolist() == [0, 255]


def test_a_sixteen_bit_rgb_colour_key_matches_the_exact_samples():
    """Pillow decodes a 16-bit RGB PNG to the samples' high bytes but keeps its tRNS key in 16-bit units: the 8-bit
    pixels were compared with the 16-bit key, so the keyed pixel stayed opaque and an opaque one whose 8-bit value
    equalled the key's numbers turned white (and compared at 8 bits, dark pixels near the key turned white)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    # keyed: only the exact 16-bit samples (a pixel one low byte off, or black, stays opaque)
    pixels, key = [(0, 0, 51400), (0, 0, 200), (65535, 0, 0), (0, 0, 201), (0, 0, 0)], (0, 0, 200)
    rows = b"\x00" + b"".join(struct.pack(">HHH", *p) for p in pixels)
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 1, 16, 2, 0, 0, 0))
            + chunk(b"tRNS", struct.pack(">HHH", *key)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    assert np.asarray(decode_image(data)).tolist() == [[[0, 0, 200], WHITE.tolist(), [255, 0, 0], [0, 0, 0],
                                                         [0, 0, 0]]]


def test_float_greys_in_unit_range_and_in_byte_range():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert rgb(unit)[0, :, 0].tolist() == [0, 128, 255]
    byte = Image.fromarray(np.array([[0.0, 100.0, 300.0]], dtype=np.float32))
    assert rgb(byte)[0, :, 0].tolist() == [0, 100, 255]


def test_transparency_is_composited_on_white():
    rgba = Image.fromarray(np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8))
    out = rgb(rgba)[0]
    assert out[0].tolist() == [255, 0, 0] and out[1].tolist() == WHITE.tolist()
    assert out[2].tolist() == [127, 127, 255]  # half blue over white
    la = Image.fromarray(np.array([[[10, 255], [10, 0]]], dtype=np.uint8), "LA")
    assert rgb(la)[0].tolist() == [[10, 10, 10], WHITE.tolist()]
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 200, 0, 9, 9, 9])
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 1  # index 1 is transparent
    assert rgb(palette)[0].tolist() == [[0, 200, 0], WHITE.tolist()]
    through_png = decode_image(png_bytes(palette))  # tRNS chunk written and read back
    assert np.asarray(through_png)[0].tolist() == [[0, 200, 0], WHITE.tolist()]
    key = Image.new("L", (1, 1), 7)
    key.info["transparency"] = 7  # a colour key
    assert rgb(key)[0].tolist() == [WHITE.tolist()]
    premultiplied = rgba.convert("RGBa")
    assert np.abs(rgb(premultiplied)[0] - out).max() <= 2
    assert np.abs(rgb(premultiplied.convert("RGBA").convert("LA").convert("La"))[0, 1] - WHITE).max() <= 2


def test_postscript_in_an_image_file_is_refused_without_running_ghostscript(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    """EPS bytes under an image name were opened by Pillow's EPS plugin, which runs Ghostscript on them (here a
    stand-in `gs` that leaves a mark): the shard reader and ldm-data open the image formats they list only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
    assert Image.open(io.BytesIO(eps)).format == "EPS"  # what Pillow itself would take it for
    with pytest.raises(Image.UnidentifiedImageError):
        decode_image(eps)
    src = tmp_path / "in"
    src.mkdir()
    Image.new("RGB", (8, 8)).save(src / "a.png")
    (src / "b.png").write_bytes(eps)
    summary = write_dataset({"source": "folder", "input_dir": str(src), "output_dir": str(tmp_path / "out"),
                             "val_samples": 0, "resolution": 8, "allow_missing_captions": True})
    assert [entry["path"] for entry in summary["skipped"]] == ["b.png"]
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "CMYK", "YCbCr", "HSV", "LAB"])
def test_other_modes_convert_as_pillow_does(mode: str):
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8))
    image = Image.new("LAB", (5, 4), (50, 128, 128)) if mode == "LAB" else source.convert(mode)
    assert image.mode == mode
    assert np.array_equal(rgb(image), np.asarray(image.convert("RGB")).astype(int))


# ----------------------------------------------------------------------------------------------------------------------
# The loader.


def write_shard(path: Path, samples: list[dict]) -> Path:
    with wds.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return path


def test_loader_decodes_16_bit_and_alpha_and_counts_missing_captions(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture):
    grey16 = Image.fromarray(np.full((8, 8), 32896, np.uint16))                        # mid grey in 16 bits
    clear = Image.fromarray(np.zeros((8, 8, 4), np.uint8))                             # fully transparent
    samples = [{"__key__": "grey16", "png": png_bytes(grey16), "txt": "grey"},
               {"__key__": "clear", "png": png_bytes(clear)},                           # no caption
               {"__key__": "clear2", "png": png_bytes(clear)},                          # no caption
               {"__key__": "plain", "png": png_bytes(Image.new("RGB", (8, 8), (0, 0, 0))), "txt": "black"}]
    shard = write_shard(tmp_path / "odd-000000.tar", samples)
    dm = WebDataModule(train_shards=str(shard), batch_size=4, num_workers=0, resolution=8)
    dm.setup("fit")
    with caplog.at_level("WARNING", logger="ldm.data.datamodule"):
        (batch,) = list(dm.train_dataloader())
    pixels = {key: ((image + 1) * 127.5).round() for key, image in zip(batch["key"], batch["image"])}
    assert (pixels["grey16"] == 128).all(), "16-bit mid grey stays mid grey (Pillow's convert gives 255)"
    assert (pixels["clear"] == 255).all(), "transparent pixels show the white background"
    assert dict(zip(batch["key"], batch["caption"]))["clear"] == ""
    assert dm.uncaptioned == {str(shard): 2} and dm.num_skipped == 0
    warnings = [r for r in caplog.records if "has no caption" in r.getMessage()]
    assert len(warnings) == 1 and "odd-000000.tar" in warnings[0].getMessage(), "warned once per shard"


def shapes_like(tmp_path: Path, name: str, n: int) -> list[dict]:
    return [{"__key__": f"{name}{i:03d}", "png": png_bytes(Image.new("RGB", (8, 8), (i, i, i))), "txt": f"s{i}"}
            for i in range(n)]


def kept_samples(shard: Path) -> int:
    """The samples of a tar cut short that the reader keeps: all that webdataset reads but the last, which may lack
    members (its caption gone, it trained with the empty caption)."""
    return sum(1 for _ in wds.WebDataset(str(shard), handler=wds.ignore_and_continue, shardshuffle=False)) - 1


def test_truncated_over_counted_shard_is_named_and_every_slot_still_reads(tmp_path: Path):
    """summary.json says 8 + 8 samples; the second shard is cut after about 2 of them. With 4 slots (4 ranks), slot 3's
    whole range lies past the real end: it reads other samples instead of failing, and the shard is named."""
    good = write_shard(tmp_path / "train-000000.tar", shapes_like(tmp_path, "a", 8))
    whole = write_shard(tmp_path / "full.tar", shapes_like(tmp_path, "b", 8)).read_bytes()
    cut = tmp_path / "train-000001.tar"
    cut.write_bytes(whole[: len(whole) // 4 + 100])
    (tmp_path / "full.tar").unlink()
    summary = {"splits": {"train": {"shards": [good.name, cut.name], "shard_counts": [8, 8], "count": 16}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    urls = [str(good), str(cut)]
    for rank in range(4):
        plan = EpochPlan(urls, [8, 8], seed=0, rank=rank, world_size=4, num_workers=0, batch_size=2, train=False,
                         resolution=8)
        stream = ShardStream(plan)
        batches = list(stream)
        assert len(batches) == len(stream) == 2, f"rank {rank} yields its full share"
        reports = [(key, reason, n) for b in batches for url, key, reason, n in b["__skipped__"] if url == str(cut)]
        segment = plan.segments(rank)[0]
        if segment[0] == str(cut):  # one report for the samples its range lost, counted
            (key, reason, lost), = reports
            first, last = (int(v) for v in key.removeprefix("samples ").split("-"))
            assert "damaged tar" in reason and last == segment[2] - 1 and lost == last - first + 1 >= 1, rank

    # Two ranks: the cut shard's rank filled its 8 with its 2 readable samples, each 4 times; what one more pass of its
    # range cannot make up comes from the other shards
    for rank in range(2):
        plan = EpochPlan(urls, [8, 8], seed=0, rank=rank, world_size=2, num_workers=0, batch_size=2, train=False,
                         resolution=8)
        keys = [key for batch in ShardStream(plan) for key in batch["key"]]
        assert len(keys) == 8 and max(map(keys.count, keys)) == 1, (rank, keys)

    # Every lost sample counted once over the ranks, also when the damaged shard comes first, so that a slot reading
    # the other shards instead passes it on the way (cut inside a member: one report, not the tar error besides).
    readable = kept_samples(cut)
    counted = 0
    for rank in range(4):
        plan = EpochPlan([str(cut), str(good)], [8, 8], seed=0, rank=rank, world_size=4, num_workers=0, batch_size=2,
                         train=False, resolution=8)
        counted += sum(n for b in ShardStream(plan) for _, _, _, n in b["__skipped__"])
    assert 0 < readable < 8 and counted == 8 - readable


def test_a_slot_topping_up_names_the_shard_whose_samples_it_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """The batches report (and drop) their skip records as they go; the top-up warning read those records after
    that and said "no shard reported an error" right after five corrupt samples of its one shard."""
    samples = shapes_like(tmp_path, "a", 9)
    for sample in samples[:5]:
        sample["png"] = b"not an image"
    shard = write_shard(tmp_path / "train-000000.tar", samples)
    plan = EpochPlan([str(shard)], [9], seed=0, rank=0, world_size=1, num_workers=0, batch_size=1, train=False,
                     resolution=8)
    with caplog.at_level("WARNING"):
        batches = list(ShardStream(plan))
    assert len(batches) == 9 and sum(n for b in batches for *_, n in b["__skipped__"]) == 5
    message = next(r.getMessage() for r in caplog.records if "its range gave 4 of 9" in r.getMessage())
    assert f"({shard})" in message, message


def test_a_truncated_shard_is_counted_over_the_first_epoch_only(tmp_path: Path):
    """One shard that summary.json counts as 20 samples holds fewer; 3 workers' ranges start at a new position each
    epoch: the samples it lost are counted in the first epoch, not again in every later one, and every report names
    where the shard really ends."""
    whole = write_shard(tmp_path / "full.tar", shapes_like(tmp_path, "c", 20)).read_bytes()
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(whole[: len(whole) * 3 // 5])
    (tmp_path / "full.tar").unlink()
    readable = kept_samples(cut)
    summary = {"splits": {"train": {"shards": [cut.name], "shard_counts": [20], "count": 20}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    dm = WebDataModule(train_shards=str(cut), batch_size=2, num_workers=3, resolution=8, shuffle_buffer=4)
    dm.setup("fit")
    loader, counts = dm.train_dataloader(), []
    for _ in range(4):
        assert len(list(loader)) == len(loader)
        counts.append(dm.num_skipped)
    assert 0 < counts[0] <= 20 - readable and counts == [counts[0]] * 4, counts
    assert all(f"the shard ends after {readable} whole samples" in reason for _, _, reason in dm.skipped)
    # a new loader of the split (trainer.reload_dataloaders_every_n_epochs builds one each epoch) counted them again
    assert len(list(dm.train_dataloader())) and dm.num_skipped == counts[0]
    dm = WebDataModule(train_shards=str(cut), val_shards=str(cut), batch_size=2, num_workers=0, resolution=8)
    dm.setup("fit")
    list(dm.val_dataloader())
    once = dm.num_skipped
    list(dm.val_dataloader())
    assert once > 0 and dm.num_skipped == once


def test_a_shard_cut_at_a_member_boundary_loses_the_sample_cut_short(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Cut where sample 3's caption begins (an interrupted copy ends at a 512-byte boundary): sample 3 kept its image
    and trained with the empty caption, reported only as uncaptioned; without summary.json nothing was reported."""
    whole = write_shard(tmp_path / "full.tar", shapes_like(tmp_path, "d", 8))
    with tarfile.open(whole) as tar:
        offset = next(member.offset for member in tar if member.name == "d003.txt")
    cut = tmp_path / "train-000000.tar"
    cut.write_bytes(whole.read_bytes()[:offset])
    whole.unlink()
    for recorded in (True, False):
        if recorded:
            summary = {"splits": {"train": {"shards": [cut.name], "shard_counts": [8], "count": 8}}}
            (tmp_path / "summary.json").write_text(json.dumps(summary))
        else:
            (tmp_path / "summary.json").unlink()
        dm = WebDataModule(train_shards=str(cut), batch_size=1, num_workers=0, resolution=8)
        dm.setup("fit")
        with caplog.at_level("WARNING"):
            keys = {key for batch in dm.train_dataloader() for key in batch["key"]}
        assert "d003" not in keys and keys <= {"d000", "d001", "d002"} and dm.uncaptioned == {}, recorded
        if recorded:  # samples 3-7 lost: 4-7 missing, 3 cut short
            ((_, key, reason),) = dm.skipped
            assert key == "samples 3-7" and dm.num_skipped == 5
            assert "ends after 3 whole samples and a sample perhaps cut short (the tar ends early: cut short, or a " \
                   "damaged member header)" in reason
        else:  # the header scan counts the 3 whole samples, naming the damage
            assert "members stop before its end (cut short, or a damaged member header: what follows is lost), so " \
                   "its last sample (d003) may be cut short" in caplog.text
    # two ranks, rank 0's range ending at the sample cut short (it did not see the shard end there, and trained it)
    keys = []
    for rank in range(2):
        plan = EpochPlan([str(cut)], [8], seed=0, rank=rank, world_size=2, num_workers=0, batch_size=1, train=False,
                         resolution=8)
        keys += [key for batch in ShardStream(plan) for key in batch["key"]]
    assert "d003" not in keys

    # a damaged member header inside (bit rot, a bad copy): tarfile read it as the archive's end, the samples after it
    # were lost unreported, and the one it cut trained with an empty caption
    whole = write_shard(tmp_path / "rot-000000.tar", shapes_like(tmp_path, "r", 8))
    with tarfile.open(whole) as tar:
        offset = next(member.offset for member in tar if member.name == "r003.txt")
    data = bytearray(whole.read_bytes())
    data[offset + 148:offset + 156] = b"garbage!"  # the header's checksum
    whole.write_bytes(bytes(data))
    dm = WebDataModule(train_shards=str(whole), batch_size=1, num_workers=0, resolution=8)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
        keys = {key for batch in dm.train_dataloader() for key in batch["key"]}
    assert keys == {"r000", "r001", "r002"} and dm.uncaptioned == {}
    assert f"shard {whole} is damaged (its members stop before its end" in caplog.text
    # ... also with a count that says 8 (summary.json): the read ends early, the sample it ends with is left out
    summary = {"splits": {"train": {"shards": [whole.name], "shard_counts": [8], "count": 8}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    dm = WebDataModule(train_shards=str(whole), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    assert {key for batch in dm.train_dataloader() for key in batch["key"]} <= {"r000", "r001", "r002"}
    ((_, key, reason),) = dm.skipped
    assert key == "samples 3-7" and "ends after 3 whole samples and a sample perhaps cut short" in reason
    (tmp_path / "summary.json").unlink()
    # ... and where a range ends right at the damage (rank 0 of 2 reads samples 0-3): it reads one past its end
    plan = EpochPlan([str(whole)], [8], seed=0, rank=0, world_size=2, num_workers=0, batch_size=1, train=False,
                     resolution=8)
    assert "r003" not in [key for batch in ShardStream(plan) for key in batch["key"]]

    # a compressed tar cut inside a caption: the error comes at the next header, after that sample was read (and
    # counted); the reader, the header count and ldm-encode's reader leave it out
    whole = write_shard(tmp_path / "gzfull.tar", shapes_like(tmp_path, "g", 8))
    with tarfile.open(whole) as tar:
        offset = next(member.offset_data for member in tar if member.name == "g005.txt") + 5
    gz = tmp_path / "gz-000000.tar.gz"
    gz.write_bytes(gzip.compress(whole.read_bytes()[:offset]))
    dm = WebDataModule(train_shards=str(gz), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    assert dm.train_counts == [5]
    assert {key for batch in dm.train_dataloader() for key in batch["key"]} == {f"g00{i}" for i in range(5)}
    assert dm.uncaptioned == {}
    skipped: list[list[str]] = []
    assert [sample["__key__"] for sample, _ in encoding._images(str(gz), 8, skipped)] == [f"g00{i}" for i in range(5)]
    assert skipped[-1][0] == "g005" and "ends early" in skipped[-1][1]

    # cut inside the first member of the last sample: the header count and the reader keep the same samples (the
    # count kept one more, and the reader repeated a sample to make up for it, reporting a damage)
    whole = write_shard(tmp_path / "full.tar", shapes_like(tmp_path, "f", 8))
    with tarfile.open(whole) as tar:
        offset = next(member.offset_data for member in tar if member.name == "f007.png") + 20
    inside = tmp_path / "inside-000000.tar"
    inside.write_bytes(whole.read_bytes()[:offset])
    whole.unlink()
    dm = WebDataModule(train_shards=str(inside), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    keys = [key for batch in dm.train_dataloader() for key in batch["key"]]
    assert sorted(keys) == [f"f00{i}" for i in range(7)]  # f006 whole: the cut is in the next sample's member
    ((_, key, reason),) = dm.skipped  # the damage, named once (no sample of the counted ones lost)
    assert key == "?" and reason.startswith("damaged tar (ReadError")

    # a whole tar whose last sample has no caption (as img2dataset writes some): kept, counted as uncaptioned
    uncaptioned = {"__key__": "e003", "png": png_bytes(Image.new("RGB", (8, 8)))}
    whole = write_shard(tmp_path / "whole-000000.tar", [*shapes_like(tmp_path, "e", 3), uncaptioned])
    dm = WebDataModule(train_shards=str(whole), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    assert {key for batch in dm.train_dataloader() for key in batch["key"]} == {"e000", "e001", "e002", "e003"}
    assert dm.uncaptioned == {str(whole): 1} and dm.num_skipped == 0


def test_a_whole_shard_counted_wrong_keeps_its_samples_and_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """img2dataset's NAME_stats.json out of date: an intact tar holding fewer samples than its count lost its last
    (whole) sample as if the tar were cut, with a fix naming summary.json; one holding more trained on part of it
    without a word."""
    fewer = write_shard(tmp_path / "00000.tar", shapes_like(tmp_path, "a", 6))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"successes": 8}))
    dm = WebDataModule(train_shards=str(fewer), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    keys = [key for batch in dm.train_dataloader() for key in batch["key"]]
    assert sorted(set(keys)) == [f"a00{i}" for i in range(6)], "all six, a005 included"
    ((_, key, reason),) = dm.skipped
    assert key == "samples 6-7" and "ends after 6 whole samples but its count says at least 8" in reason
    assert "img2dataset's NAME_stats.json" in reason
    more = write_shard(tmp_path / "00001.tar", shapes_like(tmp_path, "b", 6))
    (tmp_path / "00001_stats.json").write_text(json.dumps({"successes": 4}))
    warning = f"shard {more} holds more samples than its recorded count (4): the rest are never read"
    for num_workers in (0, 2):  # told by the worker that reads the shard's end, warned once by the main process
        dm = WebDataModule(train_shards=str(more), val_shards=str(more), batch_size=1, num_workers=num_workers,
                           resolution=8)
        dm.setup("fit")
        caplog.clear()
        with caplog.at_level("WARNING", logger="ldm.data.datamodule"):
            keys = [key for _ in range(3) for batch in dm.train_dataloader() for key in batch["key"]]
        assert sorted(keys) == sorted([f"b00{i}" for i in range(4)] * 3) and dm.num_skipped == 0  # the count rules
        assert caplog.text.count(warning) == 1, "once, not once per epoch"
        # validation too: its reader stops at the quota, at the shard's last sample (the warning came after it)
        dm = WebDataModule(train_shards=str(more), val_shards=str(more), batch_size=2, num_workers=num_workers,
                           resolution=8)
        dm.setup("fit")
        caplog.clear()
        with caplog.at_level("WARNING", logger="ldm.data.datamodule"):
            assert len(list(dm.val_dataloader())) == 2
        assert warning in caplog.text
    # a gzipped intact shard short of its count keeps its last sample as a plain one does
    gz = tmp_path / "00002.tar.gz"
    gz.write_bytes(gzip.compress(fewer.read_bytes()))
    plan = EpochPlan([str(gz)], [8], seed=0, rank=0, world_size=1, num_workers=0, batch_size=1, train=False,
                     resolution=8)
    batches = list(ShardStream(plan))
    assert sorted({key for batch in batches for key in batch["key"]}) == [f"a00{i}" for i in range(6)]
    ((_, key, reason, _),) = [record for batch in batches for record in batch["__skipped__"]]
    assert key == "samples 6-7" and "ends after 6 whole samples but" in reason


def test_remote_shards_short_of_the_samples_per_shard_hint_keep_their_last_sample(tmp_path: Path):
    """img2dataset's shards over HTTP / S3 hold fewer samples than data.samples_per_shard (failed downloads): each
    lost its real last sample at every epoch, reported as a damaged tar (a local one kept it). A remote tar cut inside
    a member still loses the sample cut short."""
    write_shard(tmp_path / "00000.tar", shapes_like(tmp_path, "a", 2))
    write_shard(tmp_path / "00001.tar", shapes_like(tmp_path, "b", 5))
    urls = f"pipe:cat {tmp_path}/00000.tar::pipe:cat {tmp_path}/00001.tar"
    dm = WebDataModule(train_shards=urls, val_shards=urls, batch_size=1, num_workers=0, resolution=8,
                       samples_per_shard=7)
    dm.setup("fit")
    every = ["a000", "a001", "b000", "b001", "b002", "b003", "b004"]
    loader = dm.train_dataloader()
    for _ in range(2):  # (the epoch plans 14 samples: the slot tops up with repeats, as for any shortfall)
        assert sorted({key for batch in loader for key in batch["key"]}) == every
    assert [reason.split(":")[0] for _, _, reason in dm.skipped] == ["damaged tar"] * 2  # (the counts, named)
    assert sorted({key for batch in dm.val_dataloader() for key in batch["key"]}) == every
    data = (tmp_path / "00001.tar").read_bytes()
    with tarfile.open(tmp_path / "00001.tar") as tar:
        cut_at = [member.offset_data for member in tar if member.name.startswith("b004")][0] + 10
    (tmp_path / "cut.tar").write_bytes(data[:cut_at])
    plan = EpochPlan([f"pipe:cat {tmp_path}/cut.tar"], [7], seed=0, rank=0, world_size=1, num_workers=0,
                     batch_size=1, train=False, resolution=8)
    assert sorted({key for batch in ShardStream(plan) for key in batch["key"]}) == [f"b00{i}" for i in range(4)]


def test_member_names_with_dots_are_named_as_the_cause(tmp_path: Path):
    """`img.0.png`, `img.0.txt`, `img.1.png`...: webdataset ends keys at the first dot, so the whole shard was one
    sample without an image, refused as a damaged shard."""
    shard = tmp_path / "dots-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(3):
            for ext, data in (("png", png_bytes(Image.new("RGB", (8, 8)))), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"img.{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    dm = WebDataModule(train_shards=str(shard), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    with pytest.raises(RuntimeError, match=r"member names with more than one dot \(img\.0\.png\) merge samples: "
                                           r"webdataset ends a key at the first dot; rename them"):
        list(dm.train_dataloader())


def test_every_reader_leaves_out_the_last_sample_of_a_tar_cut_at_a_member_boundary(tmp_path: Path,
                                                                                  caplog: pytest.LogCaptureFixture):
    """Cut where the last sample's caption begins, plain and inside an intact gzip stream (tar killed while piped
    into gzip): the gzipped one was counted whole and its last sample trained without its caption, and ldm-eval took
    it from either (a prompt "" beside its image)."""
    from ldm.eval.sources import shard_captions

    whole = write_shard(tmp_path / "full.tar", shapes_like(tmp_path, "h", 6))
    with tarfile.open(whole) as tar:
        offset = next(member.offset for member in tar if member.name == "h005.txt")
    plain = tmp_path / "val-000000.tar"
    plain.write_bytes(whole.read_bytes()[:offset])
    packed = tmp_path / "val-000001.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    for shard in (plain, packed):
        dm = WebDataModule(train_shards=str(shard), val_shards=str(shard), batch_size=1, num_workers=0,
                           resolution=8)
        with caplog.at_level("WARNING"):
            dm.setup("fit")
            assert dm.train_counts == [5], shard
            keys = [key for batch in dm.train_dataloader() for key in batch["key"]]
        assert sorted(keys) == [f"h00{i}" for i in range(5)] and dm.uncaptioned == {}, shard
        assert "holds more samples than its recorded count" not in caplog.text
        assert shard_captions([str(shard)]) == [f"s{i}" for i in range(5)], shard


def test_a_shard_cut_inside_its_first_member_counts_no_sample(tmp_path: Path):
    """It was counted as -1 sample: the epoch lost one sample of the good shard beside it (or, alone, a traceback
    from len())."""
    write_shard(tmp_path / "train-000000.tar", shapes_like(tmp_path, "g", 4))
    whole = write_shard(tmp_path / "whole.tar", shapes_like(tmp_path, "c", 4)).read_bytes()
    cut = tmp_path / "train-000001.tar"
    cut.write_bytes(whole[:1600])  # inside the first member's data
    (tmp_path / "whole.tar").unlink()
    dm = WebDataModule(train_shards=str(tmp_path), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    assert dm.train_counts == [4, 0]
    assert sorted(key for batch in dm.train_dataloader() for key in batch["key"]) == [f"g00{i}" for i in range(4)]


def test_every_reader_takes_the_whole_samples_wherever_a_tar_is_cut(tmp_path: Path):
    """Cut at every 97th byte, plain, as an intact gzip of the cut tar, and as a gzip stream cut short: the header
    count, training's reader, ldm-encode's and ldm-eval's take the same samples, every sample whose members all precede
    the cut, less at most the last of them where the cut is at a member boundary, in padding or in a header (it may
    lack members). A cut inside a sample's first member lost the whole sample before it (training and ldm-encode;
    ldm-eval kept it), and inside a gzip stream it was counted one sample more than training read (a sample repeated
    in each epoch, or a lone shard that "could not be read")."""
    from ldm.eval.sources import iter_shard_members

    rng = np.random.default_rng(0)
    samples = [{"__key__": f"k{i:03d}", "png": png_bytes(Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8))),
                "txt": f"s{i}"} for i in range(5)]
    whole = write_shard(tmp_path / "full.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        members = [(member.name.partition(".")[0], member.offset_data, member.offset_data + member.size)
                   for member in tar]
    firsts = {key: (start, end) for key, start, end in reversed(members)}  # each sample's first member

    def readers(shard: Path) -> list[list[str]]:
        count = _count_tar_samples(str(shard))
        plan = EpochPlan([str(shard)], [count], seed=0, rank=0, world_size=1, num_workers=0, batch_size=1,
                         train=False, resolution=8)
        trained = [key for batch in ShardStream(plan) for key in batch["key"]] if count else []
        encoded = [sample["__key__"] for sample, _ in encoding._images(str(shard), 8, [])]
        evaluated = [sample["__key__"] for sample in iter_shard_members([str(shard)])]
        assert len(trained) == count and trained == encoded == evaluated, (shard, count, trained, encoded, evaluated)
        return trained

    cuts, data_cuts = 0, 0
    for at in range(300, len(whole), 97):
        complete = sorted({key for key, _, _ in members} - {key for key, _, end in members if end > at})
        in_first = any(start < at < end for start, end in firsts.values())
        for shard, data in ((tmp_path / "train-000000.tar", whole[:at]),
                            (tmp_path / "train-000001.tar.gz", gzip.compress(whole[:at]))):
            shard.write_bytes(data)
            keys = readers(shard)
            assert keys == complete or (not in_first and keys == complete[:-1]), (shard, at, keys, complete)
            shard.unlink()
        cuts, data_cuts = cuts + 1, data_cuts + in_first
    assert cuts > 100 and data_cuts > 40  # the cuts inside first members are many (the images are the large members)
    packed = gzip.compress(whole)
    shard = tmp_path / "train-000002.tar.gz"
    for at in range(20, len(packed), 97):
        shard.write_bytes(packed[:at])
        keys = readers(shard)
        assert keys == [f"k{i:03d}" for i in range(len(keys))], (at, keys)
    shard.write_bytes(packed[:-12])  # cut in the zeros that end the archive: every sample is whole
    assert readers(shard) == [f"k{i:03d}" for i in range(5)]


def test_a_cut_that_no_read_error_reveals_is_found_by_every_reader(tmp_path: Path):
    """Three shards whose damage the reader cannot see as it reads, each with a recorded count (summary.json): a gzip
    of a tar cut where the last sample's caption begins (training took its image with the empty caption); a plain tar
    so cut after an image whose data ends in zeros (BMP rows, stored bottom-up: every reader took the zeros for the
    end-of-archive blocks); and an intact gzipped tar named .tar (read as a cut plain tar: its last sample lost, the
    shard called damaged)."""
    from ldm.eval.sources import iter_shard_members

    def bmp(i: int) -> bytes:
        pixels = np.full((32, 32, 3), 200, np.uint8)
        pixels[:16] = 0  # the top rows, which a BMP stores last (1.5 KiB of zeros)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="BMP")
        return buf.getvalue()

    samples = [{"__key__": f"k{i:03d}", "bmp": bmp(i), "txt": f"s{i}"} for i in range(4)]
    whole = write_shard(tmp_path / "full.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        caption = next(m.offset for m in tar if m.name == "k003.txt")
    assert not whole[caption - 1024:caption].strip(b"\0")  # the zeros that fooled the readers
    shards = {"cutgz-000000.tar.gz": (gzip.compress(whole[:caption]), 3),
              "zeros-000000.tar": (whole[:caption], 3),
              "named-000000.tar": (gzip.compress(whole), 4),
              # told by their content whatever the name (these names were not checked: training and ldm-encode took
              # the last image with the empty caption)
              "cutbz2-000000.tar.bz2": (bz2.compress(whole[:caption]), 3),
              "cutxz-000000.tar.xz": (lzma.compress(whole[:caption]), 3),
              "upper-000000.TAR": (whole[:caption], 3)}
    for name, (data, _) in shards.items():
        (tmp_path / name).write_bytes(data)
    summary = {"splits": {"train": {"shards": list(shards), "shard_counts": [4] * len(shards), "count": 12}}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    for name, (_, whole_samples) in shards.items():
        url, expected = str(tmp_path / name), [f"k{i:03d}" for i in range(whole_samples)]
        plan = EpochPlan([url], [4], seed=0, rank=0, world_size=1, num_workers=0, batch_size=1, train=False,
                         resolution=8)
        batches = list(ShardStream(plan))
        assert sorted({key for batch in batches for key in batch["key"]}) == expected, name
        assert all(caption for batch in batches for caption in batch["caption"]), name
        assert _count_tar_samples(url) == whole_samples, name
        assert [sample["__key__"] for sample, _ in encoding._images(url, 8, [])] == expected, name
        assert [sample["__key__"] for sample in iter_shard_members([url])] == expected, name


def test_a_damaged_byte_in_a_compressed_shard_is_damage_every_reader_survives(tmp_path: Path):
    """A byte flipped in a gzipped shard: tarfile's random access passes zlib's error on unwrapped (the header count,
    the cut check of training and ldm-encode, and ldm-eval's reader stopped with a bare `zlib.error`); every reader
    now takes the shard for a damaged one and goes on."""
    from ldm.eval.sources import iter_shard_members

    rng = np.random.default_rng(1)
    samples = [{"__key__": f"k{i:03d}", "png": png_bytes(Image.fromarray(rng.integers(0, 256, (24, 24, 3), np.uint8))),
                "txt": f"s{i}"} for i in range(5)]
    samples[1]["png"] = png_bytes(Image.fromarray(rng.integers(0, 256, (320, 320, 3), np.uint8)))  # 300 kB
    tar_bytes = write_shard(tmp_path / "full.tar", samples).read_bytes()
    with tarfile.open(tmp_path / "full.tar") as tar:
        big = next(member for member in tar if member.name == "k001.png")
    # zlib's error is unwrapped where tarfile seeks over a member's data (past the readers' 128 kB of read-ahead): a
    # deflate block starts two thirds into the big image, its type made invalid below (a flipped byte's common effect)
    cut = big.offset_data + 2 * big.size // 3
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)  # (31: a gzip stream)
    head = deflate.compress(tar_bytes[:cut]) + deflate.flush(zlib.Z_FULL_FLUSH)
    packed = head + deflate.compress(tar_bytes[cut:]) + deflate.flush()
    assert gzip.decompress(packed) == tar_bytes

    def damaged(at: int, flip: int = 0xFF) -> bytes:
        data = bytearray(packed)
        data[at] ^= flip
        return bytes(data)

    invalid_type = 0b110 & ~packed[len(head)]  # (a block's type: bits 1-2, of which 3 is invalid)
    scratch = tmp_path / "scratch.tar.gz"
    scratch.write_bytes(damaged(len(head), invalid_type))
    with pytest.raises(zlib.error, match="invalid block type"), tarfile.open(scratch, "r:*") as tar:
        list(tar)  # the case this is about occurs: each header is a seek over the member's data, decompressing it
    for i, at in enumerate([len(head), *range(20, len(packed) - 8, len(packed) // 40)]):
        shard = tmp_path / f"train-{i:06d}.tar.gz"  # (a name each: the cut check is cached by name, size and time)
        shard.write_bytes(damaged(at, invalid_type if at == len(head) else 0xFF))
        count = _count_tar_samples(str(shard))
        plan = EpochPlan([str(shard)], [count], seed=0, rank=0, world_size=1, num_workers=0, batch_size=1,
                         train=False, resolution=8)
        try:
            trained = [key for batch in ShardStream(plan) for key in batch["key"]] if count else []
        except RuntimeError as err:  # a lone shard none of whose images decodes: refused, naming it
            assert "not one sample of any shard could be read" in str(err)
            trained = []
        encoded = [sample["__key__"] for sample, _ in encoding._images(str(shard), 8, [])]
        evaluated = [sample["__key__"] for sample in iter_shard_members([str(shard)])]
        assert max(len(trained), len(encoded), len(evaluated), count) <= 5, at
        if at == len(head):  # the samples before the damage are read
            assert encoded == evaluated == ["k000"], (encoded, evaluated)


def test_a_sample_with_two_members_of_one_extension_is_skipped_by_every_reader(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture):
    """`k001.txt` and `k001.TXT`: webdataset raised, which was taken for a truncated tar: the shard's last (whole)
    sample was dropped with a message blaming a cut or a stale count, training kept the first caption and ldm-eval
    the second."""
    from ldm.eval.sources import shard_captions

    shard = write_shard(tmp_path / "train-000000.tar", shapes_like(tmp_path, "k", 4))
    data = shard.read_bytes()
    with tarfile.open(shard) as tar:
        end = next(m.offset_data + m.size for m in tar if m.name == "k001.txt")
    extra = io.BytesIO()
    with tarfile.open(fileobj=extra, mode="w") as tar:
        info = tarfile.TarInfo("k001.TXT")
        info.size = 7
        tar.addfile(info, io.BytesIO(b"CAPITAL"))
    shard.write_bytes(data[:-(-end // 512) * 512] + extra.getvalue()[:1024] + data[-(-end // 512) * 512:])
    dm = WebDataModule(train_shards=str(shard), batch_size=1, num_workers=0, resolution=8)
    dm.setup("fit")
    assert dm.train_counts == [4]
    keys = [key for batch in dm.train_dataloader() for key in batch["key"]]
    assert sorted(set(keys)) == ["k000", "k002", "k003"] and len(keys) == 4  # one repeated to fill the epoch
    (record,) = dm.skipped
    assert record[1] == "k001" and "two members with one extension ('k001.TXT'" in record[2]
    assert "damaged tar" not in str(dm.skipped)
    skipped: list[list[str]] = []
    assert [s["__key__"] for s, _ in encoding._images(str(shard), 8, skipped)] == ["k000", "k002", "k003"]
    assert [key for key, _ in skipped] == ["k001"]
    with caplog.at_level("WARNING"):
        assert shard_captions([str(shard)]) == ["s0", "s2", "s3"]
    assert "sample k001 left out: it does not read as training reads it (two members with one extension" in caplog.text


class Mean(L.LightningModule):
    """The smallest trainable module: the data are under test here."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def training_step(self, batch, batch_idx):
        return (batch["image"].mean() - self.bias) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def logged_maximum(metrics_csv: Path, name: str) -> float:
    rows = [row.split(",") for row in metrics_csv.read_text().splitlines()]
    column = rows[0].index(name)
    return max(float(row[column]) for row in rows[1:] if row[column])


def test_skipped_samples_are_a_logged_metric_and_totalled(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Five epochs and five validations over one shard with one corrupt and one uncaptioned sample: each is counted
    and warned about once, not once per read."""
    samples = shapes_like(tmp_path, "k", 8)
    samples[3]["png"] = b"not an image"
    del samples[5]["txt"]
    shard = write_shard(tmp_path / "bad-000000.tar", samples)
    dm = WebDataModule(train_shards=str(shard), val_shards=str(shard), batch_size=2, num_workers=0, resolution=8)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version="")
    trainer = L.Trainer(max_epochs=5, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, accelerator="cpu")
    with caplog.at_level("INFO", logger="ldm.data.datamodule"):
        trainer.fit(Mean(), datamodule=dm)
    assert trainer.current_epoch == 5
    assert logged_maximum(tmp_path / "csv" / "metrics.csv", "data/skipped") == 1.0
    assert logged_maximum(tmp_path / "csv" / "metrics.csv", "data/uncaptioned") == 1.0
    assert "data (rank 0): 1 corrupt samples skipped" in caplog.text
    assert "1 samples without a caption in 1 shards" in caplog.text
    assert caplog.text.count("skipped corrupt sample") == 1 and dm.skipped == [(str(shard), "k003", dm.skipped[0][2])]


class LoggedMean(Mean):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss, batch_size=len(batch["image"]))
        return loss


def test_data_counts_are_logged_at_the_steps_lightning_logs(tmp_path: Path):
    """data/skipped was logged before the step at steps 0, 2, 4 (Lightning's metrics at 1, 3, 5), the end of the fit
    at the step count (6: a step never trained), and a resumed run logged that step again."""
    samples = shapes_like(tmp_path, "s", 24)
    for i in (1, 6, 11, 17):
        samples[i]["png"] = b"not an image"
    shard = write_shard(tmp_path / "bad-000000.tar", samples)
    metrics = tmp_path / "csv" / "metrics.csv"
    for max_steps, ckpt in ((6, None), (10, tmp_path / "run.ckpt")):
        dm = WebDataModule(train_shards=str(shard), batch_size=2, num_workers=0, resolution=8, shuffle_buffer=1)
        trainer = L.Trainer(max_steps=max_steps, logger=AppendingCSVLogger(str(tmp_path), name="csv"),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            log_every_n_steps=2, accelerator="cpu", limit_val_batches=0)
        trainer.fit(LoggedMean(), datamodule=dm, ckpt_path=ckpt)
        trainer.save_checkpoint(tmp_path / "run.ckpt")
    rows = list(csv.DictReader(metrics.open()))
    data_steps = [int(r["step"]) for r in rows if r.get("data/skipped")]
    train_steps = {int(r["step"]) for r in rows if r.get("train/loss")}
    assert train_steps == {1, 3, 5, 7, 9}
    assert data_steps and set(data_steps) <= train_steps and len(data_steps) == len(set(data_steps)), data_steps
    assert max(float(r["data/skipped"]) for r in rows if r.get("data/skipped")) >= 1


def test_a_resumed_epoch_counts_what_it_reads_after_the_stop(tmp_path: Path):
    """The corrupt and uncaptioned samples of the batches trained before a stop were counted again by the resumed
    run, whose fast-forward over them decodes them (also those just after the last batch, which went with it: a
    batch is handed on once the next sample is read): the two runs' counts add up to the uninterrupted run's."""
    samples = shapes_like(tmp_path, "r", 16)
    for i in (0, 5, 13):  # (read in order: batches [1, 2], [3, 4], then 5 corrupt, [6, 7], [8, 9], [10, 11], ...)
        samples[i]["png"] = b"not an image"
    for i in (1, 10, 14):
        del samples[i]["txt"]
    shard = write_shard(tmp_path / "bad-000000.tar", samples)

    def counts(stop_after: int | None = None, state: dict | None = None) -> tuple[int, int, dict]:
        dm = WebDataModule(train_shards=str(shard), batch_size=2, num_workers=0, resolution=8, shuffle_buffer=1)
        dm.setup("fit")
        if state is not None:
            dm.load_state_dict(state)
        for done, _ in enumerate(dm.train_dataloader(), 1):
            if done == stop_after:
                break
        return dm.num_skipped, sum(dm.uncaptioned.values()), dm.state_dict()

    assert counts()[:2] == (3, 3)
    for stop_after in range(1, 7):  # every boundary (after 2 batches the corrupt 5 next, after 4 the uncaptioned 10)
        skipped, uncaptioned, state = counts(stop_after=stop_after)
        assert (skipped, uncaptioned) != (0, 0) and \
            tuple(a + b for a, b in zip((skipped, uncaptioned), counts(state=state)[:2])) == (3, 3), stop_after


def test_the_sanity_check_is_not_the_pass_that_counts(tmp_path: Path):
    """Lightning's sanity check reads the first validation batches only: the corrupt and the uncaptioned sample of a
    later batch are counted in the first whole validation."""
    class Validated(Mean):
        def validation_step(self, batch, batch_idx):
            return None

    samples = shapes_like(tmp_path, "v", 8)
    samples[6]["png"] = b"not an image"
    del samples[7]["txt"]
    val = write_shard(tmp_path / "val-000000.tar", samples)
    train = write_shard(tmp_path / "train-000000.tar", shapes_like(tmp_path, "t", 8))
    dm = WebDataModule(train_shards=str(train), val_shards=str(val), batch_size=2, num_workers=0, resolution=8)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=1)
    trainer.fit(Validated(), datamodule=dm)
    assert dm.num_skipped == 1 and dm.uncaptioned == {str(val): 1}


@pytest.mark.timeout(300)
def test_skipped_samples_of_every_rank_are_logged(tmp_path: Path):
    """Two DDP ranks (gloo): one corrupt sample lies in rank 0's half of the one shard (samples 0-7), three in rank 1's,
    and rank 0's loggers write the sum over both ranks (not rank 0's count, nor the larger one)."""
    samples = shapes_like(tmp_path, "k", 16)
    for i in (2, 12, 13, 14):
        samples[i]["png"] = b"not an image"
    shard = write_shard(tmp_path / "bad-000000.tar", samples)
    dm = WebDataModule(train_shards=str(shard), batch_size=2, num_workers=0, resolution=8)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version="")
    trainer = L.Trainer(max_epochs=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1, accelerator="cpu", devices=2,
                        strategy="ddp_fork")
    trainer.fit(Mean(), datamodule=dm)
    assert logged_maximum(tmp_path / "csv" / "metrics.csv", "data/skipped") == 4.0


# ----------------------------------------------------------------------------------------------------------------------
# ldm-data source=folder.


def test_folder_source_leaves_out_what_it_cannot_read_and_lists_it(tmp_path: Path):
    src = tmp_path / "in"
    (src / "sub").mkdir(parents=True)
    for name in ("a", "b", "c", "sub/d"):
        Image.new("RGB", (8, 8), (40, 80, 120)).save(src / f"{name}.png")
        (src / f"{name}.txt").write_text(f"caption {name}")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(src / "white16.png")       # 16-bit: kept, scaled
    (src / "white16.txt").write_text("white")
    (src / "latin.png").write_bytes((src / "a.png").read_bytes())
    (src / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))                       # not UTF-8
    (src / "garbage.png").write_bytes(b"not a png at all")                              # undecodable
    (src / "garbage.txt").write_text("garbage")
    (src / "piped.png").write_bytes((src / "a.png").read_bytes())
    os.mkfifo(src / "piped.txt")                                                         # a FIFO caption
    os.mkfifo(src / "fifo.png")                                                          # a FIFO image
    (src / "dangling.png").symlink_to(src / "missing.png")
    (src / "self.png").symlink_to(src / "self.png")                                      # a link loop
    (src / "sub" / "up").symlink_to(src, target_is_directory=True)                        # a directory loop
    summary = write_dataset({"source": "folder", "input_dir": str(src), "output_dir": str(tmp_path / "out"),
                             "val_samples": 1, "resolution": 8, "samples_per_shard": 100})
    reasons = {entry["path"]: entry["reason"] for entry in summary["skipped"]}
    assert set(reasons) == {"latin.png", "garbage.png", "piped.png", "fifo.png", "dangling.png", "self.png",
                            "sub/up"}
    assert "not UTF-8" in reasons["latin.png"] and "undecodable" in reasons["garbage.png"]
    assert "not a regular file" in reasons["piped.png"] and "special file" in reasons["fifo.png"]
    assert "dangling" in reasons["dangling.png"] and "loop" in reasons["self.png"] and "loop" in reasons["sub/up"]
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["skipped"] == summary["skipped"]
    written = summary["splits"]["train"]["count"] + summary["splits"]["val"]["count"]
    assert written == 5  # a, b, c, sub/d, white16
    dm = WebDataModule(train_shards=str(tmp_path / "out"), val_shards=str(tmp_path / "out"), batch_size=1,
                       num_workers=0, resolution=8)
    dm.setup("fit")
    batches = [*dm.train_dataloader(), *dm.val_dataloader()]
    images = {caption: image for b in batches for caption, image in zip(b["caption"], b["image"])}
    assert (images["white"] == 1.0).all(), "a 16-bit white PNG is white, through ldm-data and the loader"
    assert abs(float(images["caption a"][0].mean()) - (40 / 127.5 - 1)) < 0.02
    # an undecodable image without a caption is left out like the others (it stopped the run as "no caption"), and
    # with allow_missing_captions it is listed as skipped, not as written with the empty caption
    (src / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(196))
    summary = write_dataset({"source": "folder", "input_dir": str(src), "output_dir": str(tmp_path / "out2"),
                             "val_samples": 1, "resolution": 8, "samples_per_shard": 100})
    assert "cut.jpg" in {entry["path"] for entry in summary["skipped"]} and summary["missing_captions"] == []
    only = tmp_path / "only_broken"  # nothing but that: named as such (it was "val_samples=0 ... out of 0")
    only.mkdir()
    shutil.copy(src / "cut.jpg", only)
    with pytest.raises(ConfigError, match=r"holds no readable images \(left out: .*cut\.jpg"):
        write_dataset({"source": "folder", "input_dir": str(only), "output_dir": str(tmp_path / "o"), "val_samples": 0,
                       "resolution": 8})
    (src / "blank.png").write_bytes((src / "a.png").read_bytes())  # a good one without a caption
    summary = write_dataset({"source": "folder", "input_dir": str(src), "output_dir": str(tmp_path / "out3"),
                             "val_samples": 1, "resolution": 8, "samples_per_shard": 100,
                             "allow_missing_captions": True})
    assert summary["missing_captions"] == ["blank.png"]
    assert summary["splits"]["train"]["count"] + summary["splits"]["val"]["count"] == 6
    # the refusal of uncaptioned images neither names nor counts those it found undecodable on the way to the
    # first good one (it named 0cut.jpg as an image without a caption)
    (src / "0cut.jpg").write_bytes((src / "cut.jpg").read_bytes())
    with pytest.raises(ConfigError, match=r"^2 of \d+ images have no caption .*\['blank.png', 'cut.jpg'\]") as err:
        write_dataset({"source": "folder", "input_dir": str(src), "output_dir": str(tmp_path / "out4"),
                       "val_samples": 1, "resolution": 8})
    assert "0cut" not in str(err.value)


def test_a_damaged_summary_is_named(tmp_path: Path):
    shard = write_shard(tmp_path / "train-000000.tar", shapes_like(tmp_path, "s", 4))
    (tmp_path / "summary.json").write_text('{"splits": {"train": ')  # cut short
    dm = WebDataModule(train_shards=str(shard), batch_size=2, num_workers=0, resolution=8)
    with pytest.raises(ConfigError, match=r"summary\.json is not a shard summary .*delete it"):
        dm.setup("fit")
    (tmp_path / "summary.json").unlink()
    dm = WebDataModule(train_shards=str(shard), batch_size=2, num_workers=0, resolution=8)
    dm.setup("fit")
    assert dm.train_counts == [4], "without a summary the tar headers are counted"


def test_a_sample_without_a_label_is_skipped_in_class_conditional_training(tmp_path: Path):
    """A class-conditional LDM: the sample whose metadata has no integer label is skipped and counted (the batches
    stay full), instead of its batch losing the `label` key and failing the step; so is a label outside the model's
    classes: the null class (3 of 3; it trained the unconditional embedding) or a negative one (it crashed the run)."""
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.modules.contrastive import ContrastiveModule
    from ldm.modules.latent_diffusion import LatentDiffusionModule
    from ldm.nn.unet import unet_config

    samples = shapes_like(tmp_path, "k", 8)
    for i, sample in enumerate(samples):
        sample["json"] = json.dumps({5: {}, 6: {"label": 3}, 7: {"label": -1}}.get(i, {"label": i % 3}))
        if i < 2:
            del sample["txt"]  # a class model's data need no captions
    shard = write_shard(tmp_path / "train-000000.tar", samples)
    module = LatentDiffusionModule({
        "autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "ema_decay": None,
        "unet": asdict(unet_config("tiny", context_dim=None, num_classes=3)),
        "conditioner": {"kind": "class", "num_classes": 3, "class_embed": "unet"}})

    def cpu_trainer(root: Path, **limits) -> L.Trainer:
        return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", default_root_dir=root, **limits)  # its export

    dm = WebDataModule(train_shards=str(shard), batch_size=2, num_workers=0, resolution=32)
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4, "every batch full: the slot topped its quota up"
    reasons = {key: reason for _, key, reason in dm.skipped}  # in the order the shuffled stream met them
    assert sorted(reasons) == ["k005", "k006", "k007"] and dm.num_skipped == 3
    assert "no integer 'label'" in reasons["k005"]
    assert all("outside the model's classes [0, 2] (model.conditioner.num_classes=3)" in reasons[key]
               for key in ("k006", "k007"))
    assert not dm.uncaptioned, "a class-conditional model reads no caption: none is counted missing"

    # Shards of captions alone (ldm-data's folder source without labels=folders): every sample would be skipped as
    # corrupt and the run fail at its first batch calling the shards damaged; refused before any step, naming the fix.
    (tmp_path / "plain").mkdir()
    unlabelled = write_shard(tmp_path / "plain" / "train-000000.tar", shapes_like(tmp_path, "p", 4))
    dm = WebDataModule(train_shards=str(unlabelled), batch_size=2, num_workers=0, resolution=32)
    trainer = cpu_trainer(tmp_path, max_epochs=1)
    with pytest.raises(ConfigError, match=r"data\.train_shards: the first sample of .*plain/train-000000\.tar has no "
                                          r"integer 'label' .*ldm-data source=folder labels=folders"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0
    # Labelled training shards, validation shards of captions alone: the run trained until its first validation (a
    # few thousand steps), then stopped calling them damaged; refused at start too.
    dm = WebDataModule(train_shards=str(shard), val_shards=str(unlabelled), batch_size=2, num_workers=0,
                       resolution=32)
    trainer = cpu_trainer(tmp_path, max_steps=2)
    with pytest.raises(ConfigError, match=r"data\.val_shards: the first sample of .*plain/train-000000\.tar has no "
                                          r"integer 'label' "):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0

    # The reverse: shards of class folders (ldm-data labels=folders, every caption empty) under a model conditioned
    # on prompts trained it on empty prompts alone, unsaid (an unconditional model in all but name). Refused, naming
    # the class model's keys; one image with a caption is data of another kind, and trains.
    for folder in ("cat", "dog"):
        (tmp_path / "in" / folder).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (32, 32), (i * 90, 40, 0)).save(tmp_path / "in" / folder / f"{i}.png")
    classes = {"source": "folder", "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "classes"),
               "labels": "folders", "val_samples": 2, "resolution": 32}
    write_dataset(classes)
    text = LatentDiffusionModule({
        "autoencoder_path": str(tmp_path / "ae"), "ema_decay": None, "unet": asdict(unet_config("tiny")),
        "conditioner": {"kind": "byte", "width": 64, "num_layers": 1, "num_heads": 2, "max_length": 16}})

    def fit_text_model() -> L.Trainer:
        dm = WebDataModule(train_shards=str(tmp_path / "classes" / "train-*.tar"), batch_size=2, num_workers=0,
                           resolution=32)
        trainer = cpu_trainer(tmp_path / "text", max_steps=1)
        trainer.fit(text, datamodule=dm)
        return trainer

    with pytest.raises(ConfigError, match=r"data\.train_shards hold class-labelled images without any caption "
                                          r"\(ldm-data labels=folders, 2 classes\), but this model is conditioned on "
                                          r"prompts \(model.conditioner.kind=byte\) .*model.conditioner.kind=class "
                                          r"model.conditioner.num_classes=2, or an unconditional one, "
                                          r"model.conditioner.kind=none model.unet.context_dim=null$"):
        fit_text_model()
    clip = ContrastiveModule({"text": {"width": 32, "num_layers": 1, "num_heads": 2, "max_length": 16},
                              "image": {"resolution": 32, "channels": [8, 16]}, "embed_dim": 16})
    with pytest.raises(ConfigError, match=r"data\.train_shards hold class-labelled images without any caption "
                                          r"\(ldm-data labels=folders, 2 classes\): every caption is empty, so the "
                                          r"text encoder learns nothing"):  # (it trained, at accuracy 1)
        clip.check_data(WebDataModule(train_shards=str(tmp_path / "classes" / "train-*.tar"), batch_size=2,
                                      num_workers=0, resolution=32))
    (tmp_path / "in" / "dog" / "0.txt").write_text("a dog on a lawn")
    write_dataset({**classes, "overwrite": True})
    assert fit_text_model().global_step == 1


def test_samples_are_counted_as_webdataset_reads_them(tmp_path: Path):
    """Two tars concatenated, say: webdataset reads a key that comes back after another key as a new sample, so the
    count (which sets how much each epoch reads) must see it too, or the last samples are never read."""
    samples = shapes_like(tmp_path, "k", 3) + [{**shapes_like(tmp_path, "k", 1)[0], "txt": "again"}]
    shard = write_shard(tmp_path / "dup-000000.tar", samples)
    with tarfile.open(shard, "a") as tar:  # metadata members, which webdataset leaves out: not samples either
        for name in ("__meta__/info.json", "__index__"):
            member = tarfile.TarInfo(name)
            member.size = 2
            tar.addfile(member, io.BytesIO(b"{}"))
    assert shard_counts([str(shard)], "data.train_shards", None) == [4]
    whole = write_shard(tmp_path / "cut-000000.tar", shapes_like(tmp_path, "c", 3))
    with tarfile.open(whole) as tar:
        last = [m for m in tar if m.isreg()][-1]  # the third sample's caption
    whole.write_bytes(whole.read_bytes()[: last.offset_data + 1])  # cut inside its data: that sample is not whole
    assert shard_counts([str(whole)], "data.train_shards", None) == [2]
    dm = WebDataModule(train_shards=str(shard), batch_size=4, num_workers=0, resolution=8)
    dm.setup("fit")
    (batch,) = list(dm.train_dataloader())
    assert sorted(batch["caption"]) == ["again", "s0", "s1", "s2"] and dm.num_skipped == 0
