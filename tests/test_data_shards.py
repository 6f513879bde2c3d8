"""Shard writing: shapes and folder sources round-trip through real WebDataset tars; the ldm-data CLI."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ldm.cli.data import write_dataset
from ldm.config import ConfigError, pasteable
from ldm.data import shapes
from ldm.data.encoding import image_shards_in
from ldm.data.shardlist import shard_name
from ldm.data.shards import MEMBER_MTIME

REPO = Path(__file__).resolve().parents[1]


def read_split(directory: Path, split: str) -> list[dict]:
    """Every sample of a split, read back with webdataset's own tar reader."""
    urls = sorted(str(p) for p in directory.glob(f"{split}-*.tar"))
    return list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()))


def decode(sample: dict) -> np.ndarray:
    ext = next(k for k in ("png", "jpg", "jpeg") if k in sample)
    return np.asarray(Image.open(io.BytesIO(sample[ext])).convert("RGB"))


def test_shapes_round_trip(shapes_shards: Path):
    summary = json.loads((shapes_shards / "summary.json").read_text())
    assert summary["source"] == "shapes" and summary["seed"] == 0 and summary["resolution"] == 32
    assert summary["splits"]["train"]["count"] == 64 and summary["splits"]["val"]["count"] == 16
    assert summary["splits"]["train"]["shards"] == [f"train-{i:06d}.tar" for i in range(4)]
    assert summary["splits"]["train"]["shard_counts"] == [16] * 4
    assert summary["splits"]["val"]["shards"] == ["val-000000.tar"]
    for split, n in (("train", 64), ("val", 16)):
        samples = read_split(shapes_shards, split)
        assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(n)]
        expected = shapes.ShapesDataset(n, 32, seed=0, split=split)
        for sample, want in zip(samples, expected):
            assert sample["txt"].decode() == want["caption"]
            assert json.loads(sample["json"]) == json.loads(json.dumps(want["metadata"]))
            assert np.array_equal(decode(sample), np.asarray(want["image"])), "png is lossless"


def test_shards_are_plain_ustar_and_the_same_bytes_when_written_again(shapes_shards: Path, tmp_path: Path):
    """One 512-byte header per member (no PAX record for a float mtime, which made reading 1.6x slower), and the same
    inputs give the same shard bytes."""
    write_dataset({"source": "shapes", "output_dir": str(tmp_path), "num_samples": 64, "val_samples": 16,
                   "resolution": 32, "seed": 0, "samples_per_shard": 16})
    for first in sorted(shapes_shards.glob("*.tar")):
        with tarfile.open(first) as tar:
            members = tar.getmembers()
        assert members and all(m.pax_headers == {} and m.mtime == MEMBER_MTIME for m in members)
        assert (tmp_path / first.name).read_bytes() == first.read_bytes(), first.name


def _make_folder(root: Path, n: int = 10, size: tuple[int, int] = (48, 32)) -> list[tuple[str, str, np.ndarray]]:
    """n images (w x h) with a gradient and a per-image colour, captions in sidecar .txt files, one subfolder."""
    rng = np.random.default_rng(0)
    made = []
    for i in range(n):
        rel = f"{'sub/' if i % 3 == 0 else ''}img.{i}.png"  # dots in stems and nesting must not break keys
        w, h = size
        arr = np.zeros((h, w, 3), np.uint8)
        arr[..., 0] = np.linspace(0, 255, w)[None, :]
        arr[..., 1] = rng.integers(0, 256)
        arr[..., 2] = i * 20
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(root / rel)
        (root / rel).with_suffix(".txt").write_text(f"caption number {i}\n")
        made.append((rel, f"caption number {i}", arr))
    return made


@pytest.mark.parametrize("manifest", [None, "csv", "jsonl", "json"])
def test_folder_round_trip(tmp_path: Path, manifest: str | None):
    made = _make_folder(tmp_path / "in")
    captions = None
    if manifest == "csv":
        captions = tmp_path / "captions.csv"
        with captions.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "caption"])
            writer.writerows([(rel, f"csv {c}") for rel, c, _ in made])
    elif manifest == "jsonl":  # a lone surrogate escape in the last caption (ldm-data stopped there) is written as "?"
        captions = tmp_path / "captions.jsonl"
        captions.write_text("".join(json.dumps({"path": rel, "text": f"jsonl {c}"}) + "\n" for rel, c, _ in made)
                            .replace('number 9"', 'number 9\\ud83d"'))
        made[-1] = (made[-1][0], made[-1][1] + "?", made[-1][2])
    elif manifest == "json":  # one array, as json.dump writes a list (it was read line by line and refused)
        captions = tmp_path / "captions.json"
        captions.write_text(json.dumps([{"file": rel, "caption": f"json {c}"} for rel, c, _ in made], indent=2))
    prefix = {None: "", "csv": "csv ", "jsonl": "jsonl ", "json": "json "}[manifest]
    out = tmp_path / "out"
    summary = write_dataset({"source": "folder", "input_dir": str(tmp_path / "in"), "output_dir": str(out),
                             "captions": str(captions) if captions else None, "val_samples": 3, "resolution": None,
                             "samples_per_shard": 4, "seed": 1})
    assert summary["splits"]["train"]["count"] == 7 and summary["splits"]["val"]["count"] == 3
    assert summary["splits"]["train"]["shard_counts"] == [4, 3]
    by_path = {rel: (caption, arr) for rel, caption, arr in made}
    seen = []
    for split in ("train", "val"):
        for sample in read_split(out, split):
            meta = json.loads(sample["json"])
            caption, arr = by_path[meta["source_path"]]
            assert sample["txt"].decode() == prefix + caption
            assert np.array_equal(decode(sample), arr), "resolution=null stores the original bytes"
            seen.append(sample["__key__"])
    assert len(seen) == len(set(seen)) == 10
    write_dataset({"source": "folder", "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "o2"),
                           "captions": str(captions) if captions else None, "val_samples": 3, "resolution": None,
                           "samples_per_shard": 4, "seed": 1})
    assert [s["__key__"] for s in read_split(tmp_path / "o2", "val")] == [s["__key__"] for s in read_split(out, "val")]


def test_a_captions_manifest_names_rows_without_images_and_sidecars_it_replaces(tmp_path: Path,
                                                                               caplog: pytest.LogCaptureFixture):
    """Rows naming no image (another letter case, a typo) went unused unsaid, and the missing-caption refusal did not
    say that the sidecar captions of those images are not read beside a manifest; resolution=null's summary recorded
    the png format and the crop it did not apply."""
    made = _make_folder(tmp_path / "in", n=6)
    captions = tmp_path / "captions.csv"
    rows = [(rel, f"csv {c}") for rel, c, _ in made[:4]] + [("IMG.4.PNG", "wrong case"), ("nowhere.png", "typo")]
    with captions.open("w", newline="") as f:
        csv.writer(f).writerows([("file", "caption"), *rows])
    base = {"source": "folder", "input_dir": str(tmp_path / "in"), "captions": str(captions), "val_samples": 1}
    with pytest.raises(ConfigError, match=r"2 of 6 images have no caption in captions=.*captions\.csv \(2 of them "
                                          r"have a sidecar \.txt, which is not read when captions= is given\)"):
        write_dataset({**base, "output_dir": str(tmp_path / "a")})
    with caplog.at_level("WARNING", logger="ldm.data.shards"):
        summary = write_dataset({**base, "output_dir": str(tmp_path / "b"), "allow_missing_captions": True,
                                 "resolution": None})
    assert "2 of its 6 rows name no image of input_dir" in caplog.text and "IMG.4.PNG" in caplog.text
    assert (summary["resolution"], summary["crop"], summary["image_format"]) == (None, False, None)


def test_folder_resize_center_crop(tmp_path: Path):
    made = _make_folder(tmp_path / "in", n=4, size=(48, 32))
    write_dataset({"source": "folder", "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "out"),
                   "val_samples": 1, "resolution": 16})
    by_path = {rel: arr for rel, _, arr in made}
    for sample in read_split(tmp_path / "out", "train"):
        img = decode(sample)
        assert img.shape == (16, 16, 3)
        source = by_path[json.loads(sample["json"])["source_path"]]
        # 48x32 -> 24x16 -> centre 16 columns: the red gradient spans the middle third, not the full range
        assert 40 < img[..., 0].min() and img[..., 0].max() < 215
        assert abs(int(img[..., 2].mean()) - int(source[..., 2].mean())) <= 2


def test_folder_shards_that_keep_the_aspect_give_random_crops(tmp_path: Path):
    """`experiment=kl_f8` trains with data.random_crop=true, but shards written square at data.resolution (as its
    docs said) leave nothing to crop: every epoch saw the same centre crops, silently. crop=false keeps the aspect
    (shorter side = resolution), so the random crops act; square shards with random_crop=true get a warning."""
    from ldm.data.datamodule import WebDataModule

    _make_folder(tmp_path / "in", n=12, size=(48, 32))
    common = {"source": "folder", "input_dir": str(tmp_path / "in"), "val_samples": 2, "resolution": 16}
    write_dataset({**common, "output_dir": str(tmp_path / "kept"), "crop": False})
    assert json.loads((tmp_path / "kept" / "summary.json").read_text())["crop"] is False
    assert {decode(sample).shape for sample in read_split(tmp_path / "kept", "train")} == {(16, 24, 3)}

    def first_batch(folder: str, random_crop: bool) -> dict:
        data = WebDataModule({"train_shards": f"{tmp_path / folder}/train-*.tar", "val_shards": None,
                              "resolution": 16, "batch_size": 10, "num_workers": 0, "random_crop": random_crop})
        data.setup("fit")
        return next(iter(data.train_dataloader()))

    centre, cropped = first_batch("kept", False), first_batch("kept", True)
    assert centre["key"] == cropped["key"] and not torch.equal(centre["image"], cropped["image"])

    write_dataset({**common, "output_dir": str(tmp_path / "square")})
    with pytest.warns(UserWarning, match=r"data\.random_crop=true crops nothing here: the training shards hold "
                                         r"folder images that ldm-data wrote square at 16 x 16, resized square to "
                                         r"16 x 16; write them with crop=false"):
        first_batch("square", True)
    write_dataset({**common, "output_dir": str(tmp_path / "square24"), "resolution": 24})  # another size: no warning
    with pytest.warns(UserWarning, match=r"wrote square at 24 x 24, resized square to 16 x 16"):  # before, yet the
        second = first_batch("square24", True)                                         # same crops at any seed
    data = WebDataModule({"train_shards": f"{tmp_path / 'square24'}/train-*.tar", "val_shards": None, "seed": 1,
                          "resolution": 16, "batch_size": 10, "num_workers": 0, "random_crop": True})
    data.setup("fit")
    other = next(iter(data.train_dataloader()))
    by_key = dict(zip(second["key"], second["image"]))
    assert sorted(other["key"]) == sorted(second["key"])
    assert all(torch.equal(image, by_key[key]) for key, image in zip(other["key"], other["image"]))
    write_dataset({"output_dir": str(tmp_path / "shapes"), "num_samples": 10, "val_samples": 0, "resolution": 16})
    with pytest.warns(UserWarning, match=r"hold shapes images .*; set data\.random_crop=false"):  # not crop=false,
        first_batch("shapes", True)                                                           # which shapes refuse
    with pytest.raises(ConfigError, match=r"crop=False would be ignored with resolution=null"):
        write_dataset({**common, "output_dir": str(tmp_path / "x"), "resolution": None, "crop": False})
    with pytest.raises(ConfigError, match=r"crop=False would be ignored with source=shapes"):
        write_dataset({"output_dir": str(tmp_path / "x"), "crop": False})


def test_an_empty_caption_is_a_missing_one(tmp_path: Path):
    """A blank sidecar .txt (or manifest cell) was written as the caption "", without allow_missing_captions and
    without a line in summary.json's missing_captions: part of a text-to-image model trained unconditionally."""
    _make_folder(tmp_path / "in", n=4, size=(16, 16))
    for blank in sorted((tmp_path / "in").glob("*.txt"))[:2]:
        blank.write_text("  \n")
    common = {"source": "folder", "input_dir": str(tmp_path / "in"), "val_samples": 1, "resolution": 16}
    with pytest.raises(ConfigError, match=r"2 of 4 images have no caption"):
        write_dataset({**common, "output_dir": str(tmp_path / "a")})
    write_dataset({**common, "output_dir": str(tmp_path / "b"), "allow_missing_captions": True})
    assert len(json.loads((tmp_path / "b" / "summary.json").read_text())["missing_captions"]) == 2


def test_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"source='bad'.*\['shapes', 'folder'\]"):
        write_dataset({"source": "bad", "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="input_dir"):
        write_dataset({"source": "folder", "output_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match="output_dir is required"):
        write_dataset({"source": "shapes"})
    with pytest.raises(ConfigError, match="num_sample"):
        write_dataset({"source": "shapes", "output_dir": str(tmp_path), "num_sample": 3})
    with pytest.raises(ConfigError, match=r"sizes=\['huge'\] must be a non-empty list of \['small', 'large'\]"):
        write_dataset({"source": "shapes", "output_dir": str(tmp_path), "sizes": ["huge"]})
    with pytest.raises(ConfigError, match=r"scale=3.0 draws shapes .* leave 0.470: use a scale in \(0, 2.14\]$"):
        write_dataset({"source": "shapes", "output_dir": str(tmp_path), "positions": ["center"], "scale": 3.0})
    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")
    with pytest.raises(ConfigError, match="no caption"):
        write_dataset({"source": "folder", "input_dir": str(tmp_path / "in"), "output_dir": str(tmp_path / "o")})
    # overwrite=true with a mistake in the inputs: the shards were deleted before the inputs were checked
    write_dataset({"source": "shapes", "output_dir": str(tmp_path / "o"), "num_samples": 4, "val_samples": 2,
                   "resolution": 16})
    before = sorted(p.name for p in (tmp_path / "o").iterdir())
    with pytest.raises(ConfigError, match="input_dir=.*typo is not a directory"):
        write_dataset({"source": "folder", "input_dir": str(tmp_path / "typo"), "output_dir": str(tmp_path / "o"),
                       "overwrite": True})
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before == ["summary.json", "train-000000.tar",
                                                                              "val-000000.tar"]
    # mistakes found only while writing: a holdout that leaves no caption, a folder none of whose images can be read
    with pytest.raises(ConfigError, match="holdout"):
        write_dataset({"source": "shapes", "output_dir": str(tmp_path / "o"), "num_samples": 4, "val_samples": 2,
                       "resolution": 16, "holdout": ["a"], "overwrite": True})
    (tmp_path / "bad").mkdir()
    for name in ("x.png", "y.png"):
        (tmp_path / "bad" / name).write_text("not an image")
        (tmp_path / "bad" / name).with_suffix(".txt").write_text("a caption")
    with pytest.raises(ConfigError, match="no training image of input_dir=.*bad could be read .* the shards there "
                                          "were left as they were"):
        write_dataset({"source": "folder", "input_dir": str(tmp_path / "bad"), "output_dir": str(tmp_path / "o"),
                       "val_samples": 0, "overwrite": True})
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == before  # and no staging folder left behind
    # a tar of the user's own beside the shards: named as a shard to replace, then deleted by overwrite=true
    with tarfile.open(tmp_path / "o" / "my_backup.tar", "w"):
        pass
    write_dataset({"source": "shapes", "output_dir": str(tmp_path / "o"), "num_samples": 4, "val_samples": 2,
                   "resolution": 16, "overwrite": True})
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted([*before, "my_backup.tar"])
    (tmp_path / "mine").mkdir()
    with tarfile.open(tmp_path / "mine" / "my_backup.tar", "w"):
        pass
    write_dataset({"source": "shapes", "output_dir": str(tmp_path / "mine"), "num_samples": 4, "val_samples": 2,
                   "resolution": 16})  # (it was refused as holding shards)


def test_cli_writes_shards(tmp_path: Path):
    exe = Path(sys.executable).parent / "ldm-data"
    if not exe.exists():
        exe = REPO / ".venv" / "bin" / "ldm-data"
    out = tmp_path / "cli"
    proc = subprocess.run([str(exe), "source=shapes", f"output_dir={out}", "num_samples=20", "val_samples=5",
                           "resolution=16", "seed=2", "samples_per_shard=8"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"]["train"]["shard_counts"] == [8, 8, 4] and summary["splits"]["val"]["count"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["summary.json", "train-000000.tar", "train-000001.tar",
                                                     "train-000002.tar", "val-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"], "no outputs/ or log files litter the cwd"


def test_folder_images_are_stored_upright_and_byte_order_marks_dropped(tmp_path: Path):
    """A phone photo stores its sensor's pixels and an EXIF rotation (Orientation 6: turn 90 degrees clockwise to
    view); Excel's "CSV UTF-8" and Notepad's UTF-8 start with a byte order mark, which must not reach a caption or a
    column name."""
    root = tmp_path / "in"
    root.mkdir()
    pixels = np.zeros((32, 64, 3), np.uint8)  # stored 64 wide, 32 high: red left half, blue right half
    pixels[:, :32, 0] = 255
    pixels[:, 32:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(root / "phone.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(pixels).save(root / "phone.jfif", format="JPEG", exif=exif.tobytes(), quality=95)
    # an uncompressed grey TIFF (what Pillow writes by default): opened by name, Pillow maps its strips and rotated
    # them wrongly, so ldm-data stored scrambled pixels at a set resolution (the file's bytes at resolution=null)
    Image.fromarray(pixels).convert("L").save(root / "scan.tif", exif=exif.tobytes())
    Image.fromarray(pixels).save(root / "plain.png")
    (root / "plain.txt").write_bytes("\ufeffa caf\u00e9 sign".encode())
    # an EXIF block Pillow cannot parse (cut short): damaged metadata, a sound image (it was skipped as undecodable)
    Image.fromarray(pixels).save(root / "cut.webp", exif=b"Exif\x00\x00MM\x00\x2a\x00\x00", lossless=True)
    (root / "cut.txt").write_text("a cut exif")
    for name in ("phone", "scan"):
        (root / f"{name}.txt").write_text(f"a {name} photo")
    from ldm.images import decode_image  # what the training loader decodes the stored bytes with
    for resolution in (None, 32):
        out = tmp_path / f"out{resolution}"
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(out), "val_samples": 0,
                       "resolution": resolution})
        by_path = {json.loads(s["json"])["source_path"]: s for s in read_split(out, "train")}
        assert by_path["plain.png"]["txt"].decode() == "a caf\u00e9 sign"
        cut = by_path["cut.webp"]  # kept as stored (no orientation to apply)
        assert json.loads(cut["json"])["width"] == 64 and json.loads(cut["json"])["height"] == 32
        if resolution is None:
            assert np.array_equal(np.asarray(decode_image(cut["webp"])), pixels)
        for name, ext in (("phone.jpg", "jpg"), ("phone.jfif", "jpg"), ("scan.tif", "tif")):
            phone = by_path[name]
            assert json.loads(phone["json"])["width"] == 32 and json.loads(phone["json"])["height"] == 64, name
            stored = phone[ext] if resolution is None else phone["png"]  # the file's bytes, or the resized image
            image = np.asarray(decode_image(stored), dtype=np.int32)
            top, bottom = image[: image.shape[0] // 4].mean((0, 1)), image[-image.shape[0] // 4:].mean((0, 1))
            if name == "scan.tif":  # grey: red 76, blue 29
                assert abs(top[0] - 76) < 3 and abs(bottom[0] - 29) < 3, (resolution, top, bottom)
            else:  # red up, blue down
                assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0], (resolution, name, top, bottom)
    for name in ("phone.jfif", "scan.tif", "cut.webp"):
        (root / name).unlink()
    captions = tmp_path / "captions.csv"
    captions.write_bytes("\ufefffile,caption\nplain.png,from the csv\nphone.jpg,phone\n".encode())
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "csv"), "val_samples": 0,
                   "resolution": 32, "captions": str(captions)})
    assert sorted(s["txt"].decode() for s in read_split(tmp_path / "csv", "train")) == ["from the csv", "phone"]
    # an image listed twice (a COCO-style manifest, several captions each): all but the last caption were lost
    captions.write_bytes(b"file,caption\nplain.png,one\nphone.jpg,phone\n./plain.png,two\n")
    with pytest.raises(ConfigError, match=r"1 images are listed more than once \(e\.g\. \['\./plain\.png'\]; "
                                          r"ldm-data writes one sample per image, with one caption\); keep one row"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "twice"),
                       "val_samples": 0, "resolution": 32, "captions": str(captions)})
    # a name stored decomposed (macOS: e + combining accent) matches the composed one a manifest was typed with
    (root / "plain.png").rename(root / "cafe\u0301.png")
    captions.write_bytes("file,caption\ncaf\u00e9.png,accented\nphone.jpg,phone\n".encode())
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "nfc"), "val_samples": 0,
                   "resolution": 32, "captions": str(captions)})
    assert sorted(s["txt"].decode() for s in read_split(tmp_path / "nfc", "train")) == ["accented", "phone"]
    # ... and a sidecar named in the other form (it was "no caption")
    (root / "plain.txt").rename(root / "caf\u00e9.txt")
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "nfc_sidecar"),
                   "val_samples": 0, "resolution": 32})
    assert sorted(s["txt"].decode() for s in read_split(tmp_path / "nfc_sidecar", "train")) == [
        "a caf\u00e9 sign", "a phone photo"]
    (root / "caf\u00e9.txt").rename(root / "plain.txt")
    (root / "cafe\u0301.png").rename(root / "plain.png")
    # a link to an image is an image of its own: listed in a manifest beside its target, it was "listed twice"
    (root / "link.png").symlink_to(root / "plain.png")
    captions.write_bytes(b"file,caption\nplain.png,the file\nphone.jpg,phone\nlink.png,the link\n")
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "link"), "val_samples": 0,
                   "resolution": 32, "captions": str(captions)})
    assert sorted(s["txt"].decode() for s in read_split(tmp_path / "link", "train")) == ["phone", "the file",
                                                                                          "the link"]
    (root / "link.png").unlink()
    # absolute manifest paths through a linked folder (a dataset reached by a link on a cluster), the input folder
    # given either way
    (tmp_path / "alias").symlink_to(root)
    captions.write_text(f"file,caption\n{tmp_path / 'alias' / 'plain.png'},aliased\n"
                        f"{tmp_path / 'alias' / 'phone.jpg'},phone\n")
    for name, folder in (("via_alias", tmp_path / "alias"), ("via_root", root)):
        write_dataset({"source": "folder", "input_dir": str(folder), "output_dir": str(tmp_path / name),
                       "val_samples": 0, "resolution": 32, "captions": str(captions)})
        assert sorted(s["txt"].decode() for s in read_split(tmp_path / name, "train")) == ["aliased", "phone"]
    # a manifest row through a folder link loop: left out as the listing leaves the loop out (it stopped the run with
    # "RuntimeError: Symlink loop")
    (root / "loop").symlink_to(root / "loop")
    captions.write_text("file,caption\nplain.png,plain\nphone.jpg,phone\nloop/x.png,looped\n")
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "loop"), "val_samples": 0,
                   "resolution": 32, "captions": str(captions)})
    assert sorted(s["txt"].decode() for s in read_split(tmp_path / "loop", "train")) == ["phone", "plain"]
    (root / "loop").unlink()
    # a blank manifest caption is no caption, as a blank sidecar is (it passed as "   " and trained as "" uncounted)
    captions.write_bytes(b"file,caption\nplain.png,  from the csv \nphone.jpg,\"   \"\n")
    with pytest.raises(ConfigError, match=r"1 of 2 images have no caption .*phone\.jpg"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "blank"),
                       "val_samples": 0, "resolution": 32, "captions": str(captions)})
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "blank"), "val_samples": 0,
                   "resolution": 32, "captions": str(captions), "allow_missing_captions": True})
    assert sorted(s["txt"].decode() for s in read_split(tmp_path / "blank", "train")) == ["", "from the csv"]
    assert json.loads((tmp_path / "blank" / "summary.json").read_text())["missing_captions"] == ["phone.jpg"]


def test_a_divider_line_is_resized_in_its_box_not_whole():
    """A 12000 x 1 strip resized whole to 256 px high would be 3,072,000 x 256 pixels (3.7 GB) before its crop; past
    MAX_RESIZED_ASPECT only the crop's box is resized. An image within that ratio keeps the whole-image path."""
    code = ("import resource; from PIL import Image; from ldm.data.stream import resize_crop; "
            "im = Image.new('RGB', (12000, 1), (200, 10, 10)); "
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
            "out = resize_crop(im, 256, None); "
            "print(out.size, out.getpixel((5, 5)), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("(256, 256) (200, 10, 10)") and int(out.stdout.split()[-1]) < 200_000, out.stdout

    from ldm.data.stream import resize_crop

    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (60, 600, 3), dtype=np.uint8))  # 10:1, the box path
    whole = np.asarray(wide.resize((320, 32), Image.Resampling.BICUBIC, reducing_gap=3.0).crop((144, 0, 176, 32)))
    boxed = np.asarray(resize_crop(wide, 32, None))
    assert np.abs(whole.astype(int) - boxed).mean() < 1.0


def test_a_txt_caption_is_stripped():
    """Shards of other tools (img2dataset, by hand) end their .txt with a newline: not part of the caption."""
    from ldm.data.stream import SkipLog, caption_and_label

    assert caption_and_label({"txt": b"  a dog\n"}, SkipLog()) == ("a dog", None)


def test_awkward_folder_inputs(tmp_path: Path):
    """GIF and TIFF files were dropped without a word; a JSONL caption that is a list became its Python repr; a
    16-bit grey PNG's colour key was not transparent; image_format with resolution=null was silently ignored."""
    root = tmp_path / "in"
    root.mkdir()
    for name, fmt in (("a.png", "PNG"), ("b.gif", "GIF"), ("c.tif", "TIFF"), ("d.tiff", "TIFF")):
        Image.new("RGB", (40, 40), (0, 90, 0)).save(root / name, fmt)
        (root / f"{name.split('.')[0]}.txt").write_text(f"caption {name}")
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "out"), "val_samples": 0,
                   "resolution": 16})
    written = {json.loads(s["json"])["source_path"] for s in read_split(tmp_path / "out", "train")}
    assert written == {"a.png", "b.gif", "c.tif", "d.tiff"}

    manifest = tmp_path / "list.jsonl"
    manifest.write_text('{"file": "a.png", "caption": ["a dog", "a cat"]}\n')
    with pytest.raises(ConfigError, match=r"row 0: the path and the caption must be text, got str 'a.png' and list"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o2"),
                       "captions": str(manifest), "val_samples": 0})
    # an unquoted comma in a CSV caption cut it short ("a cat"); the line number of a bad .jsonl line was always 1
    (tmp_path / "list.csv").write_text("path,caption\na.png,a cat, sitting on a mat\n")
    with pytest.raises(ConfigError, match=r"row 0: more fields than the header's \['caption', 'path'\] \(extra: "
                                          r"\[' sitting on a mat'\]\); quote a caption that holds a comma"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o2"),
                       "captions": str(tmp_path / "list.csv"), "val_samples": 0})
    (tmp_path / "list.csv").write_text("path,caption\na.png,a cat,\nb.gif,a dog\nc.tif,x\nd.tiff,y\n")  # trailing comma
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o4"),
                   "captions": str(tmp_path / "list.csv"), "val_samples": 0, "resolution": 16})
    manifest.write_text('{"file": "a.png", "caption": "a"}\n\n{"file": "b.gif" "caption": "b"}\n')
    with pytest.raises(ConfigError, match=r"list\.jsonl: line 3 is not JSON \(Expecting ',' delimiter\)"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o2"),
                       "captions": str(manifest), "val_samples": 0})
    # a caption holding U+2028 (json.dumps(ensure_ascii=False) writes it as it is) is one line, not two
    manifest.write_text("".join(json.dumps({"file": name, "caption": f"a\u2028{name}"}, ensure_ascii=False) + "\n"
                                for name in ("a.png", "b.gif", "c.tif", "d.tiff")), encoding="utf-8")
    write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o5"),
                   "captions": str(manifest), "val_samples": 0, "resolution": 16})
    assert {s["txt"].decode() for s in read_split(tmp_path / "o5", "train")} == {"a\u2028a.png", "a\u2028b.gif",
                                                                                 "a\u2028c.tif", "a\u2028d.tiff"}
    array = tmp_path / "list.json"  # a damaged array is named at its line (it was reported as line 1)
    array.write_text('[\n  {"file": "a.png", "caption": "a"},\n  {"file": "b.gif" "caption": "b"}\n]\n')
    with pytest.raises(ConfigError, match=r"list\.json: line 3 is not JSON \(Expecting ',' delimiter\)"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o6"),
                       "captions": str(array), "val_samples": 0})
    with pytest.raises(ConfigError, match="image_format=jpg .* ignored with resolution=null"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o3"),
                       "resolution": None, "image_format": "jpg"})

    from ldm.images import decode_image

    key = io.BytesIO()
    grey = np.full((4, 4), 1000, np.uint16)
    grey[0, 0] = 30000
    Image.fromarray(grey).save(key, "PNG", transparency=1000)
    decoded = np.asarray(decode_image(key.getvalue()))
    assert decoded[1, 1].tolist() == [255, 255, 255] and decoded[0, 0].tolist() == [117, 117, 117]

    from ldm.data.stream import SkipLog, caption_and_label
    from ldm.eval.sources import readable_caption

    # A shard written by another tool (img2dataset, by hand) whose caption starts with a byte order mark.
    assert caption_and_label({"txt": "\ufeffa bom".encode()}, SkipLog()) == ("a bom", None)
    assert readable_caption({"txt": "\ufeffa bom".encode()}) == "a bom"  # ldm-eval's prompts
    # Captions kept in metadata only (KEY.json's caption or text, no KEY.txt) trained as "" (warned "no caption").
    meta = json.dumps({"caption": " a cat ", "label": 3}).encode()
    assert caption_and_label({"json": meta}, SkipLog()) == ("a cat", 3)
    assert caption_and_label({"json": json.dumps({"text": "a dog"}).encode()}, SkipLog()) == ("a dog", None)
    assert caption_and_label({"txt": b"its own", "json": meta}, SkipLog()) == ("its own", 3)  # KEY.txt first
    assert readable_caption({"json": meta}) == "a cat"  # ldm-eval's prompts, as training reads them
    skips = SkipLog()  # no caption string in the metadata: "" and counted
    assert caption_and_label({"json": b'{"caption": 5}', "__key__": "a"}, skips) == ("", None)
    assert caption_and_label({"json": b'["a cat"]', "__key__": "b"}, skips) == ("", None)
    assert caption_and_label({"json": b'{"caption": "  "}', "__key__": "c"}, skips) == ("", None)  # empty: none
    assert [key for _, key in skips.uncaptioned] == ["a", "b", "c"]
    assert caption_and_label({"json": b'{"caption": "", "text": "a fox"}'}, SkipLog()) == ("a fox", None)
    # a cut-off emoji escape: a lone surrogate, which no UTF-8 encoder writes (the contrastive run, ldm-eval's prompt
    # hash and ldm-data's shards failed on it), read as "?" as the byte tokenizer reads it
    assert caption_and_label({"json": b'{"caption": "a square \\ud83d"}'}, SkipLog()) == ("a square ?", None)
    assert readable_caption({"json": b'{"caption": "a square \\ud83d"}'}) == "a square ?"



def test_folder_validation_is_a_random_draw_of_decodable_images(tmp_path: Path):
    """The val split was written back in listing order (one class folder after another: the first N captions an
    evaluation takes, e.g. FID at num_samples=N, were all one class's), and an undecodable image drawn for val was
    dropped without replacement (val shorter than val_samples, at worst no val shard at all)."""
    root = tmp_path / "in"
    for folder in ("a_cats", "b_dogs", "c_owls"):
        for i in range(8):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(root / folder / f"{i}.png")
            (root / folder / f"{i}.txt").write_text(f"a photo of {folder[2:]}")
    for i in range(4):
        (root / "a_cats" / f"bad{i}.png").write_bytes(b"not a png")
        (root / "a_cats" / f"bad{i}.txt").write_text("a photo of cats")
    for seed in range(4):
        out = tmp_path / f"out{seed}"
        summary = write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(out), "seed": seed,
                                 "val_samples": 9, "resolution": 16})
        assert summary["splits"]["val"]["count"] == 9 and summary["splits"]["train"]["count"] == 15, seed
        assert len(summary["skipped"]) == 4
        captions = [sample["txt"].decode() for sample in read_split(out, "val")]
        assert len(set(captions[:4])) > 1, f"seed {seed}: the first val samples are one class's: {captions}"
    with pytest.raises(ConfigError, match=r"val_samples=24 took all 24 images of input_dir=.* that could be read \(4 "
                                          r"could not, e\.g\. .*leaving none for training: lower val_samples"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "all"),
                       "val_samples": 24, "resolution": 16})


def test_rewriting_class_shards_that_number_the_classes_otherwise_is_warned(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture):
    root = tmp_path / "in"
    for folder in ("a", "c"):
        (root / folder).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(root / folder / f"{i}.png")
    (root / "stray.HEIC").write_bytes(b"not read")  # in input_dir itself: no class named after it
    (root / "bb").mkdir()  # images whose captions cannot be read: skipped, the class kept (c was renumbered when
    Image.new("RGB", (8, 8)).save(root / "bb" / "0.png")  # they were re-saved as UTF-8)
    (root / "bb" / "0.txt").write_bytes("caf\xe9".encode("latin-1"))
    config = {"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "out"), "labels": "folders",
              "val_samples": 1, "resolution": 8}
    assert write_dataset(config)["classes"] == ["a", "bb", "c"]
    shutil.copytree(root / "a", root / "b")
    with caplog.at_level("WARNING"):
        assert write_dataset({**config, "overwrite": True})["classes"] == ["a", "b", "bb", "c"]
    assert "number the classes otherwise than the ones they replace (3 classes, then 4; moved: {'bb': (1, 2), " \
        "'c': (2, 3)}" in caplog.text


def test_class_folders_give_labels_and_sidecars_match_in_any_case(tmp_path: Path):
    """`labels=folders` labels each image by its top-level subfolder (ImageNet's layout; the folder source wrote no
    label, so a class-conditional model could not train on its shards); a KEY.TXT sidecar was not found."""
    root = tmp_path / "in"
    for label, folder in enumerate(("n01", "n02", "n03")):
        for i in range(3):
            (root / folder / "deeper").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 16), (label * 80, i, 0)).save(root / folder / ("deeper" if i else "") / f"{i}.png")
    Image.new("RGB", (16, 16)).save(root / "n02" / "UPPER.JPEG")
    (root / "n02" / "UPPER.TXT").write_text("an upper-case caption")
    # what unzipping a Mac-made zip leaves: __MACOSX was class 0 and shifted every label; and a phone's HEIC export
    (root / "__MACOSX" / "n01").mkdir(parents=True)
    (root / "__MACOSX" / "n01" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "n01" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "n03" / "IMG_0001.HEIC").write_bytes(b"not read")
    (root / "n03" / ".Trash").mkdir()
    Image.new("RGB", (16, 16)).save(root / "n03" / ".Trash" / "0.png")
    # a class folder of HEIC files alone, which ldm-data does not read: it keeps its index (n04 was class 3 or 4
    # depending on whether n035's files were converted yet: a model sampled by the other numbering drew other classes)
    (root / "n035").mkdir()
    (root / "n035" / "IMG_0002.HEIC").write_bytes(b"not read")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "n04.png")
    (root / "n04").mkdir()
    (root / "n04.png").rename(root / "n04" / "0.png")
    (root / "a_notes").mkdir()  # a folder of other files is no class (nor the shards written inside input_dir)
    (root / "a_notes" / "readme.txt").write_text("about the classes")
    summary = write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "out"),
                             "labels": "folders", "val_samples": 2, "resolution": 16})
    assert summary["classes"] == ["n01", "n02", "n03", "n035", "n04"] and len(summary["missing_captions"]) == 10
    inside = write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(root / "shards"),
                            "labels": "folders", "val_samples": 2, "resolution": 16})
    assert inside["classes"] == summary["classes"]
    shutil.rmtree(root / "a_notes")
    shutil.rmtree(root / "shards")
    assert [(entry["path"], entry["reason"].split(" ")[0]) for entry in summary["skipped"]] == [
        ("__MACOSX", "hidden"), ("n01/._0.png", "hidden"), ("n03/.Trash", "hidden"), ("n03/IMG_0001.HEIC", ".HEIC"),
        ("n035/IMG_0002.HEIC", ".HEIC")]
    shutil.rmtree(root / "n035")
    shutil.rmtree(root / "n04")
    shutil.rmtree(root / "__MACOSX")
    shutil.rmtree(root / "n03" / ".Trash")
    (root / "n01" / "._0.png").unlink()
    (root / "n03" / "IMG_0001.HEIC").unlink()
    samples = read_split(tmp_path / "out", "train") + read_split(tmp_path / "out", "val")
    meta = {json.loads(s["json"])["source_path"]: (json.loads(s["json"])["label"], s["txt"].decode())
            for s in samples}
    assert meta == {**{f"{folder}/{'deeper/' if i else ''}{i}.png": (label, "")
                       for label, folder in enumerate(("n01", "n02", "n03")) for i in range(3)},
                    "n02/UPPER.JPEG": (1, "an upper-case caption"), "n04/0.png": (4, "")}
    # a link to a class folder that sorts before it: the link is the duplicate, the folder keeps its name and label
    # (the folder was left out as "a link to a directory already listed", its class named after the link: every
    # label shifted)
    (root / "a_alias_n02").symlink_to(root / "n02", target_is_directory=True)
    summary = write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "aliased"),
                             "labels": "folders", "val_samples": 2, "resolution": 16})
    assert summary["classes"] == ["n01", "n02", "n03"]
    assert [(entry["path"], entry["reason"].split(" (")[0]) for entry in summary["skipped"]] == [
        ("a_alias_n02", "link to a directory already listed")]
    (root / "a_alias_n02").unlink()
    Image.new("RGB", (16, 16)).save(root / "loose.png")
    with pytest.raises(ConfigError, match=r"labels=folders: 1 images lie in input_dir itself, outside any class "
                                          r"subfolder \(e\.g\. \['loose\.png'\]\)"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o2"),
                       "labels": "folders", "val_samples": 2})
    with pytest.raises(ConfigError, match=r"labels='classes' is not allowed; choose one of \['folders'\]"):
        write_dataset({"source": "folder", "input_dir": str(root), "output_dir": str(tmp_path / "o2"),
                       "labels": "classes"})
    with pytest.raises(ConfigError, match=r"labels=folders would be ignored with source=shapes"):
        write_dataset({"output_dir": str(tmp_path / "o2"), "labels": "folders"})


def test_settings_that_would_act_otherwise_than_asked_are_refused(shapes_shards: Path, tmp_path: Path):
    """jpeg_quality=-5 wrote quality 1 and recorded -5; with PNG it was ignored. A loose shard glob (`data/shapes/*`)
    trained on the validation shard and counted summary.json as an empty shard."""
    from ldm.data.shardlist import expand_shards

    with pytest.raises(ConfigError, match=r"jpeg_quality=-5 must lie in \[1, 100\]"):
        write_dataset({"output_dir": str(tmp_path / "a"), "image_format": "jpg", "jpeg_quality": -5})
    with pytest.raises(ConfigError, match=r"jpeg_quality=50 applies to image_format=jpg; this run writes png"):
        write_dataset({"output_dir": str(tmp_path / "a"), "jpeg_quality": 50})
    with pytest.raises(ConfigError, match=r"data\.train_shards=.*/\*' matches files that are not tar shards "
                                          r"\(\[.*summary\.json'\]\): narrow the pattern .* e\.g\. .*/train-\*\.tar"):
        expand_shards(f"{shapes_shards}/*", "data.train_shards")
    assert expand_shards(f"{shapes_shards}/*.tar", "data.train_shards") == sorted(
        str(p) for p in shapes_shards.glob("*.tar"))
    # a folder or file whose name holds glob characters (a sweep's `lr[1e-3]`) is taken as named, not as a pattern
    bracketed = tmp_path / "lr[1e-3]"
    shutil.copytree(shapes_shards, bracketed)
    train = sorted(str(p) for p in bracketed.glob("train-*.tar"))
    assert expand_shards(str(bracketed), "data.train_shards") == train
    assert expand_shards(f"{bracketed}/train-*.tar", "data.train_shards") == train  # the documented form
    assert expand_shards(f"{tmp_path}/lr[[]1e-3]/train-*.tar", "data.train_shards") == train  # escaped by hand
    (bracketed / "seed0").mkdir()
    shutil.copy(train[0], bracketed / "seed0")
    assert expand_shards(f"{bracketed}/seed*/train-*.tar", "data.train_shards") == [
        str(bracketed / "seed0" / Path(train[0]).name)]  # a glob below the bracketed folder
    assert expand_shards(str(train[0]), "data.train_shards") == [train[0]]
    assert expand_shards(f"{shapes_shards}/train-00000[0-9].tar", "data.train_shards") == sorted(
        str(p) for p in shapes_shards.glob("train-*.tar"))  # a character class in the name is still one
    # shards of every compressed kind and letter case match as tars (a glob of .tar.xz shards was refused as "not tar
    # shards", naming a pattern that matched nothing); a file named in a list that is no tar at all, and a directory
    # a glob matches, are refused naming them (they were read as damaged tars of 0 samples, and ldm-encode wrote a
    # latent shard for each)
    packed = tmp_path / "packed"
    packed.mkdir()
    for name in ("train-000000.tar.xz", "train-000001.TAR", "train-000002.tar.bz2"):
        shutil.copy(train[0], packed / name)
    assert [Path(u).name for u in expand_shards(f"{packed}/train-*", "data.train_shards")] == [
        "train-000000.tar.xz", "train-000001.TAR", "train-000002.tar.bz2"]
    (tmp_path / "notes.txt").write_text("not a shard")
    shutil.copy(train[0], tmp_path / "shard-without-suffix")  # a tar by its content: taken
    assert expand_shards(f"{train[0]}::{tmp_path}/shard-without-suffix", "k")[1].endswith("shard-without-suffix")
    with pytest.raises(ConfigError, match=r"notes\.txt is no tar shard \(it does not open as a tar"):
        expand_shards([train[0], str(tmp_path / "notes.txt")], "data.train_shards")
    (packed / "train-000003.tar").mkdir()
    with pytest.raises(ConfigError, match=r"train-000003\.tar is a directory, not a tar shard"):
        expand_shards(f"{packed}/train-*", "data.train_shards")
    # a glob of tars named otherwise is taken by content; a compressed file that holds no tar is none
    (tmp_path / "noext").mkdir()
    for i in range(2):
        shutil.copy(train[0], tmp_path / "noext" / f"part-{i}")
    assert len(expand_shards(f"{tmp_path}/noext/part-*", "data.train_shards")) == 2
    # beside a file that is none, the fix names a pattern that takes these tars (it named `train-*.tar`, which matched
    # nothing here), and none that would take that file too
    (tmp_path / "noext" / "index.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"\(\[.*index\.json'\]\): narrow the pattern to the shards, e\.g\. "
                                          + re.escape(f"{tmp_path}/noext/part-*") + "$"):
        expand_shards(f"{tmp_path}/noext/*", "data.train_shards")
    (tmp_path / "noext" / "part-index").write_text("{}")
    with pytest.raises(ConfigError, match=r"\(\[.*part-index'\]\): narrow the pattern to the shards$"):
        expand_shards(f"{tmp_path}/noext/*", "data.train_shards")
    for folder in ("nested/a", "nested/b"):  # the pattern's folder part kept (it named the first tar's folder alone)
        (tmp_path / folder).mkdir(parents=True)
        shutil.copy(train[0], tmp_path / folder / f"0000{folder[-1]}.tar")
        (tmp_path / folder / f"0000{folder[-1]}.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(f"narrow the pattern to the shards, e.g. {tmp_path}/nested/*/0000*"
                                                    ".tar") + "$"):
        expand_shards(f"{tmp_path}/nested/*/*", "data.train_shards")
    with pytest.raises(ConfigError, match=r"narrow the pattern to the shards$"):  # braces: no one expansion's fix
        expand_shards(f"{tmp_path}/nested/{{a,b}}/*", "data.train_shards")
    (tmp_path / "i2d").mkdir()  # a pattern that picks some of a folder's tars: the fix stays within them
    for i in range(12):
        shutil.copy(train[0], tmp_path / "i2d" / f"{i:05d}.tar")
        (tmp_path / "i2d" / f"{i:05d}.json").write_text("{}")
    with pytest.raises(ConfigError, match=re.escape(f"e.g. {tmp_path}/i2d/0000*.tar") + "$"):
        expand_shards(f"{tmp_path}/i2d/0000*", "data.train_shards")
    (tmp_path / "mixed").mkdir()  # .tar, .tar.gz and .tgz shards: the fix takes them all (`*.tar` left the others
    # out, `*.tar*` the .tgz, and took a .tar.md5)
    for i in range(3):
        shutil.copy(train[0], tmp_path / "mixed" / f"{i:05d}.tar")
        (tmp_path / "mixed" / f"{i:05d}_stats.json").write_text("{}")
    (tmp_path / "mixed" / "00003.tar.gz").write_bytes(gzip.compress(Path(train[0]).read_bytes()))
    (tmp_path / "mixed" / "00004.tgz").write_bytes(gzip.compress(Path(train[0]).read_bytes()))
    (tmp_path / "mixed" / "00000.tar.md5").write_text("0")
    fix = f"{tmp_path}/mixed/*.tar::{tmp_path}/mixed/*.tar.gz::{tmp_path}/mixed/*.tgz"
    with pytest.raises(ConfigError, match=re.escape(f"e.g. {fix}") + "$"):
        expand_shards(f"{tmp_path}/mixed/*", "data.train_shards")
    assert len(expand_shards(fix, "data.train_shards")) == 5  # (the fix takes every tar, and nothing else)
    (tmp_path / "notes.json.gz").write_bytes(gzip.compress(b'{"not": "a tar"}'))
    with pytest.raises(ConfigError, match=r"notes\.json\.gz is no tar shard"):
        expand_shards(str(tmp_path / "notes.json.gz"), "data.train_shards")
    # ldm-encode names its outputs after any tar suffix, in any case, and sees such image shards in its output_dir
    # (it wrote x.tar.bz2.tar and a manifest beside them, and the image shards read as latents from then on)
    assert [shard_name(n) for n in ("a.tar.bz2", "b.TAR", "c.tgz", "d")] == ["a.tar", "b.tar", "c.tar",
                                                                                    "d.tar"]
    assert image_shards_in(packed).name == "train-000000.tar.xz"


def test_a_shard_named_twice_is_refused_naming_both_patterns(shapes_shards: Path, tmp_path: Path):
    """A glob plus a list naming one of its shards again read that shard's samples twice an epoch (and weighted it
    twice in validation), without a word: the same file by a link, and a remote URL given twice, alike."""
    from ldm.data.shardlist import expand_shards

    with pytest.raises(ConfigError, match=rf"data\.train_shards: {shapes_shards}/train-000002\.tar is named twice, "
                                          rf"by '{shapes_shards}/train-\*\.tar' and by "
                                          rf"'{shapes_shards}/train-000002\.tar': its samples would be read twice an "
                                          rf"epoch; name each shard once"):
        expand_shards(f"{shapes_shards}/train-*.tar::{shapes_shards}/train-000002.tar", "data.train_shards")
    (tmp_path / "link.tar").symlink_to(shapes_shards / "train-000001.tar")
    with pytest.raises(ConfigError, match=r"train-000001\.tar and .*/link\.tar are the same file, by "):
        expand_shards([f"{shapes_shards}/train-00000[0-1].tar", str(tmp_path / "link.tar")], "data.train_shards")
    with pytest.raises(ConfigError, match=r"pipe:cat a\.tar is named twice, by 'pipe:cat a\.tar' and by 'pipe:cat "
                                          r"a\.tar'"):
        expand_shards("pipe:cat {a,b,a}.tar", "data.train_shards")
    assert len(expand_shards([f"{shapes_shards}/train-00000[0-1].tar", f"{shapes_shards}/train-00000[2-3].tar"],
                             "data.train_shards")) == 4


def test_a_folder_of_img2dataset_shards_is_named_with_a_pattern_that_matches(shapes_shards: Path, tmp_path: Path):
    """img2dataset names its shards 00000.tar: the folder (which stands for train-*.tar) and a loose glob were
    refused with a fix naming train-*.tar, which matched nothing there."""
    from ldm.data.shardlist import expand_shards

    folder = tmp_path / "i2d"
    folder.mkdir()
    for i in range(2):
        shutil.copy(shapes_shards / f"train-00000{i}.tar", folder / f"0000{i}.tar")
        (folder / f"0000{i}_stats.json").write_text('{"successes": 16}')
    fix = re.escape(f"e.g. {pasteable({'data.train_shards': f'{folder}/*.tar'})}")  # (quoted for Hydra where needed)
    with pytest.raises(FileNotFoundError, match=r"a folder stands for the train-\*\.tar shards ldm-data writes, and "
                                                rf".* holds none but 2 other tar shards \(e\.g\. 00000\.tar\): name "
                                                rf"them, {fix}"):
        expand_shards(str(folder), "data.train_shards")
    with pytest.raises(ConfigError, match=re.escape(f"narrow the pattern to the shards, e.g. {folder}/*.tar")):
        expand_shards(f"{folder}/*", "data.train_shards")
    assert expand_shards(f"{folder}/*.tar", "data.train_shards") == [str(folder / f"0000{i}.tar") for i in range(2)]
    gz = tmp_path / "gz"  # the example has the suffix the shards have
    gz.mkdir()
    (gz / "00000.tar.gz").write_bytes(gzip.compress((shapes_shards / "train-000000.tar").read_bytes()))
    gz_fix = pasteable({"data.train_shards": f"{gz}/*.tar.gz"})
    with pytest.raises(FileNotFoundError, match=re.escape(f"e.g. {gz_fix}")):
        expand_shards(str(gz), "data.train_shards")
    accented = tmp_path / "Données"  # pasted as given (in Hydra's quotes too: the shell's alone were refused)
    accented.mkdir()
    shutil.copy(shapes_shards / "train-000000.tar", accented / "00000.tar")
    with pytest.raises(FileNotFoundError, match=re.escape(f"""e.g. 'data.train_shards="{accented}/*.tar"'""")):
        expand_shards(str(accented), "data.train_shards")
    shutil.copy(shapes_shards / "val-000000.tar", folder)  # beside img2dataset's shards: not to train on
    with pytest.raises(FileNotFoundError, match=r"holds none but 2 other tar shards \(e\.g\. 00000\.tar\): move the "
                                                r"val-\*\.tar shards to a folder of their own, then name them"):
        expand_shards(str(folder), "data.train_shards")
    val_only = tmp_path / "val_only"  # ldm-data num_samples=0: the other split only, not shards to train on
    val_only.mkdir()
    shutil.copy(shapes_shards / "val-000000.tar", val_only)
    with pytest.raises(FileNotFoundError, match=r"val_only holds val shards only \(1\), no train-\*\.tar: name the "
                                                r"folder of the train split$"):
        expand_shards(str(val_only), "data.train_shards")
    # asked for val shards, a folder of train shards only: FID against the train split is a protocol of its own
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    shutil.copy(shapes_shards / "train-000000.tar", train_only)
    train_fix = pasteable({"reference_shards": f"{train_only}/train-*.tar"})
    with pytest.raises(FileNotFoundError, match=re.escape(f"holds train shards only (1), no val-*.tar: name the "
                                                          f"folder of the val split, or the train shards themselves "
                                                          f"where you mean them: {train_fix}")):
        expand_shards(str(train_only), "reference_shards", split="val")


def test_a_relative_shard_path_through_a_symlink_keeps_its_dotdot(shapes_shards: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """`cur/../*.tar` with `cur` a link into another folder: made absolute as text (`os.path.abspath`) the `..` went
    away and the path named a file that does not exist."""
    from ldm.data.shardlist import expand_shards

    (tmp_path / "real" / "sub").mkdir(parents=True)
    shutil.copy(shapes_shards / "train-000000.tar", tmp_path / "real")
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "cur").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path / "work")
    (url,) = expand_shards("cur/../*.tar", "data.train_shards")
    assert os.path.isabs(url) and os.path.samefile(url, tmp_path / "real" / "train-000000.tar")


def test_a_local_shard_named_like_a_command_is_read_not_run(shapes_shards: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    """A relative glob's match `pipe:touch X;cat t.tar;.tar` was handed to webdataset as is, which ran it as a
    shell command: local shards come back absolute."""
    import webdataset as wds

    from ldm.data.shardlist import expand_shards

    name = "pipe:touch PWNED;cat train-000000.tar;.tar"
    shutil.copy(shapes_shards / "train-000000.tar", tmp_path / name)
    monkeypatch.chdir(tmp_path)
    urls = expand_shards("*.tar", "data.train_shards")
    assert urls == [str(tmp_path / name)]
    assert len(list(wds.tarfile_to_samples()(iter([{"url": urls[0]}])))) > 0  # as the training stream reads them
    assert not (tmp_path / "PWNED").exists()


def test_a_validation_only_shapes_set_is_written_and_a_refused_folder_run_leaves_no_folder(tmp_path: Path):
    summary = write_dataset({"source": "shapes", "output_dir": str(tmp_path / "val_only"), "num_samples": 0,
                             "val_samples": 4, "resolution": 16})
    assert summary["splits"]["train"]["count"] == 0 and summary["splits"]["val"]["count"] == 4
    unreadable = tmp_path / "in"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"not a png")
    (unreadable / "a.txt").write_text("a caption")
    with pytest.raises(ConfigError, match="no training image of input_dir="):
        write_dataset({"source": "folder", "input_dir": str(unreadable), "output_dir": str(tmp_path / "out"),
                       "val_samples": 0, "resolution": 16})
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="no training image of input_dir="):  # its parents were left behind
        write_dataset({"source": "folder", "input_dir": str(unreadable), "output_dir": str(tmp_path / "n" / "a" / "b"),
                       "val_samples": 0, "resolution": 16})
    assert not (tmp_path / "n").exists()
