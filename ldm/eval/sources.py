"""Where evaluation reads images and captions: a shard set read in order, and prompt sets.

Evaluation must see the same images in the same order every time (reference statistics are cached by the shard list),
so it reads WebDataset tar shards sequentially here instead of through the shuffling training DataModule. A sample is
the group of tar members sharing a key (`000123.png`, `000123.txt`); the first image extension found is the image and
its `txt` member the caption, read as training reads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.config import ConfigError, is_int
from ldm.data.latents import MOMENTS
from ldm.data.stream import IMAGE_KEYS, TAR_ERRORS, resize_crop, sample_caption, sample_metadata
from ldm.images import decode_image
from ldm.io import read_lines

log = logging.getLogger(__name__)

# What the reader gives a metric: part of the reference statistics' key and of an autoencoder row's point, so that
# numbers of an older reader are computed again. 2: images decoded upright (EXIF orientation); 3: GIF / TIFF members
# read, 16-bit colour keys; 4: non-square images resized then cropped, as training does; captions read as training
# reads them (samples with unreadable ones left out); 5: members grouped into samples as training groups them (names
# without a dot or starting with one, such as `.DS_Store` and macOS' `._KEY.jpg`, are no samples); 6: a sample with two
# members of one extension left out, a gzip stream cut in the archive's end zeros read whole.
READER_VERSION = 6


def shard_fingerprint(shards: Sequence[str]) -> list[dict]:
    """Each shard's path, size and modification time: what identifies the data a statistic was computed from."""
    out = []
    for shard in shards:
        stat = Path(shard).stat()
        out.append({"path": str(Path(shard).resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return out


def shard_digest(shards: Sequence[str]) -> str:
    """One value for what identifies the data a row was scored on: the sha256 (16 hex digits) of every shard's path,
    size and modification time (`shard_fingerprint`)."""
    return fingerprint_digest(shard_fingerprint(shards))


def fingerprint_digest(fingerprint: list[dict]) -> str:
    """`shard_digest` of a `shard_fingerprint` (the form rows of older ldm hold: the fingerprint itself)."""
    return hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:16]


ROW_SHARDS = 8  # shards a results row names in full; of more, the first ones and a count (`shard_digest` covers all)


def row_shards(shards: Sequence[str]) -> list[str]:
    """The shards as a results row names them: up to `ROW_SHARDS` in full, else the first `ROW_SHARDS - 1` and a
    count (a row naming 20,000 shards took 2.5 MB, and its results.csv cell broke csv readers)."""
    shards = [str(s) for s in shards]
    return shards if len(shards) <= ROW_SHARDS else \
        [*shards[:ROW_SHARDS - 1], f"... and {len(shards) - ROW_SHARDS + 1} more ({len(shards)} in all)"]


def iter_shard_members(shards: Sequence[str]) -> Iterator[dict[str, bytes]]:
    """Each sample of `shards` in order, as {extension: bytes} of the tar members sharing its key (and `__key__`,
    `__url__`: the key and the shard, as strings). A damaged shard is read up to the damage and reported, naming
    the samples it lost against its recorded count (summary.json, as the training loader counts); as training, a
    shard whose members stop early (cut at a member's boundary, a damaged header, a read error) leaves out its last
    sample, which may lack members."""
    from ldm.data.datamodule import recorded_counts
    from ldm.data.stream import DUPLICATE, member_key, walk_stopped_early

    for shard, count in zip(shards, recorded_counts(list(shards))):
        read, error, held, stopped = 0, "", None, False
        try:
            with tarfile.open(shard, "r") as tar:
                current_key, members = None, {}
                for member in tar:
                    split = member_key(member.name) if member.isfile() else None
                    if split is None:  # as the training reader: `.DS_Store`, `._KEY.jpg`, a README are no samples
                        continue
                    key, ext = split
                    if key != current_key and members:
                        if held is not None:
                            read += 1
                            yield held
                        held, members = members, {}
                    current_key = key
                    if ext in members:  # as the training reader: the first kept, the sample refused (sample_caption)
                        members.setdefault(DUPLICATE, member.name)
                        continue
                    members.update({ext: tar.extractfile(member).read(), "__key__": key, "__url__": shard})
                if members:
                    if held is not None:
                        read += 1
                        yield held
                    held = members
                stopped = walk_stopped_early(tar, shard)  # this walk's end, not a second walk
        except TAR_ERRORS as err:  # the sample being read is lost, the one before whole
            error = f" ({type(err).__name__}: {err})"
        if held is not None and not error and stopped:  # no error: the last sample may be cut
            error, held = " (its members stop before its end: cut short, or a damaged member header)", None
        if held is not None:
            read += 1
            yield held
        if (count is not None and read < count) or error:
            _report_damaged(shard, read, count, error)


@functools.cache
def _report_damaged(shard: str, read: int, count: int | None, error: str) -> None:
    """Warn once per damaged shard (evaluation reads a shard set up to three times: captions, labels, images)."""
    says = "" if count is None else f" but its count says {count}"
    log.warning("damaged tar %s: it ends after %d samples%s%s; evaluation uses the %d it could read (rewrite the "
                "shard with ldm-data)", shard, read, says, error, read)


def readable_caption(members: dict[str, bytes]) -> str | None:
    """The caption of a sample as training reads it ("" without a `txt` member), or None when the sample does not
    read (a caption not UTF-8, two members with one extension, metadata that is not JSON): training skips such a
    sample as corrupt, and evaluation leaves it out too, with a warning."""
    try:
        caption = sample_caption(members) or ""
        sample_metadata(members)
        return caption
    except ValueError as err:
        _report_unreadable_caption(members["__url__"], members["__key__"], str(err))
        return None


@functools.cache
def _report_unreadable_caption(shard: str, key: str, error: str) -> None:
    """Warn once per sample (evaluation reads a shard set up to three times)."""
    log.warning("%s: sample %s left out: it does not read as training reads it (%s); training skips it too", shard, key,
                error[:200])


def iter_shard_samples(shards: Sequence[str]) -> Iterator[tuple[Image.Image, str]]:
    """(image, caption) pairs of every sample of `shards` that holds an image, in shard order; an image that does
    not decode is left out, with a warning naming its shard and key."""
    for members in iter_shard_members(shards):
        ext = next((e for e in IMAGE_KEYS if e in members), None)
        caption = readable_caption(members)
        if ext is None or caption is None:
            continue
        try:
            image = decode_image(members[ext])  # 8-bit RGB, as the training loader sees it
        except Exception as err:  # noqa: BLE001 -- a corrupt image is reported and left out, as in training
            log.warning("%s: sample %s left out: its %s does not decode (%s: %s)", members["__url__"],
                        members["__key__"], ext, type(err).__name__, str(err)[:200])
            continue
        yield image, caption


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL RGB image as a uint8 tensor (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def iter_image_batches(shards: Sequence[str], resolution: int, num_samples: int | None, batch_size: int,
                       ) -> Iterator[tuple[torch.Tensor, list[str]]]:
    """Batches (uint8 (B, 3, R, R), captions) of the first `num_samples` samples of `shards` (all when None)."""
    images: list[torch.Tensor] = []
    captions: list[str] = []
    seen = 0
    for image, caption in iter_shard_samples(shards):
        if num_samples is not None and seen >= num_samples:
            break
        images.append(pil_to_uint8(resize_crop(image, resolution, None)))  # as training sees it (centre crop)
        captions.append(caption)
        seen += 1
        if len(images) == batch_size:
            yield torch.stack(images), captions
            images, captions = [], []
    if images:
        yield torch.stack(images), captions


def _readable_samples(shards: Sequence[str], limit: int | None) -> Iterator[tuple[dict[str, bytes], str]]:
    """(members, caption) of the first `limit` samples (all when None) whose caption reads, in shard order: the one
    sequence that prompts and class labels are both taken from, so that prompt i and label i are one sample's."""
    taken = 0
    for members in iter_shard_members(shards):
        if limit is not None and taken >= limit:
            break
        if not any(ext in members for ext in (*IMAGE_KEYS, MOMENTS)):  # training skips a sample without an image
            continue                                                    # (latent shards: without its moments)
        caption = readable_caption(members)
        if caption is not None:
            taken += 1
            yield members, caption


def shard_captions(shards: Sequence[str], limit: int | None = None) -> list[str]:
    """Captions of the first `limit` samples (all when None), without decoding images."""
    return [caption for _, caption in _readable_samples(shards, limit)]


def shard_labels(shards: Sequence[str], limit: int | None = None) -> list[int] | None:
    """Class labels (the integer `label` of each sample's JSON metadata, as `ldm-data` writes for `shapes`) of the
    samples `shard_captions` takes, or None unless every one of them has one."""
    labels: list[int] = []
    for members, _ in _readable_samples(shards, limit):
        meta = sample_metadata(members)  # (JSON: `_readable_samples` left out the others)
        label = meta.get("label") if isinstance(meta, dict) else None
        if not is_int(label):  # JSON true is no class (training skips it too)
            return None
        labels.append(label)
    return labels or None


def generation_labels(conditioner: object, shards: Sequence[str] | None, num_samples: int, key: str
                      ) -> list[int] | None:
    """The class label of each of `num_samples` generated images for a class-conditional `conditioner` (the labels
    of the first samples of `shards`, cycled); None for any other conditioner. A ConfigError naming `key` when a
    sample lacks a label or holds one outside the model's classes (its null class included)."""
    if not getattr(conditioner, "reads_labels", False):
        return None
    num_classes = conditioner.null_class
    labels = shard_labels(shards, num_samples) if shards else None
    if labels is None:
        raise ConfigError(f"the model is class-conditional: it generates from the integer 'label' of each sample's "
                          f"metadata (as ldm-data writes for shapes), and {key}={shards} has a sample without one")
    bad = sorted({label for label in labels if not 0 <= label < num_classes})
    if bad:
        raise ConfigError(f"{key}={shards} holds labels {bad[:5]} outside the model's classes [0, {num_classes - 1}] "
                          f"(model.conditioner.num_classes={num_classes})")
    return [labels[i % len(labels)] for i in range(num_samples)]


def load_prompts(source: str, num_samples: int, shards: Sequence[str] | None = None,
                 prompts_file: str | None = None) -> list[str]:
    """`num_samples` prompts, cycling through the set when it is smaller: captions of `shards` or lines of a file."""
    if source == "val_shards":
        if not shards:
            raise ConfigError("prompts_source=val_shards needs val_shards (the shard set whose captions are prompts); "
                              "set val_shards=DIR_OR_GLOB (a checkpoint or export that records its validation "
                              "shards supplies them itself)")
        prompts = shard_captions(shards, limit=num_samples)
    elif source == "file":
        if not prompts_file or not Path(prompts_file).is_file():
            raise FileNotFoundError(f"prompts_source=file needs prompts_file, one prompt a line; got {prompts_file!r}")
        prompts = read_lines(Path(prompts_file), "prompts_file")
    else:
        raise ConfigError(f"prompts_source={source!r}; choose val_shards or file")
    if not prompts:
        raise ConfigError(f"prompts_source={source}: found no prompts")
    return [prompts[i % len(prompts)] for i in range(num_samples)]
