"""Write WebDataset tar shards in the img2dataset convention, from the `shapes` generator or a folder of images.

A sample is three tar members sharing a key: `KEY.png` (or `.jpg`), `KEY.txt` (the caption) and `KEY.json`
(metadata). Shards are `train-000000.tar, train-000001.tar, ...` and `val-000000.tar, ...`; `summary.json` beside
them records the count of each split and each shard, the resolution, the source and the seed. The datamodule reads the
per-shard counts from it to give every DDP rank the same number of batches.

    ldm-data source=shapes output_dir=data/shapes num_samples=50000 val_samples=1000 resolution=32
    ldm-data source=folder input_dir=my_images output_dir=data/mine resolution=256 val_samples=500
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import logging
import os
import random
import re
import shutil
import stat
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from ldm.cli.run_lock import run_lock
from ldm.config import ConfigError, check_choice, check_output_dir, expand_home
from ldm.data import shapes
from ldm.data.latents import MANIFEST_NAME
from ldm.data.stream import CAPTION_FIELDS, resize_crop, resize_shorter, utf8_text
from ldm.images import decode_image
from ldm.io import atomic_write_text
from ldm.seeding import fold_seed

log = logging.getLogger(__name__)

SOURCES = ("shapes", "folder")
IMAGE_FORMATS = ("png", "jpg")
LABELS = ("folders",)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # GIF: frame 1
# Images in a format the readers do not open (listed as left out, not passed over in silence): convert them.
OTHER_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".jxl", ".jp2", ".svg", ".psd", ".ico", ".tga", ".exr", ".ppm",
                          ".pgm", ".pbm", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".raf", ".rw2")
MEMBER_EXTENSIONS = {".jpeg": "jpg", ".jpe": "jpg", ".jfif": "jpg"}  # a stored file's tar member: not its suffix
SUMMARY_NAME = "summary.json"
SHARD_NAME = re.compile(r"(train|val)-\d{6,}\.tar")  # what ldm-data writes (`{split}-%06d.tar`), and replaces
# Column / field names accepted in a CSV or JSONL caption manifest.
PATH_FIELDS = ("file", "path", "filename", "image")
# Every tar member's mtime: a whole number keeps each member to one 512-byte ustar header (webdataset's default, the
# float time.time(), adds a PAX header per member, which made reading latent shards 1.6x slower) and makes the shards
# the same bytes whenever they are written again from the same inputs.
MEMBER_MTIME = 0


@dataclass
class WriteConfig:
    """What `ldm-data` writes (conf/data.yaml documents every key)."""

    source: str = "shapes"  # shapes | folder
    output_dir: str | None = None  # required: where shards and summary.json go
    input_dir: str | None = None  # folder source: the images (searched recursively)
    captions: str | None = None  # folder source: a .csv or .jsonl manifest; null reads sidecar KEY.txt files
    allow_missing_captions: bool = False  # folder source: an image without a caption gets "" instead of an error
    labels: str | None = None  # folder source: `folders` gives each image the integer label of its top-level
    #                            subfolder (class folders, as ImageNet's; sorted names, indices in summary.json's
    #                            `classes`), for class-conditional models; captions are then optional
    num_samples: int = 10000  # shapes: training samples (folder: every image not in val is written)
    val_samples: int = 1000  # validation samples (folder: taken from the folder, deterministic given seed)
    resolution: int | None = 32  # image side; folder: null stores images as they are
    crop: bool = True  # folder: centre-crop to a square; false keeps the aspect (shorter side = resolution, the long
    #                    side at most 4x it), for random crops in training (data.random_crop=true)
    sizes: list[str] | None = None  # shapes: the size words to draw from (e.g. [large]); null: all
    positions: list[str] | None = None  # shapes: the position words to draw from (e.g. [center]); null: all
    scale: float = 1.0  # shapes: multiplies every radius (checked to fit the positions)
    holdout: list[str] = field(default_factory=list)  # shapes: train captions containing any of these are not drawn
    seed: int = 0
    samples_per_shard: int = 1000
    image_format: str = "png"  # png (lossless) | jpg
    jpeg_quality: int = 95
    overwrite: bool = False  # replace existing shards in output_dir

    def __post_init__(self) -> None:
        check_choice("source", self.source, SOURCES)
        check_choice("image_format", self.image_format, IMAGE_FORMATS)
        if self.labels is not None:
            check_choice("labels", self.labels, LABELS)
        if not 1 <= self.jpeg_quality <= 100:  # PIL clamps: -5 wrote quality 1, recorded as -5
            raise ConfigError(f"jpeg_quality={self.jpeg_quality} must lie in [1, 100]")
        if self.image_format != "jpg" and self.jpeg_quality != 95:
            raise ConfigError(f"jpeg_quality={self.jpeg_quality} applies to image_format=jpg; this run writes "
                              f"{self.image_format}: leave jpeg_quality out")
        if not self.output_dir:
            raise ConfigError("output_dir is required: the directory to write shards into, e.g. output_dir=data/shapes")
        self.output_dir = check_output_dir("output_dir", self.output_dir)
        self.input_dir, self.captions = expand_home(self.input_dir), expand_home(self.captions)
        if self.source == "folder" and not self.input_dir:
            raise ConfigError("source=folder needs input_dir=DIR, the folder of images to write into shards")
        # note: a key of the other source would be ignored; a user who sets it expects it to act
        other = ({"input_dir": None, "captions": None, "allow_missing_captions": False, "labels": None}
                 if self.source == "shapes"
                 else {"sizes": None, "positions": None, "scale": 1.0, "holdout": [], "num_samples": 10000})
        if self.source == "shapes":
            other["crop"] = True
        ignored = [f"{k}={getattr(self, k)}" for k, unset in other.items() if getattr(self, k) != unset]
        if ignored:
            what = "a folder of images" if self.source == "shapes" else "the synthetic shapes data"
            raise ConfigError(f"{', '.join(ignored)} would be ignored with source={self.source} (they describe "
                              f"{what}); leave them out")
        unused = [f"{key}={value}" for key, value, unset in (("image_format", self.image_format, "png"),
                                                            ("jpeg_quality", self.jpeg_quality, 95),
                                                            ("crop", self.crop, True)) if value != unset]
        if self.resolution is None and unused:
            raise ConfigError(f"{', '.join(unused)} would be ignored with resolution=null, which stores each file's "
                              f"bytes as they are; leave them out, or give a resolution")
        if self.source == "shapes" and self.resolution is None:
            raise ConfigError("source=shapes needs an integer resolution (e.g. resolution=32)")
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(f"resolution={self.resolution} must be >= 8 (or null for folder images as they are)")
        try:
            shapes.check_layout(self.sizes, self.positions, self.scale)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.samples_per_shard < 1:
            raise ConfigError(f"samples_per_shard={self.samples_per_shard} must be >= 1")
        if self.num_samples < 0 or self.val_samples < 0:
            raise ConfigError(f"num_samples={self.num_samples} and val_samples={self.val_samples} must be >= 0")
        if self.source == "shapes" and self.num_samples + self.val_samples == 0:
            raise ConfigError("num_samples=0 and val_samples=0 would write no shards; e.g. num_samples=4000 "
                              "val_samples=200")


@dataclass
class Record:
    """One sample to write: an image (PIL, or encoded bytes with their extension kept as-is), caption, metadata."""

    key: str
    caption: str
    metadata: dict[str, Any]
    image: Image.Image | None = None
    encoded: tuple[bytes, str] | None = None  # (bytes, "png" | "jpg" | ...) stored unchanged


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if image_format == "png":
        image.save(buf, format="PNG", compress_level=1)  # fast; shards of small images are dominated by headers
    else:
        image.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
    return buf.getvalue()


def write_split(records: Iterable[Record], output_dir: Path, split: str, cfg: WriteConfig) -> dict[str, Any]:
    """Write `records` as `{split}-%06d.tar` shards; return {"count", "shards", "shard_counts"}.

    An OSError while writing (a full disk) is raised again naming the shard being written.
    """
    counts: dict[str, int] = {}  # shard name -> samples, in writing order
    writer: wds.ShardWriter | None = None
    try:
        for record in records:
            if writer is None:  # opened lazily: an empty split writes no empty shard
                writer = wds.ShardWriter(str(output_dir / f"{split}-%06d.tar"), maxcount=cfg.samples_per_shard,
                                         maxsize=float("inf"), verbose=0, mtime=MEMBER_MTIME)
            if record.encoded is not None:
                data, ext = record.encoded
            else:
                ext = cfg.image_format
                data = encode_image(record.image, ext, cfg.jpeg_quality)
            writer.write({"__key__": record.key, ext: data, "txt": record.caption,
                          "json": json.dumps(record.metadata, sort_keys=True)})
            name = Path(writer.fname).name
            counts[name] = counts.get(name, 0) + 1
        if writer is not None:
            writer.close()
    except OSError as err:
        shard = getattr(writer, "fname", None) or str(output_dir)
        _close_quietly(writer)
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror, shard) from err  # note: a failed tar write does not name its file
    except BaseException:
        _close_quietly(writer)
        raise
    return {"count": sum(counts.values()), "shards": list(counts), "shard_counts": list(counts.values())}


def _close_quietly(writer: wds.ShardWriter | None) -> None:
    """Close `writer` on an error path; a second error (the same full disk) must not hide the first."""
    if writer is not None:
        try:
            writer.close()
        except OSError:
            pass


def shapes_records(cfg: WriteConfig, num_samples: int, split: str) -> Iterator[Record]:
    dataset = shapes.ShapesDataset(num_samples, cfg.resolution, cfg.seed, split, cfg.sizes, cfg.positions, cfg.scale,
                                   cfg.holdout)
    for index, sample in enumerate(dataset):
        yield Record(key=f"{index:09d}", caption=sample["caption"], metadata=sample["metadata"], image=sample["image"])


# ----------------------------------------------------------------------------------------------------------------------
# Folder source.


def _json_line(line: str, number: int, path: Path) -> Any:
    """Line `number` of the .jsonl manifest `path`, parsed."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"captions={path}: line {number + err.lineno - 1} is not JSON ({err.msg}); a manifest holds "
                          f"one JSON object per line, or (.json) an array of them") from None


def _json_whole(text: str, path: Path) -> Any:
    """The JSON value `text` (the .json manifest `path`) holds as a whole; None when it is not one (one object per
    line, or a damaged line); a damaged array is a ConfigError naming the line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if text.lstrip().startswith("["):
            raise ConfigError(f"captions={path}: line {err.lineno} is not JSON ({err.msg}); a .json manifest holds an "
                              f"array of objects, or one object per line") from None
        return None


def _read_manifest(path: Path, input_dir: Path) -> dict[Path, str]:
    """Captions from a CSV (header with a path and a caption column), a JSONL manifest (one object per line) or a
    .json one (an array of objects, or one object per line), keyed by resolved path."""
    if not path.exists():
        raise ConfigError(f"captions={path} does not exist")
    if path.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise ConfigError(f"captions={path}: expected a .csv, .jsonl or .json manifest")
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel's "CSV UTF-8" starts with a BOM
                rows = list(csv.DictReader(f))
        else:
            with path.open(encoding="utf-8-sig") as f:
                text = f.read()
            whole = _json_whole(text, path) if path.suffix.lower() == ".json" else None
            if whole is not None:  # a JSON array of objects (or one object)
                rows = whole if isinstance(whole, list) else [whole]
            else:  # (lines end at \n alone: U+2028 and the like may stand in a caption)
                rows = [_json_line(line, number, path) for number, line in enumerate(text.split("\n"), 1)
                        if line.strip()]
    except UnicodeDecodeError as err:
        raise ConfigError(f"captions={path} is not UTF-8 text ({err.reason} at byte {err.start}); re-save it as "
                          f"UTF-8") from None
    except (csv.Error, OSError) as err:
        raise ConfigError(f"captions={path} cannot be read: {err}") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ConfigError(f"captions={path}: every line (or, in a .json file, every item of its array) must be a JSON "
                          f"object with a path and a caption field")
    captions: dict[Path, str] = {}
    repeated: list[str] = []  # paths (as written) of images listed again
    for i, row in enumerate(rows):
        extra = row.pop(None, None) or ()  # csv.DictReader's key for the fields beyond the header's
        if any(extra):  # (empty ones: a trailing comma)
            raise ConfigError(f"captions={path}, row {i}: more fields than the header's {sorted(row)} (extra: "
                              f"{extra}); quote a caption that holds a comma: \"a cat, sitting\"")
        file = next((row[k] for k in PATH_FIELDS if row.get(k)), None)
        caption = next((row[k] for k in CAPTION_FIELDS if k in row), None)
        if file is None or caption is None:
            raise ConfigError(f"captions={path}, row {i}: needs a path column {list(PATH_FIELDS)} and a caption "
                              f"column {list(CAPTION_FIELDS)}; got {sorted(row)}")
        if not (isinstance(file, str) and isinstance(caption, str)):
            raise ConfigError(f"captions={path}, row {i}: the path and the caption must be text, got "
                              f"{type(file).__name__} {file!r} and {type(caption).__name__} {str(caption)[:60]!r}")
        image = listed_path(input_dir / file)
        if image in captions and file not in repeated:
            repeated.append(file)
        captions[image] = utf8_text(caption.strip())  # as sidecars: blank is no caption
    if repeated:
        raise ConfigError(f"captions={path}: {len(repeated)} images are listed more than once (e.g. "
                          f"{repeated[:3]}; ldm-data writes one sample per image, with one caption); keep one "
                          f"row per image")
    return captions


def listed_path(path: Path) -> Path:
    """`path` with its folder resolved (links to folders followed, `./`, `..` taken out) and its own name kept (a link
    to an image is an image of its own in the listing), in Unicode's composed form (NFC): the key of an image in a
    manifest and in the listing, so that a path through a linked folder, or a name typed on one system, matches the
    file the listing found (macOS stores decomposed names)."""
    path = Path(os.path.abspath(path))
    folder = str(path.parent)
    if not os.path.isdir(folder):  # perhaps named in the other Unicode form than the disk's
        folder = next((other for form in ("NFC", "NFD") if os.path.isdir(other := unicodedata.normalize(form, folder))),
                      folder)
    return Path(nfc(os.path.join(os.path.realpath(folder), path.name)))  # (realpath: a link loop stays as named)


def nfc(name: str) -> str:
    """`name` in Unicode's composed form (`é` as one character, where macOS stores e + a combining accent)."""
    return unicodedata.normalize("NFC", name)


@dataclass
class FolderListing:
    """What `list_images` found: the image files, their sidecar caption files (image -> KEY.txt, the suffix in any
    letter case), and what it left out with the reason, as (relative path, reason)."""

    images: list[Path]
    sidecars: dict[Path, Path]
    left_out: list[tuple[str, str]]


def list_images(input_dir: Path) -> FolderListing:
    """Every regular image file under `input_dir`, recursively, in sorted (platform-independent) order.

    Links to directories are followed once, after every folder reached without one (a link to a folder walked
    already, by its own name or through another link, is a duplicate or a loop, left out: a real folder is never
    left out for a link to it that sorts first, nor named after one). Links
    that lead nowhere, link loops, unreadable directories and special files (FIFOs, sockets, devices) with an image
    extension are left out and returned with the reason: none of them may stall or abort a run.
    """
    images: list[Path] = []
    sidecars: dict[Path, Path] = {}
    left_out: list[tuple[str, str]] = []
    walked: set[Path] = set()
    linked: list[Path] = []  # links to directories, walked after the folders reached without links

    def rel(path: Path) -> str:
        return path.relative_to(input_dir).as_posix()

    def walk(directory: Path) -> None:
        real = Path(os.path.realpath(directory))
        if real in walked:
            left_out.append((rel(directory), "link to a directory already listed (a link loop or a duplicate)"))
            return
        walked.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as err:
            left_out.append((rel(directory) or ".", f"unreadable directory: {err.strerror}"))
            return
        texts: dict[str, Path] = {}  # stem (NFC) -> its .txt (any case; the lower-case one where both exist)
        for entry in entries:
            path = Path(entry.path)
            if path.suffix.lower() == ".txt" and (nfc(path.stem) not in texts or path.suffix == ".txt"):
                texts[nfc(path.stem)] = path
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith(".") or entry.name == "__MACOSX":  # hidden: `.DS_Store`, macOS' `._KEY.jpg`
                if Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS or entry.is_dir():
                    left_out.append((rel(path), "hidden file or folder, or macOS metadata (a name starting with a "
                                                "dot, or __MACOSX): not read"))
                continue
            is_image = path.suffix.lower() in IMAGE_EXTENSIONS
            if path.suffix.lower() in OTHER_IMAGE_EXTENSIONS:
                left_out.append((rel(path), f"{path.suffix} images are not read; convert it to PNG or JPEG"))
                continue
            try:
                mode = os.stat(path).st_mode  # follows links
            except OSError as err:
                if entry.is_symlink():
                    left_out.append((rel(path), "symlink loop" if err.errno == errno.ELOOP
                                     else "dangling link (its target does not exist)"))
                elif is_image:
                    left_out.append((rel(path), f"unreadable: {err.strerror}"))
                continue
            if stat.S_ISDIR(mode) and entry.is_symlink():
                linked.append(path)
            elif stat.S_ISDIR(mode):
                walk(path)
            elif is_image and not stat.S_ISREG(mode):
                left_out.append((rel(path), "special file (FIFO, socket or device), not a regular file"))
            elif is_image:
                images.append(path)
                if nfc(path.stem) in texts:
                    sidecars[path] = texts[nfc(path.stem)]

    walk(input_dir)
    while linked:  # (a linked folder's own links join the queue)
        walk(linked.pop(0))
    return FolderListing(sorted(images), sidecars, left_out)


def _undecodable(err: Exception) -> str:
    """The reason an image was left out, from its read's or decode's error (PIL's names a BytesIO object)."""
    text = "not an image format PIL reads" if isinstance(err, UnidentifiedImageError) else \
        f"{type(err).__name__}: {err}"
    return f"undecodable or unreadable image: {text}"


def _decode_error(path: Path) -> str | None:
    """Why the image at `path` cannot be read and decoded, or None when it can."""
    try:
        decode_image(path.read_bytes())
    except Exception as err:  # noqa: BLE001 -- as in folder_records
        return _undecodable(err)
    return None


class CaptionUnreadable(Exception):
    """A caption file exists but cannot be used (unreadable, not UTF-8, not a regular file); the message says why."""


def folder_records(files: list[tuple[int, Path]], plan: FolderPlan, cfg: WriteConfig) -> Iterator[Record]:
    """Records for (index, path) pairs of `plan`'s images; the key is the index in the sorted listing, so keys are
    unique across splits.

    An image that cannot be read or decoded is left out and appended to `plan.skipped` as {"path", "reason"}.
    """
    labels = {name: i for i, name in enumerate(plan.classes or ())}
    for index, path in files:
        rel = path.relative_to(plan.input_dir).as_posix()
        caption = plan.captions.get(path, "")  # missing captions were checked (or allowed) up front in plan_folder
        try:
            data = path.read_bytes()
            image = decode_image(data)  # upright (the EXIF orientation applied), from bytes as every reader
            size = image.size
            suffix = path.suffix.lower()
            encoded = (data, MEMBER_EXTENSIONS.get(suffix, suffix.lstrip("."))) if cfg.resolution is None else None
            if cfg.resolution is not None:
                image = resize_crop(image, cfg.resolution, None) if cfg.crop else \
                    resize_shorter(image, cfg.resolution)
        except Exception as err:  # noqa: BLE001 -- any unreadable or undecodable file is reported and left out
            reason = _undecodable(err)
            log.warning("skipping image %s: %s", path, reason)
            plan.skipped.append({"path": rel, "reason": reason})
            continue
        metadata = {"source_path": rel, "width": size[0], "height": size[1]}
        if labels:
            metadata["label"] = labels[rel.split("/", 1)[0]]
        if encoded is not None:
            yield Record(f"{index:09d}", caption, metadata, encoded=encoded)
        else:
            yield Record(f"{index:09d}", caption, metadata, image=image)


def _sidecar_caption(txt: Path | None) -> str | None:
    """The caption in the sidecar file `txt`, None without one; CaptionUnreadable when it cannot be used."""
    if txt is None:
        return None
    try:
        mode = os.stat(txt).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        raise CaptionUnreadable(f"caption file {txt.name}: {err.strerror}") from None
    if not stat.S_ISREG(mode):
        raise CaptionUnreadable(f"caption file {txt.name} is not a regular file (FIFO, socket or device)")
    try:
        return txt.read_bytes().decode("utf-8-sig").strip()  # -sig: Notepad's UTF-8 starts with a BOM
    except UnicodeDecodeError as err:
        raise CaptionUnreadable(f"caption file {txt.name} is not UTF-8 text ({err.reason} at byte {err.start}); "
                                f"re-save it as UTF-8") from None
    except OSError as err:
        raise CaptionUnreadable(f"caption file {txt.name}: {err.strerror}") from None


@dataclass
class FolderPlan:
    """What `plan_folder` checked and found: the images to write, their captions, and what is left out."""

    input_dir: Path
    images: list[Path]
    captions: dict[Path, str]  # image -> caption; images without one are absent
    skipped: list[dict[str, str]]
    missing: list[Path]
    classes: list[str] | None = None  # labels=folders: the class folders' names, label i is classes[i]


def plan_folder(cfg: WriteConfig) -> FolderPlan:
    """List `cfg.input_dir`'s images and their captions, raising ConfigError for what would leave nothing (or not
    what was asked) to write: before `write_shards` replaces anything."""
    input_dir = Path(cfg.input_dir).resolve()
    if not input_dir.is_dir():
        raise ConfigError(f"input_dir={cfg.input_dir} is not a directory")
    listing = list_images(input_dir)
    skipped = [{"path": path, "reason": reason} for path, reason in listing.left_out]
    for entry in skipped:
        log.warning("skipping %s: %s", input_dir / entry["path"], entry["reason"])
    images = listing.images
    if not images:
        raise ConfigError(f"input_dir={cfg.input_dir} holds no readable images with extensions "
                          f"{list(IMAGE_EXTENSIONS)} (left out: {skipped[:3]})")
    manifest = _read_manifest(Path(cfg.captions), input_dir) if cfg.captions else None
    captions: dict[Path, str] = {}  # image -> caption; images without one (or with an empty one) are absent
    for path in list(images):
        if manifest is not None:
            caption = manifest.get(listed_path(path))
        else:
            try:
                caption = _sidecar_caption(listing.sidecars.get(path))
            except CaptionUnreadable as err:
                log.warning("skipping image %s: %s", path, err)
                skipped.append({"path": path.relative_to(input_dir).as_posix(), "reason": str(err)})
                images.remove(path)
                continue
        if caption:  # an empty caption (a blank .txt or cell) is a missing one
            captions[path] = caption
    if manifest is not None:  # rows that name no image (a typo, another letter case): their captions go unused
        listed = {listed_path(p) for p in images}
        unmatched = [str(k) for k in manifest if k not in listed]
        if unmatched:
            log.warning("captions=%s: %d of its %d rows name no image of input_dir (e.g. %s): their captions are not "
                        "used; check the paths (letter case included)", cfg.captions, len(unmatched), len(manifest),
                        unmatched[:3])
    missing = [p for p in images if p not in captions]
    if missing and not (cfg.allow_missing_captions or cfg.labels):
        undecodable = []  # up to the first that decodes, which the refusal below is about: left out as any
        for path in missing:  # undecodable image, neither named nor counted as uncaptioned
            if (reason := _decode_error(path)) is None:
                break
            log.warning("skipping image %s: %s", path, reason)
            skipped.append({"path": path.relative_to(input_dir).as_posix(), "reason": reason})
            images.remove(path)
            undecodable.append(path)
        missing = missing[len(undecodable):]
        if not images:
            raise ConfigError(f"input_dir={cfg.input_dir} holds no readable images (left out: {skipped[:3]})")
    if missing and not (cfg.allow_missing_captions or cfg.labels):
        shadowed = sum(p in listing.sidecars for p in missing) if manifest is not None else 0
        where = (f"in captions={cfg.captions}" + (f" ({shadowed} of them have a sidecar .txt, which is not read when "
                                                  f"captions= is given)" if shadowed else "")) \
            if manifest is not None else "as sidecar .txt files (same stem, .txt in any letter case)"
        raise ConfigError(f"{len(missing)} of {len(images)} images have no caption {where}, e.g. "
                          f"{[str(p.relative_to(input_dir)) for p in missing[:3]]}; add them or set "
                          f"allow_missing_captions=true")
    classes = None
    if cfg.labels == "folders":
        loose = [p.name for p in images if p.parent == input_dir]
        if loose:
            raise ConfigError(f"labels=folders: {len(loose)} images lie in input_dir itself, outside any class "
                              f"subfolder (e.g. {loose[:3]}); move them into their class's folder, or out of "
                              f"input_dir")
        # a class is a top-level folder that holds images, also ones ldm-data does not read (HEIC...), or that could
        # not be read: the indices must not shift when its files are converted or become readable later (a model
        # trained on one numbering, sampled by another). Folders of other files (notes, shards written there) are none.
        used = {p.relative_to(input_dir).parts[0] for p in images}
        unread = {parts[0] for e in skipped if (parts := Path(e["path"]).parts) and e["path"] != "." and (
            len(parts) > 1 and parts[-1].lower().endswith(IMAGE_EXTENSIONS + OTHER_IMAGE_EXTENSIONS)
            and not e["reason"].startswith("hidden")  # an image inside a folder skipped (caption, link, format)
            or e["reason"].startswith("unreadable directory"))}
        classes = sorted(used | unread)
        if empty := [name for name in classes if name not in used]:
            log.warning("labels=folders: class folders %s hold no image ldm-data reads (extensions %s), or could not "
                        "be read; their indices are kept, with no samples", empty[:5], sorted(IMAGE_EXTENSIONS))
    if cfg.val_samples >= len(images):
        raise ConfigError(f"val_samples={cfg.val_samples} leaves no training images out of {len(images)}")
    return FolderPlan(input_dir, images, captions, skipped, missing, classes)


def write_folder(cfg: WriteConfig, plan: FolderPlan, output_dir: Path) -> dict[str, Any]:
    # A seeded permutation: val takes its first val_samples decodable images, train the rest, both written in permuted
    # order, so that neighbouring files (often near-duplicates, or one class's folder) spread over shards and the
    # first N validation samples (an evaluation's num_samples) are a random draw. An undecodable image drawn for val
    # is replaced by the next one, so val holds val_samples images whatever the folder's damage.
    order = list(enumerate(plan.images))
    random.Random(fold_seed(cfg.seed, 0xF01D)).shuffle(order)
    records = folder_records(order, plan, cfg)
    val = write_split(itertools.islice(records, cfg.val_samples), output_dir, "val", cfg)
    train = write_split(records, output_dir, "train", cfg)
    skipped = {entry["path"] for entry in plan.skipped}
    return {"splits": {"train": train, "val": val}, "input_dir": str(plan.input_dir), "skipped": plan.skipped,
            "missing_captions": [rel for p in plan.missing  # of the images written (not those that did not decode)
                                 if (rel := p.relative_to(plan.input_dir).as_posix()) not in skipped],
            **({"classes": plan.classes} if plan.classes is not None else {})}


STAGING_PREFIX = ".ldm-data-"  # the hidden folder inside output_dir that a run writes its shards into first


def write_shapes(cfg: WriteConfig, output_dir: Path) -> dict[str, Any]:
    splits = {split: write_split(shapes_records(cfg, n, split), output_dir, split, cfg)
              for split, n in (("train", cfg.num_samples), ("val", cfg.val_samples))}
    return {"splits": splits, "vocabulary": shapes.vocabulary()}


def write_shards(cfg: WriteConfig) -> dict[str, Any]:
    """Write both splits and summary.json into `cfg.output_dir`; return the summary.

    The shards are written into a hidden folder inside `output_dir` and moved into place once both splits are whole,
    so that `overwrite=true` replaces the old shards (and their summary.json) only by a complete new set: a mistake
    found while writing (a holdout that leaves no caption, a folder none of whose images can be read) leaves them be.
    """
    output_dir = Path(cfg.output_dir)
    if (output_dir / MANIFEST_NAME).is_file():
        raise ConfigError(f"output_dir={output_dir} holds latent shards (written by ldm-encode, described by its "
                          f"manifest.json): image shards written there would be read as latents; choose another "
                          f"output_dir")
    created = [d for d in [output_dir, *output_dir.absolute().parents] if not d.exists()]  # innermost first
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_lock(output_dir, "ldm-data"):  # a second ldm-data there would remove this one's staging folder
            return _write_into(cfg, output_dir)
    finally:
        for folder in created:  # a refused run leaves no folder behind (nor the parents it made)
            if any(folder.iterdir()):
                break
            folder.rmdir()


def _warn_renumbered(output_dir: Path, written: dict[str, Any]) -> None:
    """Warn when the shards about to replace those in `output_dir` number the classes otherwise than its summary.json
    says they did: a model trained on the old labels would read other classes (or skip them, out of range)."""
    try:
        old = json.loads((output_dir / SUMMARY_NAME).read_text(encoding="utf-8")).get("classes")
    except (OSError, ValueError, AttributeError):
        return
    new = written.get("classes")
    if isinstance(old, list) and new is not None and old != new:
        moved = {name: (old.index(name), new.index(name)) for name in old if name in new
                 and old.index(name) != new.index(name)}
        log.warning("labels=folders: these shards number the classes otherwise than the ones they replace (%d "
                    "classes, then %d; moved: %s; gone: %s): a model trained on the old shards reads other classes "
                    "from them", len(old), len(new), dict(list(moved.items())[:5]),
                    [name for name in old if name not in new][:5])


def _write_into(cfg: WriteConfig, output_dir: Path) -> dict[str, Any]:
    """`write_shards`' work in `output_dir`, which this run holds."""
    existing = sorted(p.name for p in output_dir.glob("*.tar") if SHARD_NAME.fullmatch(p.name))  # ours only
    if existing:
        if not cfg.overwrite:
            raise FileExistsError(f"output_dir={output_dir} already holds shards ({existing[:3]}...); choose another "
                                  f"output_dir or pass overwrite=true to replace them")
    for stale in output_dir.glob(f"{STAGING_PREFIX}*"):  # left by a run that was killed
        shutil.rmtree(stale, ignore_errors=True)
    plan = None if cfg.source == "shapes" else plan_folder(cfg)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=output_dir))
    try:
        written = write_shapes(cfg, staging) if plan is None else write_folder(cfg, plan, staging)
        if plan is not None and not written["splits"]["train"]["count"]:
            reasons = [f"{entry['path']}: {entry['reason']}" for entry in written.get("skipped", [])[:3]]
            val = written["splits"]["val"]["count"]
            what = (f"val_samples={cfg.val_samples} took all {val} images of input_dir={cfg.input_dir} that could be "
                    f"read ({len(written['skipped'])} could not, e.g. {reasons}), leaving none for training: lower "
                    f"val_samples" if val else
                    f"no training image of input_dir={cfg.input_dir} could be read (e.g. {reasons})")
            raise ConfigError(what + "; nothing was written" +
                              (", and the shards there were left as they were" if existing else ""))
        _warn_renumbered(output_dir, written)
        for name in existing:
            (output_dir / name).unlink()
        (output_dir / SUMMARY_NAME).unlink(missing_ok=True)  # it described the shards just removed
        for shard in sorted(staging.iterdir()):
            shard.rename(output_dir / shard.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    stored = cfg.resolution is None  # the files as they are: neither cropped nor re-encoded (nor their defaults)
    summary = {"source": cfg.source, "seed": cfg.seed, "resolution": cfg.resolution, "crop": cfg.crop and not stored,
               "image_format": None if stored else cfg.image_format, "samples_per_shard": cfg.samples_per_shard,
               "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **written, "config": asdict(cfg)}
    atomic_write_text(json.dumps(summary, indent=2) + "\n", output_dir / SUMMARY_NAME)
    if summary.get("skipped"):
        log.warning("left out %d files of input_dir=%s (listed with the reason under `skipped` in %s)",
                    len(summary["skipped"]), summary["input_dir"], output_dir / SUMMARY_NAME)
    counts = ", ".join(f"{s}: {v['count']} samples in {len(v['shards'])} shards" for s, v in summary["splits"].items())
    log.info("wrote %s (%s)", output_dir, counts)
    return summary
