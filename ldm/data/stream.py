"""The worker side of WebDataModule: an epoch plan and the stream of one rank's batches (no Lightning here, so a
spawned DataLoader worker imports only torch, webdataset and PIL).

An epoch is split as follows. All ranks compute the same plan: the shard order is shuffled with (seed, epoch), the
shards' samples are laid end to end (counts from summary.json), and the sequence is cut into contiguous ranges, one per
(rank, worker) "slot". A slot reads only the shards its range touches (skipping, undecoded, the part of a shard before
its range), so no sample is read twice in an epoch, however few shards there are. Every rank yields the same number of
batches, so no collective hangs. Training: S = ranks x workers equal ranges, full batches only; left out per epoch are
the N mod S samples past the last range and each slot's last partial batch, fewer than S x (batch_size + 1) in all.
Validation: one equal range per rank, split over its workers to within one sample, partial batches kept; left out are
only the N mod ranks samples past the last range (none in a single process).

Order depends on (seed, epoch, rank, worker) only, and a per-sample generator seeded by (seed, epoch, shard, key) draws
crops and flips, so (epoch, batches consumed) is enough to resume exactly: each worker skips the batches it had already
produced (the DataLoader takes batches from its workers round-robin and every worker yields the same number, so batch
i of a rank came from worker i mod W; on resume after k batches the workers' roles rotate by k so that the loader's
first worker produces batch k).

Corrupt samples (undecodable image, truncated tar) are skipped and reported with shard and key in each batch's
`__skipped__` entry, samples without a caption (they train with "") in `__uncaptioned__`, shards found to hold more
samples than their count in `__uncounted__` (the loader takes these out in the main process). A shard that ends
before its recorded count (truncated, or the count is stale) is reported as damaged, naming it. A slot that lost
samples tops its quota up by re-reading its own range from the start; a slot whose whole range lies past such a
shard's real end reads the samples of the other shards instead, so the batch counts stay equal on every rank.
"""

from __future__ import annotations

import functools
import inspect
import io
import json
import logging
import math
import os
import random
import re
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ldm.config import is_int
from ldm.data.shardlist import REMOTE_PREFIXES, TAR_ERRORS, shard_name
from ldm.images import decode_image
from ldm.seeding import fold_seed

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff")
COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz: how a compressed tar begins, whatever its name
# note: resized whole up to this aspect ratio (the usual path; its pixels differ from the box path's by 1 level at most
# at photo sizes), inside the crop's box beyond it
MAX_RESIZED_ASPECT = 4


# What webdataset's tar reader (`tar_file_iterator`, its defaults) leaves out: metadata members such as __meta__/...
_WDS_SKIP_META = re.compile(inspect.signature(wds.tariterators.tar_file_iterator).parameters["skip_meta"].default)


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension in lower case) of a tar member as every reader here groups samples (webdataset's rule:
    the name split at the first dot of its file name); None for the members left out: webdataset's metadata
    (`__meta__`), and files whose name has no dot or starts with one (`.DS_Store`, macOS' `._KEY.jpg`, a `README`),
    at the top of the tar or in a folder inside it (webdataset itself would take `imgs/._KEY.jpg` for a sample
    `imgs/`)."""
    base = name.rpartition("/")[2]
    if base.startswith(".") or "." not in base or _WDS_SKIP_META.match(name):
        return None
    prefix, suffix = wds.tariterators.base_plus_ext(name)
    return None if prefix is None else (prefix, suffix.lower())


DUPLICATE = "__duplicate__"  # in a raw sample: the name of a second member with an extension it already has


@dataclass
class MemberWatch:
    """Which member of a tar is being read: its name from when its data is about to be read until it is whole. After a
    read that ended with an error, the member whose data the error cut (None: the error came at a header, whose
    member is unknown)."""

    name: str | None = None

    def cut_key(self) -> str | None:
        """The sample key of the member being read, None between members."""
        split = member_key(self.name) if self.name is not None else None
        return split[0] if split is not None else None


def read_tar(handler: Callable[[Exception], bool], watch: MemberWatch | None = None
             ) -> Callable[[Iterator[dict[str, Any]]], Iterator[dict[str, Any]]]:
    """webdataset's tar reader (`tarfile_to_samples`: open, expand, group by key) keeping only the members
    `member_key` groups into samples, with `watch` following the member being read. A second member of a sample with
    an extension it already has (`KEY.txt` and `KEY.TXT`; webdataset raises, which would end the shard) is left out
    and named under DUPLICATE in its sample, which `sample_caption` refuses."""
    watch = watch if watch is not None else MemberWatch()

    def select(name: str) -> bool:
        if member_key(name) is None:
            return False
        watch.name = name  # its data is read next
        return True

    def members(src: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        streams = wds.tariterators.url_opener(src, handler=handler)
        key, exts = None, set()
        for member in wds.tariterators.tar_file_expander(streams, handler=handler, select_files=select):
            watch.name = None  # read whole
            name = member.get("fname")
            if name is None:  # the end-of-shard marker
                key, exts = None, set()
            else:
                sample, ext = member_key(name)
                if sample != key:
                    key, exts = sample, set()
                if ext in exts:  # left out; the first one is named, so that the sample is refused
                    if DUPLICATE in exts:
                        continue
                    member, ext = {**member, "fname": f"{key}.{DUPLICATE}", "data": name}, DUPLICATE
                exts.add(ext)
            yield member

    return lambda src: wds.tariterators.group_by_keys(members(src), handler=handler)


@dataclass
class EpochPlan:
    """Everything a worker needs to produce its batches; built in the main process and pickled into the workers."""

    urls: list[str]
    counts: list[int]
    seed: int
    rank: int
    world_size: int
    num_workers: int  # DataLoader workers per rank (0 counts as one slot, the main process)
    batch_size: int
    train: bool  # shuffle shards and samples, random crop / flip if enabled, full batches only
    resolution: int
    shuffle_buffer: int = 1000
    random_crop: bool = False
    hflip: bool = False
    cache_in_memory: bool = False  # keep the raw samples read from each shard for later epochs (num_workers=0 only)
    num_classes: int | None = None  # class-conditional training: a sample without an integer label in
    #                                 [0, num_classes) is corrupt
    epoch: int = 0
    skip_batches: int = 0  # batches of this rank already consumed this epoch (resume)

    @property
    def slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    @property
    def slot_samples(self) -> int:
        """Samples in each training slot's range."""
        return sum(self.counts) // self.slots

    def slot_range(self, slot: int) -> tuple[int, int]:
        """[begin, end) of slot `slot` (rank x workers + worker) in the epoch's sequence of samples.

        Training: S equal ranges. Validation: one equal range per rank, split over its workers into ranges that
        differ by at most one sample (every rank still yields the same number of batches).
        """
        if self.train:
            return slot * self.slot_samples, (slot + 1) * self.slot_samples
        rank, worker = divmod(slot, max(1, self.num_workers))
        per_rank = sum(self.counts) // self.world_size
        base, extra = divmod(per_rank, max(1, self.num_workers))
        begin = rank * per_rank + worker * base + min(worker, extra)
        return begin, begin + base + (1 if worker < extra else 0)

    def quota(self, slot: int) -> int:
        """Samples slot `slot` yields per epoch: training, its full batches; validation, its whole range."""
        begin, end = self.slot_range(slot)
        return (end - begin) // self.batch_size * self.batch_size if self.train else end - begin

    @property
    def rank_batches(self) -> int:
        """Batches each rank yields per epoch (the same number on every rank)."""
        workers = max(1, self.num_workers)
        return sum(math.ceil(self.quota(self.rank * workers + w) / self.batch_size) for w in range(workers))

    @property
    def left_out(self) -> int:
        """Samples no slot reads this epoch."""
        return sum(self.counts) - sum(self.quota(slot) for slot in range(self.slots))

    @property
    def shift(self) -> int:
        """Where the training ranges start in the epoch's sequence of samples: 0 when the S ranges cover all N
        samples, else a position drawn with (seed, epoch), the ranges wrapping round the end, so that the N mod S
        samples no range covers differ from epoch to epoch (with one shard they would always be its last ones)."""
        total = sum(self.counts)
        if not self.train or total % self.slots == 0:
            return 0
        return random.Random(fold_seed(self.seed, self.epoch, 1)).randrange(total)

    def segments(self, slot: int) -> list[tuple[str, int, int]]:
        """(url, first, stop) sample ranges of shards that slot `slot` reads this epoch."""
        order = list(range(len(self.urls)))
        if self.train:
            random.Random(fold_seed(self.seed, self.epoch)).shuffle(order)
        begin, end = self.slot_range(slot)
        total, shift = sum(self.counts), self.shift
        begin, end = begin + shift, end + shift
        pieces = [(begin, end)] if end <= total else [(begin, total), (0, end - total)] if begin < total else \
            [(begin - total, end - total)]
        segments = []
        for begin, end in pieces:
            offset = 0
            for i in order:
                lo, hi = max(begin - offset, 0), min(end - offset, self.counts[i])
                if lo < hi:
                    segments.append((self.urls[i], lo, hi))
                offset += self.counts[i]
        return segments


class SkipLog:
    """Records samples that could not be read: (shard, key, reason, how many samples the record stands for), and
    samples without a caption: (shard, key). Also the webdataset exception handler."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, str, int]] = []  # since the last `pop` (the per-batch report)
        self.seen: set[tuple[str, str]] = set()  # every sample recorded, never popped
        self.first: list[tuple[str, str, str, int]] = []  # the first three records, for the messages of a slot
        self.uncaptioned: list[tuple[str, str]] = []
        self.uncaptioned_seen: set[tuple[str, str]] = set()
        self.tar_error: str | None = None  # the handler's last error in the shard being read
        self.watch = MemberWatch()  # the member being read: after an error, the one it cut
        self.uncounted: dict[str, int] = {}  # shard -> its recorded count, for shards found to hold more

    def add(self, url: str, key: str, reason: str, count: int = 1) -> None:
        if (url, key) not in self.seen:  # a slot topping up re-reads its range: report each sample once
            self.seen.add((url, key))
            self.records.append((url, key, reason, count))
            if len(self.first) < 3:
                self.first.append((url, key, reason, count))

    def add_uncaptioned(self, url: str, key: str) -> None:
        if (url, key) not in self.uncaptioned_seen:
            self.uncaptioned_seen.add((url, key))
            self.uncaptioned.append((url, key))

    def handler(self, exn: Exception) -> bool:
        """Tar-level errors (truncated or garbage archive): kept for the report of the samples this cost
        (`_read_segments`), and the reading goes on with the next shard."""
        self.tar_error = f"{type(exn).__name__}: {str(exn.args[0]) if exn.args else exn}"[:200]
        return True

    def pop(self) -> list[tuple[str, str, str, int]]:
        records, self.records = self.records, []
        return records

    def pop_uncaptioned(self) -> list[tuple[str, str]]:
        records, self.uncaptioned = self.uncaptioned, []
        return records

    def pop_uncounted(self) -> dict[str, int]:
        records, self.uncounted = self.uncounted, {}
        return records


def _read_segments(segments: list[tuple[str, int, int]], skips: SkipLog,
                   cache: dict[str, list[dict[str, Any]]] | None = None,
                   counts: Mapping[str, int] | None = None) -> Iterator[dict[str, Any]]:
    """Raw samples (undecoded bytes) of each shard's [lo, hi) range, in order; a shard that ends before `hi`
    (truncated, or counted wrong in summary.json) is reported as damaged. `counts`: each shard's sample count, which
    tells a range that ends inside its shard.

    With a `cache`, the samples a shard yielded (from its start: those before `lo` are parsed on the way anyway)
    are kept under its url, also when the reader stops early (a validation under `trainer.limit_val_batches`); a later
    range is served from memory as far as they go, and the tar is opened only when the reader asks for more.
    """
    for url, lo, hi in segments:
        kept = cache.get(url, []) if cache is not None else []
        served = kept[lo:hi]
        yield from served
        if lo + len(served) >= hi:
            continue
        start = lo + len(served)  # the range's first sample not in memory
        skips.tar_error, skips.watch.name = None, None
        samples = read_tar(skips.handler, skips.watch)(iter([{"url": url}]))
        # note: a tar cut short (at a member's boundary, or inside a compressed one) or with a damaged member header
        # inside may end with no error, or with one after its last sample, which may have lost members (its
        # caption). Each sample is held back until the next one is read, and a range that ends inside its shard (or
        # in a cut tar) reads one sample past its end: a read that ends before that leaves out the last sample it
        # read, the tar's real last one
        cut = functools.partial(shard_stops_early, url)  # (a walk of the shard: asked only where the answer matters)
        count = (counts or {}).get(url)
        ahead = (count is not None and hi < count) or cut()
        probe = not ahead and hi == count  # the shard's last range: one more read tells a count short of the shard
        read, seen, prefix, held, followed, ran_out, last_key = 0, 0, [], None, False, False, None
        try:
            for i, sample in enumerate(islice(samples, hi + (ahead or probe))):
                if i == hi:  # the sample after the range: the range's last one is whole
                    followed = True
                    break
                seen, last_key = i + 1, sample.get("__key__")
                if cache is not None:
                    prefix.append(sample)
                if i >= start:
                    if held is not None:
                        yield held
                    held, read = sample, read + 1
            ran_out = not followed
        finally:
            samples.close()
            # what was read is kept, also when the reader stopped inside the range (trainer.limit_val_batches), less
            # the newest sample unless the one after it was read (not known to be whole: perhaps the tar's last)
            early = not followed and (ahead or seen < hi or skips.tar_error is not None)
            if early and ran_out and skips.tar_error is None and not cut():
                early = False  # an intact tar that holds fewer samples than its count says: its last one is whole
                # (a remote one is not walked: a cut at a member's boundary, rare, leaves its last sample without
                # the members after it, a sample then skipped for want of an image or counted as uncaptioned)
            cut_key = skips.watch.cut_key() if skips.tar_error is not None else None
            if ran_out and cut_key is not None:  # the tar ended inside a member's data: that member's sample is cut,
                early = last_key == cut_key      # one before it whole
            whole = prefix[:-1] if early else prefix
            if cache is not None and len(whole) > len(kept):
                cache[url] = whole
        dropped = early and seen > 0  # the last sample of a tar that ended early
        if dropped:
            read, seen, held = read - (held is not None), seen - 1, None
        if followed and probe:  # before the last yield: a reader with its quota stops there
            skips.uncounted[url] = count
        if held is not None:
            yield held
        fix = ("rewrite it (an image shard with ldm-data, or correct its recorded count: ldm-data's summary.json, "
               "img2dataset's NAME_stats.json or data.samples_per_shard, deleted or unset so that the tar headers are "
               "counted; a latent shard by running ldm-encode again, which re-encodes a damaged one)")
        error = f" ({skips.tar_error})" if skips.tar_error else ""
        if read < hi - start:  # one record for the samples of this range lost
            last = (" and a sample perhaps cut short (the tar ends early: cut short, or a damaged member header)"
                    if dropped else "")
            skips.add(url, f"samples {start + read}-{hi - 1}",
                      f"damaged tar: the shard ends after {seen} whole samples{last} but its count says at least "
                      f"{hi}{error} (truncated, or its count is out of date); {fix}", count=hi - start - read)
        elif error:
            skips.add(url, "?", f"damaged tar{error}; {fix}")


def tar_ends_cut(url: str) -> bool:
    """True for a local uncompressed tar whose last 1 KiB is not zeros, the end-of-archive blocks that tarfile and GNU
    tar write on closing: a copy cut short, perhaps at a member's boundary, which no read error reveals, so that its
    last sample may lack members (zeros there may also be a member's data: `walk_stopped_early` tells). Remote and
    compressed shards (by their first bytes, whatever the name) are not checked (False). Reads 1 KiB and 6 bytes."""
    path = url.removeprefix("file:")
    if path.startswith(REMOTE_PREFIXES):
        return False
    try:
        with open(path, "rb") as f:
            if f.read(6).startswith(COMPRESSED_MAGIC):
                return False
            size = f.seek(0, os.SEEK_END)
            f.seek(max(size - 1024, 0))
            tail = f.read(1024)
    except OSError:
        return False
    return len(tail) < 1024 or bool(tail.strip(b"\0"))


@functools.lru_cache(maxsize=4096)
def _stops_early(url: str, size: int, mtime_ns: int) -> bool:
    return members_stop_early(url)


def shard_stops_early(url: str) -> bool:
    """`members_stop_early` of a local shard, walked once per process for each version of the file (its size and
    modification time): a training read that reaches the shard's end asks at every epoch (in a new worker process
    each epoch: once per shard and epoch)."""
    path = url.removeprefix("file:")
    if url.startswith(REMOTE_PREFIXES):
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False  # (the reader reports it)
    return _stops_early(url, stat.st_size, stat.st_mtime_ns)


def members_stop_early(url: str) -> bool:
    """`tar_ends_cut`, or a damaged member header inside, which tarfile takes for the archive's end (the samples after
    it are lost, the one it cuts may lack members): its members stop before its data does. Walks the headers (a seek
    per member; a compressed local tar is decompressed once, and one that ends before its end-of-archive blocks, or
    whose compressed stream is cut, stops early), for ldm-encode and a training read that ends before the shard's
    count."""
    path = url.removeprefix("file:")
    if url.startswith(REMOTE_PREFIXES):  # (a local shard is told by its content, whatever its name: .tar.xz, .TAR)
        return False
    if tar_ends_cut(url):
        return True
    try:
        with tarfile.open(path, "r:*") as tar:  # (compressed or not by its content, as the reader opens it)
            for _ in tar:
                pass
            return walk_stopped_early(tar, path)
    except TAR_ERRORS:
        try:  # plain: unreadable from the start, the reader reports it; compressed: cut
            with open(path, "rb") as f:
                return f.read(6).startswith(COMPRESSED_MAGIC)
        except OSError:
            return False


def walk_stopped_early(tar: tarfile.TarFile, path: str) -> bool:
    """After a walk of every header of `tar` (opened from `path`): whether its members stop before its data does, a
    plain tar cut short (`tar_ends_cut`) or with data where the walk stopped (a damaged header), a compressed one whose
    rest is not the end-of-archive blocks (`compressed_rest_cut`). The one test the header count, ldm-encode's and
    training's look at a shard's end, and ldm-eval's reader share."""
    if isinstance(tar.fileobj, io.BufferedReader):  # offsets are the file's (not a decompressed stream's)
        # (where the walk ended, the end-of-archive blocks: not there, or zeros that are the last member's data)
        return tar_ends_cut(path) or os.path.getsize(path) - tar.offset < 1024 or data_after(path, tar.offset)
    return compressed_rest_cut(tar)


def compressed_rest_cut(tar: tarfile.TarFile) -> bool:
    """After a header walk of a compressed tar: whether what follows its last member is not the end-of-archive blocks
    (zeros): the tar inside an intact compressed stream was cut (at a member's boundary: no read error tells) or has a
    damaged header. A stream cut in those zeros leaves the members whole. Decompresses the rest of the stream."""
    size, data = 0, False
    try:
        tar.fileobj.seek(tar.offset)
        while chunk := tar.fileobj.read1(1 << 16):  # (read1: a larger read that meets the cut loses what it read)
            size, data = size + len(chunk), data or bool(chunk.strip(b"\0"))
    except TAR_ERRORS:  # the compressed stream is cut (or damaged) here
        pass
    return size == 0 or data  # (a header where the walk stopped holds its name: not zeros)


def data_after(path: str, offset: int) -> bool:
    """Whether anything but zero bytes follows byte `offset` of the file at `path`: where a plain tar's header walk
    stopped, members it could not read."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 16):
            if chunk.strip(b"\0"):
                return True
    return False


def _decode(samples: Iterator[dict[str, Any]], skips: SkipLog, num_classes: int | None = None
            ) -> Iterator[dict[str, Any]]:
    """PIL image, caption and label (optional unless `num_classes` is given); undecodable samples are recorded and
    dropped."""
    for sample in samples:
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        try:
            ext = next((k for k in IMAGE_KEYS if k in sample), None)
            if ext is None:
                raise ValueError(no_image(sample))
            image = decode_image(sample[ext])  # 8-bit RGB; truncated data fails here
            caption, label = caption_and_label(sample, skips, num_classes)
        except Exception as err:  # noqa: BLE001 -- any undecodable sample is skipped and reported
            skips.add(url, key, f"{type(err).__name__}: {err}"[:200])
            continue
        yield {"image": image, "caption": caption, "key": key, "url": url, "label": label}


def no_image(sample: Mapping[str, Any]) -> str:
    """Why a raw sample has no image member, for its skip record (cut at 200 characters): the dots in its member
    names first (`img.0.jpg`: webdataset ends the key at the first dot, `img`, so `img.1.jpg` joins the same sample),
    then what it holds."""
    found = sorted(k for k in sample if not k.startswith("__"))
    dotted = next((k for k in found if k.rpartition(".")[2] in IMAGE_KEYS), None)
    if dotted:
        return (f"member names with more than one dot ({sample.get('__key__')}.{dotted}) merge samples: webdataset "
                f"ends a key at the first dot; rename them (KEY.jpg, KEY.txt)")
    return f"no image member (looked for {list(IMAGE_KEYS)}), found {found[:8]}"


CAPTION_FIELDS = ("caption", "text")  # a caption's names in metadata (KEY.json) and in ldm-data's manifests


def utf8_text(text: str) -> str:
    """`text` as UTF-8 holds it: a lone surrogate, which JSON can carry (a cut-off emoji escape, "\\ud83d") but no
    UTF-8 encoder writes, becomes "?", as the byte tokenizer reads it."""
    return text.encode("utf-8", errors="replace").decode("utf-8")


def sample_caption(sample: Mapping[str, Any]) -> str | None:
    """The caption of a raw sample as every reader takes it (training, ldm-encode, evaluation): its `txt` member as
    UTF-8 (a byte order mark dropped), stripped, or where it has none the first non-empty `caption` / `text` string
    of its `json` metadata (shards written with captions in metadata only; `utf8_text`); None without either.
    UnicodeDecodeError when it is not UTF-8; a ValueError when it holds two members with one extension (DUPLICATE:
    which is its caption or image is unclear)."""
    if DUPLICATE in sample:
        raise ValueError(f"two members with one extension ({sample[DUPLICATE]!r} and one before it; extensions are "
                         f"compared in lower case): which one the sample holds is unclear; rewrite the shard with one")
    if "txt" in sample:
        return sample["txt"].decode("utf-8-sig").strip()
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:  # (damaged metadata: the label's reader skips the sample, naming it)
        return None
    texts = [meta.get(k) for k in CAPTION_FIELDS] if isinstance(meta, dict) else []
    return next((utf8_text(text.strip()) for text in texts if isinstance(text, str) and text.strip()), None)


def sample_metadata(sample: Mapping[str, Any]) -> Any:
    """A raw sample's `json` member, parsed ({} without one); a ValueError when it is not JSON (the sample is left
    out by every reader: training, ldm-encode, evaluation)."""
    return json.loads(sample["json"]) if "json" in sample else {}


def caption_and_label(sample: dict[str, Any], skips: SkipLog, num_classes: int | None = None
                      ) -> tuple[str, int | None]:
    """A raw sample's caption ("" and counted when it has none) and integer class label: None without one, unless
    `num_classes` is given (a class-conditional model's), which makes a missing label or one outside
    [0, num_classes) a ValueError (index num_classes is the null class of guidance, never a sample's); image and
    latent samples alike."""
    caption = sample_caption(sample)
    if caption is None:
        caption = ""
        if num_classes is None:  # (a class-conditional model reads no caption)
            skips.add_uncaptioned(sample.get("__url__", "?"), sample.get("__key__", "?"))
    meta = sample_metadata(sample)
    label = meta.get("label") if isinstance(meta, dict) else None
    if not is_int(label):
        if num_classes is not None:
            raise ValueError(f"no integer 'label' in its metadata (.json: {str(meta)[:60]}), which a class-conditional "
                             f"model needs")
        label = None
    elif num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} outside the model's classes [0, {num_classes - 1}] "
                         f"(model.conditioner.num_classes={num_classes})")
    return caption, label


def resize_crop(image: Image.Image, resolution: int, rng: random.Random | None) -> Image.Image:
    """Resize the shorter side to `resolution`, then crop a square: random position if `rng`, else the centre.

    An image over MAX_RESIZED_ASPECT times longer than wide is resized inside its square's box only: resized whole,
    it would take memory in proportion to its aspect ratio (a 12000 x 1 divider line: 3.7 GB at 256 px)."""
    w0, h0 = image.size
    if (w0, h0) == (resolution, resolution):
        return image
    scale = resolution / min(w0, h0)
    w, h = max(resolution, round(w0 * scale)), max(resolution, round(h0 * scale))
    left = rng.randint(0, w - resolution) if rng else (w - resolution) // 2
    top = rng.randint(0, h - resolution) if rng else (h - resolution) // 2
    if max(w, h) > MAX_RESIZED_ASPECT * resolution:
        sx, sy = w0 / w, h0 / h
        box = (left * sx, top * sy, (left + resolution) * sx, (top + resolution) * sy)
        return image.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)
    image = image.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image.crop((left, top, left + resolution, top + resolution))


def resize_shorter(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to `resolution`, keeping the aspect ratio (as resize_crop resizes, without its crop): a
    long side over MAX_RESIZED_ASPECT times the short one is centre-cropped to that first."""
    w0, h0 = image.size
    longest = MAX_RESIZED_ASPECT * min(w0, h0)
    if max(w0, h0) > longest:
        left, top = max(0, (w0 - longest) // 2), max(0, (h0 - longest) // 2)
        image = image.crop((left, top, left + min(w0, longest), top + min(h0, longest)))
        w0, h0 = image.size
    scale = resolution / min(w0, h0)
    size = (max(resolution, round(w0 * scale)), max(resolution, round(h0 * scale)))
    return image if size == (w0, h0) else image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"image": torch.stack([s["image"] for s in samples]),  # (B, 3, R, R)
                             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    if all(s["label"] is not None for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # (B,)
    return batch


class ShardStream(IterableDataset):
    """The batches of one rank for the epoch in `plan`; each DataLoader worker produces its slot's share."""

    def __init__(self, plan: EpochPlan):
        super().__init__()
        self.plan = plan
        # url -> raw samples, kept across epochs (`plan.cache_in_memory`: the main process reads, so this object lives)
        self.cache: dict[str, list[dict[str, Any]]] | None = {} if plan.cache_in_memory else None

    def __len__(self) -> int:
        return self.plan.rank_batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        p = self.plan
        info = get_worker_info()
        physical, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if num_workers != max(1, p.num_workers):
            raise RuntimeError(f"planned for {p.num_workers} workers but the DataLoader runs {num_workers}")
        # The DataLoader takes batches round-robin from its workers, starting at worker 0, and all workers yield
        # the same number: batch i of an epoch comes from worker i mod W. Resuming after k batches, physical worker 0
        # must produce batch k, so it plays logical worker k mod W; logical worker w has already produced the
        # batches counted in `done`.
        worker = (physical + p.skip_batches) % num_workers
        done = p.skip_batches // num_workers + (1 if worker < p.skip_batches % num_workers else 0)
        slot = p.rank * num_workers + worker
        segments = p.segments(slot)
        skips = SkipLog()
        shuffle_rng = random.Random(fold_seed(p.seed, p.epoch, p.rank, worker))
        shard_counts = dict(zip(p.urls, p.counts))

        def decoded(parts: list[tuple[str, int, int]], losses: SkipLog) -> Callable[[], Iterator[dict[str, Any]]]:
            def one_pass() -> Iterator[dict[str, Any]]:  # one pass over `parts` (repeated only to top up)
                shuffle_rng.seed(fold_seed(p.seed, p.epoch, p.rank, worker))
                return iter(wds.DataPipeline(
                    lambda: _read_segments(parts, losses, self.cache, shard_counts),  # raw samples of their ranges
                    wds.shuffle(p.shuffle_buffer, p.shuffle_buffer, rng=shuffle_rng) if p.train else None,
                    lambda raw: self.decode_samples(raw, losses),  # decoded; corrupt samples recorded and dropped
                ))
            return one_pass

        # The fallback of an unreadable range: every shard, whose losses their own slots report (not counted twice).
        every_shard = [(url, 0, count) for url, count in zip(p.urls, p.counts)]
        skipped_in = [0.0]  # seconds the resume's skip took: its first batch carries them (throughput leaves them out)
        pipeline = wds.DataPipeline(
            # exactly the quota, topped up if samples were lost
            lambda: _exactly(decoded(segments, skips), p.quota(slot), slot, skips,
                             fallback=decoded(every_shard, SkipLog())),
            lambda samples: _after(samples, done * p.batch_size, skips, skipped_in),  # resume: what this worker
            #                                                                            already produced
            wds.map(self._to_tensor),  # resize, crop, flip; float (3, R, R) in [-1, 1]
            wds.batched(p.batch_size, collation_fn=self.collate_batch, partial=not p.train),
        )
        for batch in pipeline:
            batch["__skipped__"] = skips.pop()  # taken out by the loader in the main process
            batch["__uncaptioned__"] = skips.pop_uncaptioned()
            batch["__uncounted__"] = skips.pop_uncounted()
            batch["__resume_seconds__"], skipped_in[0] = skipped_in[0], 0.0
            yield batch

    # note: the three steps a sample goes through are methods so that `ldm.data.latents.LatentStream` reads latent
    # shards through the same splitting, resume and skip logic.
    def decode_samples(self, samples: Iterator[dict[str, Any]], skips: SkipLog) -> Iterator[dict[str, Any]]:
        return _decode(samples, skips, self.plan.num_classes)

    def collate_batch(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate(samples)

    def sample_rng(self, sample: dict[str, Any]) -> random.Random:
        """A sample's own draw of crops and flips: (seed, epoch, shard, key), not which worker reads it. The shard is
        named as its latent shard is (`shard_name`: `x.tar.gz` -> `x.tar`), so that a sample of a compressed image
        shard and of the latent shard ldm-encode wrote from it draw alike (the same flipped copies)."""
        name = f"{shard_name(sample['url'])}/{sample['key']}".encode()
        return random.Random(fold_seed(self.plan.seed, self.plan.epoch, zlib.crc32(name)))

    def _to_tensor(self, sample: dict[str, Any]) -> dict[str, Any]:
        p = self.plan
        rng = self.sample_rng(sample) if p.train and (p.random_crop or p.hflip) else None
        image = resize_crop(sample["image"], p.resolution, rng if p.random_crop else None)
        if p.hflip and rng is not None and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, R, R)
        sample["image"] = x.float().div_(127.5).sub_(1.0)
        return sample


def _after(samples: Iterator[dict[str, Any]], done: int, skips: SkipLog, took: list[float]
           ) -> Iterator[dict[str, Any]]:
    """`samples` after the first `done`, which the run trained before it stopped: the corrupt and uncaptioned
    samples met on the way there were counted then, so their records are dropped (a resumed run counts the rest of
    the epoch only; it counted them again). So are those met on the way to the next sample: `wds.batched` hands a
    batch on only once it holds the sample after it, so they went with the last batch trained. The seconds the skip
    took (the samples are read and decoded: a corrupt one must be left out as before) go into `took[0]`."""
    samples = iter(samples)
    if done:
        start = time.perf_counter()
        for _ in islice(samples, done):
            pass
        took[0] = time.perf_counter() - start
        following = next(samples, None)
        skips.pop()
        skips.pop_uncaptioned()
        if following is not None:
            yield following
    yield from samples


def _exactly(make: Callable[[], Iterator[dict[str, Any]]], quota: int, slot: int, skips: SkipLog,
             fallback: Callable[[], Iterator[dict[str, Any]]] | None = None) -> Iterator[dict[str, Any]]:
    """The first `quota` samples of `make()`, re-reading from the start when corrupt samples left it short.

    When the slot's own range cannot make up what it lacks in one more pass (its range lies past the real end of a
    shard that summary.json over-counts, or most samples there are corrupt: a few images would fill the quota, each
    many times), the slot reads `fallback()` for the rest instead: samples of every shard, some read twice this epoch,
    rather than a rank without batches or one that trains on a handful of images.
    """
    produced, warned = 0, False
    while produced < quota:
        got = 0
        for sample in make():
            yield sample
            produced, got = produced + 1, got + 1
            if produced == quota:
                return
        short = quota - produced
        if fallback is not None and short > got:
            read = "no sample of its range could be read" if got == 0 else f"its range gave {got} of {quota} samples"
            log.warning("data slot %d: %s (%s); reading samples of the other shards for the %d left, to keep batch "
                        "counts equal across ranks", slot, read, _damaged_shards(skips), short)
            make, fallback = fallback, None
            continue
        if got == 0:
            raise RuntimeError(f"data slot {slot}: not one sample of any shard could be read; damaged: "
                               f"{_damaged_shards(skips)}; first reasons: {skips.first}; rewrite the shards "
                               f"with ldm-data, or point data.train_shards / data.val_shards at readable ones")
        if not warned:
            log.warning("slot %d: %d samples short after skipping corrupt ones; repeating samples of its range to "
                        "keep batch counts equal across ranks", slot, short)
            warned = True


def _damaged_shards(skips: SkipLog) -> str:
    """The shards named in `skips` (all its records, those the batches have reported too), for a message."""
    return ", ".join(sorted({url for url, _ in skips.seen})) or "no shard reported an error"
