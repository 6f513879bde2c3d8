"""WebDataModule: captioned images from WebDataset shards, exact under DDP with many workers, and resumable.

Batches are dicts: `image` float32 (B, 3, R, R) in [-1, 1], `caption` list[str], `key` list[str], and `label`
int64 (B,) when every sample of the batch carries an integer `label` in its `.json`. Latent shards written by
`ldm-encode` (a manifest.json beside them) give `moments` (B, 2C, h, w) instead of `image`, and `text_context` /
`text_pooled` when their text was encoded (`ldm.data.latents`); `latent_manifest` is then their manifest.

The shards of an epoch are split over ranks x workers in contiguous, equal ranges of samples (`ldm.data.stream`
explains the plan): no sample is read twice in an epoch, every rank yields the same number of batches, and fewer than
ranks x workers x (batch_size + 1) training samples are left out per epoch. Rank and world size are read here, in the
main process (trainer, else torch.distributed, else RANK/WORLD_SIZE), and travel into the workers inside the dataset.

`state_dict()` holds the data position (epoch, batches consumed); after `load_state_dict()` the train loader resumes
exactly there. Under a Trainer, "consumed" counts the batches handed to training steps (the public
`on_after_batch_transfer` hook sees each one), not the batches the loader has produced, which run ahead by the
fetcher's prefetch. Lightning iterates the train loader once per epoch and every `iter()` reads the trainer's epoch,
so no `reload_dataloaders_every_n_epochs` is needed. Corrupt samples are skipped, logged with shard and key, and
counted in `num_skipped` / `skipped`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import signal
import tarfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ldm.config import ConfigError, is_int, to_dataclass
from ldm.data.latents import (
    LatentManifest,
    LatentStream,
    check_data_config,
    check_same_encoders,
    find_manifest,
    stats_path,
)
from ldm.data.shardlist import REMOTE_PREFIXES, expand_shards
from ldm.data.shards import SUMMARY_NAME
from ldm.data.stream import TAR_ERRORS, EpochPlan, ShardStream, member_key, tar_ends_cut, walk_stopped_early
from ldm.distributed import rank_and_world

log = logging.getLogger(__name__)

# Our __len__ is exact by construction (every slot yields the same number of batches), so Lightning's generic
# warning about IterableDataset lengths does not apply.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")

# The settings an epoch's data order depends on (`state_dict` key -> what the user changes); `data.num_workers` as
# slots per rank, so 0 and 1 (both one slot) order alike.
ORDER_SETTINGS = {"seed": "data.seed", "world_size": "world size (devices x nodes)",
                  "num_workers": "data.num_workers (at least 1)", "batch_size": "data.batch_size",
                  "shuffle_buffer": "data.shuffle_buffer",
                  "shard_set": "the training shards (data.train_shards: their names, sample counts and order)"}


def shard_set(urls: list[str], counts: list[int]) -> str:
    """What of a shard set the data order depends on, as one value: the shards' file names and sample counts, in
    order (a hash; their folder may move). Shards added to a set that is still downloading reorder every epoch."""
    digest = hashlib.sha256("\n".join(f"{os.path.basename(u)}\t{n}" for u, n in zip(urls, counts)).encode())
    return f"{len(urls)} shards of {sum(counts)} samples ({digest.hexdigest()[:8]})"


# ----------------------------------------------------------------------------------------------------------------------
# Shard lists and their sample counts (main process).


def _count_tar_samples(path: str) -> int:
    """Samples in a local tar (reads headers only), counted as webdataset groups them: a new sample wherever a member's
    key differs from the one before (a key seen again further on is another sample); a damaged tar counts the whole
    samples before the damage."""
    count, last, plain, counted_cut = 0, None, True, False
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:*") as tar:
            plain = isinstance(tar.fileobj, io.BufferedReader)  # offsets are the file's (not a decompressed stream's)
            for member in tar:
                if member.isreg() and (split := member_key(member.name)) is not None:
                    prefix = split[0]
                    if plain and member.offset_data + member.size > size:  # cut short inside its data
                        # the sample it belongs to is not whole either (counted already when it has members before
                        # this one); the one before it is
                        count -= int(prefix == last)
                        counted_cut = True
                        raise tarfile.ReadError(f"{member.name} is cut short")
                    if prefix != last:
                        count, last = count + 1, prefix
            # cut at a member's boundary, or a damaged header where the walk stopped: the last sample may lack members
            stopped_early = walk_stopped_early(tar, path)
        if count and stopped_early:
            log.warning("shard %s is damaged (its members stop before its end (cut short, or a damaged member header: "
                        "what follows is lost), so its last sample (%s) may be cut short): counting the %d samples "
                        "before the damage", path, last, count - 1)
            return count - 1
    except TAR_ERRORS as err:
        # a compressed tar breaks at the header after a member cut short, a plain one cut in a member's padding or a
        # header at that header: as the reader, leave out the sample it was reading
        if count and not counted_cut and (not plain or tar_ends_cut(path)):
            count -= 1
        log.warning("shard %s is damaged (%s): counting the %d samples before the damage", path, err, count)
    return count


def shard_counts(urls: list[str], key: str, samples_per_shard: int | None) -> list[int]:
    """Samples per shard: the recorded count (`recorded_counts`), else a header scan of local tars, else the
    `samples_per_shard` hint (remote shards without counts)."""
    counts = []
    for url, recorded in zip(urls, recorded_counts(urls)):
        if recorded is not None:
            counts.append(recorded)
        elif not url.startswith(REMOTE_PREFIXES):
            counts.append(_count_tar_samples(url.removeprefix("file:")))
        elif samples_per_shard is not None:
            counts.append(samples_per_shard)
        else:
            raise ConfigError(f"{key}: cannot count the samples of remote shard {url!r}; set "
                              f"data.samples_per_shard to the number of samples per shard")
    return counts


def recorded_counts(urls: list[str]) -> list[int | None]:
    """Samples per shard as written down beside local shards: summary.json (ldm-data), else img2dataset's (or
    ldm-encode's) `*_stats.json`; None where nothing records it (remote shards, or a count only a scan would give)."""
    summaries: dict[str, dict[str, int]] = {}
    counts: list[int | None] = []
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            counts.append(None)
            continue
        path = Path(url.removeprefix("file:"))
        folder = str(path.parent.resolve())
        if folder not in summaries:
            summaries[folder] = _summary_counts(path.parent / SUMMARY_NAME)
        if path.name in summaries[folder]:
            counts.append(summaries[folder][path.name])
        elif (stats := stats_path(path)).exists():
            counts.append(_stats_count(stats))
        else:
            counts.append(None)
    return counts


def _written_summary(urls: list[str]) -> dict[str, Any]:
    """ldm-data's summary.json beside the first local shard of `urls`; {} without one (or an unreadable one)."""
    local = [Path(u.removeprefix("file:")) for u in urls if not u.startswith(REMOTE_PREFIXES)]
    summary = local[0].parent / SUMMARY_NAME if local else None
    if summary is None or not summary.is_file():
        return {}
    try:
        written = json.loads(summary.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return written if isinstance(written, dict) else {}


def _written_square(urls: list[str]) -> tuple[str, int] | None:
    """(source: shapes or folder, size) when ldm-data's summary.json beside the first local shard says it wrote square
    images there (at any size: a square resized to the training resolution leaves nothing to crop), else None."""
    written = _written_summary(urls)
    square = is_int(written.get("resolution")) and written.get("crop", True)
    return (str(written.get("source", "folder")), written["resolution"]) if square else None


def _first_metadata(urls: list[str]) -> tuple[str, Any] | None:
    """(shard, the parsed KEY.json of its first sample, None without one) for the first local shard of `urls` that
    holds a sample; None when none can be read here (remote shards; damage is the loader's business)."""
    for url in urls:
        if url.startswith(REMOTE_PREFIXES):
            continue
        try:
            with tarfile.open(url.removeprefix("file:"), "r:*") as tar:
                first = None
                for member in tar:
                    split = member_key(member.name) if member.isreg() else None
                    if split is None:
                        continue
                    key, ext = split
                    if first is not None and key != first:
                        return url, None  # the first sample ended without a .json
                    first = key
                    if ext == "json":
                        return url, json.loads(tar.extractfile(member).read())
                if first is not None:
                    return url, None
        except (*TAR_ERRORS, ValueError):
            return None
    return None


def _stats_count(path: Path) -> int:
    """The sample count an img2dataset (or ldm-encode) `*_stats.json` records."""
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["successes"])
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ConfigError(f"{path} is not the stats file of a shard ({type(err).__name__}: {err}); delete it to count "
                          f"the samples from the tar headers") from None


def _summary_counts(path: Path) -> dict[str, int]:
    if not path.exists():
        return {}
    try:
        splits = json.loads(path.read_text()).get("splits", {})
        return {name: int(n) for split in splits.values() for name, n in zip(split["shards"], split["shard_counts"])}
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a shard summary ldm-data wrote ({type(err).__name__}: {err}); delete it to "
                          f"count the samples from the tar headers, or rewrite the shards with ldm-data") from None


# ----------------------------------------------------------------------------------------------------------------------
# The loader and the DataModule (main process).


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _leave_stop_signals_to_the_trainer(_worker_id: int) -> None:
    """Loader workers leave stop signals to the training process (`ldm.slurm.SlurmRequeue`), which saves and then
    ends its workers itself: SLURM, scancel and a terminal's Ctrl-C signal the whole process group, and a worker that
    died of SIGTERM (torch's default) would take the run down before it saved. SIGINT and SIGUSR1 are ignored, the
    first SIGTERM too; a second ends the worker as the default would.

    Only the workers of a loader iterated while a Trainer runs do so: a script that still holds a loader's iterator
    when it exits (also after a fit) gets its workers ended by multiprocessing's exit handler, whose one SIGTERM an
    ignoring worker outlived while the handler waited for it forever.

    note: the price is paid by a worker that does not stop within 5 s of its loader's shutdown (a read hung on a
    network file system): torch's one `terminate()` of it is the ignored first SIGTERM, so it lives on, idle, until
    the training process exits, whose multiprocessing exit handler signals it again."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: signal.signal(signal.SIGTERM, signal.SIG_DFL))


@contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """Stop signals ignored in this process meanwhile, so that the loader workers it starts (by spawn, macOS's start
    method, or forkserver) begin ignoring them: such a worker imports torch for seconds before `worker_init_fn` runs,
    and a Ctrl-C to the process group then killed it and took the run down unsaved (a child inherits an ignored
    signal through exec; a handler, blocking or a forked child's early `worker_init_fn` would not do). A stop signal
    in the milliseconds the workers take to start goes unseen by this process too; the next one is seen."""
    handlers = {s: signal.signal(s, signal.SIG_IGN) for s in STOP_SIGNALS} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


class EpochLoader(DataLoader):
    """A DataLoader whose every `iter()` starts an epoch: it asks `begin_epoch(len)` for (epoch, batches to skip),
    plants them in the dataset's plan before the workers start, and hands each batch's skip report to `on_batch`.

    Lightning calls `iter()` once per epoch (and the workers are not persistent), so the epoch reaches the workers
    without `reload_dataloaders_every_n_epochs`. It is also `_Stateful` for Lightning: its state is the datamodule's.
    """

    def __init__(self, dataset: ShardStream, split: str, begin_epoch: Callable[[int], tuple[int, int]],
                 on_batch: Callable[[list[tuple[str, str, str, int]]], None], datamodule: WebDataModule,
                 **kwargs: Any):
        super().__init__(dataset, batch_size=None, persistent_workers=False, **kwargs)
        self.split = split
        self.begin_epoch = begin_epoch
        self.on_batch = on_batch
        self.datamodule = datamodule

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        self.dataset.plan.epoch, self.dataset.plan.skip_batches = self.begin_epoch(len(self.dataset))
        trainer = self.datamodule.trainer
        running = trainer is not None and trainer.state.status == TrainerStatus.RUNNING  # (a finished fit stays set)
        self.worker_init_fn = _leave_stop_signals_to_the_trainer if running else None  # read by iter()
        context = self.multiprocessing_context
        method = context if isinstance(context, str) else \
            (context or multiprocessing).get_start_method()  # type: ignore[union-attr]
        with _stop_signals_ignored() if running and self.num_workers and method != "fork" else nullcontext():
            iterator = super().__iter__()  # starts the workers
        if trainer is not None and trainer.sanity_checking:  # a few batches only: the first whole pass comes later
            return self._batches(iterator, first=False)
        passes = self.datamodule.passes
        passes[self.split] = passes.get(self.split, 0) + 1
        return self._batches(iterator, first=passes[self.split] == 1)

    def _batches(self, iterator: Iterator[dict[str, Any]], first: bool) -> Iterator[dict[str, Any]]:
        """Each batch without its reports; those of the split's first pass are counted (later epochs and validations,
        also through a new loader of the split, as `trainer.reload_dataloaders_every_n_epochs` builds, meet the same
        samples again, and would count them again)."""
        for i, batch in enumerate(iterator):
            resumed = batch.pop("__resume_seconds__", 0.0)
            if i == 0 and resumed and self.datamodule.trainer is not None:  # (the later workers' skips overlap it)
                from ldm.callbacks.throughput import leave_out

                log.info("%.1f s to read up to the resumed position in the epoch (left out of the throughput "
                         "numbers)", resumed)
                leave_out(self.datamodule.trainer, resumed)
            uncaptioned, skipped = batch.pop("__uncaptioned__", []), batch.pop("__skipped__", [])
            self.datamodule.record_uncounted(batch.pop("__uncounted__", {}))
            if first:
                self.datamodule.record_uncaptioned(uncaptioned)
            self.on_batch(skipped if first else [])
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return self.datamodule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.datamodule.load_state_dict(state_dict)


class WebDataModule(L.LightningDataModule):
    """Train and validation batches from WebDataset shards (see the module docstring for DDP and resume)."""

    @dataclass
    class Config:
        train_shards: Any = None  # path, brace pattern, glob, list, or URL (pipe:, http); required
        val_shards: Any = None  # the same forms; null: no validation data
        resolution: int = 32  # output side: resize the shorter side, then crop a square
        batch_size: int = 32  # per process (the global batch is batch_size x world size x accumulation)
        val_batch_size: int | None = None  # null: batch_size
        num_workers: int = 2  # DataLoader workers per process; the shards are split over ranks x workers
        shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer (training only)
        random_crop: bool = False  # training: random instead of centre crop
        hflip: bool = False  # training: horizontal flip with probability 1/2 (do not use when captions say left/right)
        seed: int = 0  # order from (seed, epoch, rank, worker), crops and flips from (seed, epoch, shard, key)
        samples_per_shard: int | None = None  # sample count assumed for remote shards that have no summary.json
        pin_memory: bool = True
        # Keep every shard's raw samples in memory after their first read, so later epochs and validations parse no
        # tar (small data sets: the quickstart's 4000 latents take about 50 MB). Read in the training process only.
        cache_in_memory: bool = False
        # Resuming mid-epoch with another data order (world size, workers, batch size or seed changed since the
        # checkpoint) cannot continue that epoch exactly: refused unless true (then the rest of the epoch repeats some
        # samples and misses others).
        allow_inexact_resume: bool = False

        def __post_init__(self) -> None:
            if self.train_shards is None:
                raise ConfigError("data.train_shards is required: a shard path, brace pattern, glob or list, e.g. "
                                  "data.train_shards=data/shapes/train-*.tar")
            for name in ("resolution", "batch_size"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
            if self.samples_per_shard is not None and self.samples_per_shard < 1:
                raise ConfigError(f"data.samples_per_shard={self.samples_per_shard} must be >= 1 or null")
            if self.val_batch_size is not None and self.val_batch_size < 1:
                raise ConfigError(f"data.val_batch_size={self.val_batch_size} must be >= 1 or null")
            if self.num_workers < 0 or self.shuffle_buffer < 1:
                raise ConfigError(f"data.num_workers={self.num_workers} must be >= 0 and "
                                  f"data.shuffle_buffer={self.shuffle_buffer} >= 1")
            if self.cache_in_memory and self.num_workers > 0:
                raise ConfigError(f"data.cache_in_memory=true keeps the samples in the training process, but "
                                  f"data.num_workers={self.num_workers} reads them in loader processes that end "
                                  f"with each epoch; set data.num_workers=0 or data.cache_in_memory=false")

    def __init__(self, config: Config | dict | DictConfig | None = None, **overrides: Any):
        super().__init__()
        if isinstance(config, DictConfig):
            config = OmegaConf.to_container(config, resolve=True)
        base = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
        self.config = to_dataclass(self.Config, {**base, **overrides}, "data")
        self.train_urls: list[str] = []
        self.train_counts: list[int] = []
        self.val_urls: list[str] = []
        self.val_counts: list[int] = []
        self.num_skipped = 0  # corrupt samples skipped by this process's loaders
        self.skipped: list[tuple[str, str, str]] = []  # (shard, key, reason), the first 1000
        self.uncaptioned: dict[str, int] = {}  # shard -> samples without a caption (they train with "")
        self._uncounted: set[str] = set()  # shards found to hold more samples than their count (warned once)
        self.passes: dict[str, int] = {}  # split -> iterations its loaders started: epochs or validations (Lightning's
        #                                   sanity check aside)
        self._epoch = -1  # epoch of the current train iteration (-1: none yet)
        self._batches = 0  # train batches the loader yielded in it (including those skipped on resume)
        self._trained = 0  # train batches handed to training steps in it (including those skipped on resume)
        self._epoch_batches: int | None = None  # train batches per epoch of the current iteration
        self._resume: dict[str, Any] | None = None
        self._recorded_order: dict[str, Any] = {}  # order settings of a resumed run's config (`check_resume`)
        self._logged_counts = (0.0, 0.0)  # the all-ranks totals last logged as data/skipped and data/uncaptioned
        self._fit_first_step: int | None = None  # the global step this process's fit began at
        self._counts_step = -1  # the global step at whose first batch the counts were last summed
        self.latent_manifest: LatentManifest | None = None  # set by setup() when the shards are ldm-encode latents
        # Set by a class-conditional model in its `setup` hook, before the loaders are built: a sample without an
        # integer label in [0, num_classes) is then skipped and counted as corrupt instead of failing its batch.
        self.num_classes: int | None = None

    @classmethod
    def check_files(cls, config: Config) -> None:
        """Fail before anything is built when a local shard set matches no file (`ldm-train` calls it at start)."""
        expand_shards(config.train_shards, "data.train_shards")
        if config.val_shards is not None:
            expand_shards(config.val_shards, "data.val_shards", "val")

    # -- setup ---------------------------------------------------------------------------------------------------------

    def setup(self, stage: str | None = None) -> None:
        c = self.config
        if not self.train_urls:
            self.train_urls = expand_shards(c.train_shards, "data.train_shards")
            self.train_counts = shard_counts(self.train_urls, "data.train_shards", c.samples_per_shard)
        if c.val_shards is not None and not self.val_urls:
            self.val_urls = expand_shards(c.val_shards, "data.val_shards", "val")
            self.val_counts = shard_counts(self.val_urls, "data.val_shards", c.samples_per_shard)
        self._find_latents()

    def _find_latents(self) -> None:
        """Latent shards are recognised by their manifest; train and val must both be latents of one encoding."""
        train = find_manifest(self.train_urls, "data.train_shards")
        val = find_manifest(self.val_urls, "data.val_shards") if self.val_urls else train
        if (train is None) != (val is None):
            raise ConfigError(f"data.train_shards and data.val_shards must both be images or both latent shards; "
                              f"only {'data.train_shards' if train else 'data.val_shards'} has a manifest.json")
        if train is not None:
            check_same_encoders(train, val, "data.val_shards", settings=("resolution",))
            check_data_config(train, self.config.resolution, self.config.hflip, self.config.random_crop)
        elif self.config.random_crop and (written := _written_square(self.train_urls)):
            (source, size), r = written, self.config.resolution
            fix = "set data.random_crop=false" if source == "shapes" else \
                f"write them with crop=false (shorter side {r}, aspect kept) or resolution=null for random crops"
            warnings.warn(f"data.random_crop=true crops nothing here: the training shards hold {source} images that "
                          f"ldm-data wrote square at {size} x {size}, resized square to {r} x {r}; {fix}", stacklevel=2)
        self.latent_manifest = train

    def _stream(self, plan: EpochPlan) -> ShardStream:
        return ShardStream(plan) if self.latent_manifest is None else LatentStream(plan, self.latent_manifest)

    def _plan(self, train: bool, world_size: int | None = None) -> EpochPlan:
        """The epoch plan of this rank, or (`world_size` given: before any trainer) of rank 0 of that many."""
        c = self.config
        rank, world_size = rank_and_world(self.trainer) if world_size is None else (0, world_size)
        urls, counts = (self.train_urls, self.train_counts) if train else (self.val_urls, self.val_counts)
        batch_size = c.batch_size if train else (c.val_batch_size or c.batch_size)
        plan = EpochPlan(urls, counts, c.seed, rank, world_size, c.num_workers, batch_size, train, c.resolution,
                         c.shuffle_buffer, c.random_crop, c.hflip, c.cache_in_memory, self.num_classes)
        if plan.rank_batches == 0:
            key = "data.train_shards" if train else "data.val_shards"
            need = (f"each of the {plan.slots} slots ({world_size} ranks x {max(1, c.num_workers)} workers) a batch "
                    f"of {batch_size}; lower the batch size or data.num_workers" if train else
                    f"each of the {world_size} ranks a sample; use fewer processes")
            raise ConfigError(f"{key}: {sum(counts)} samples in {len(urls)} shards cannot give {need}, or write more "
                              f"samples")
        return plan

    def train_dataloader(self) -> EpochLoader:
        self.setup("fit")
        self._check_labelled()
        plan = self._plan(train=True)
        log.info("train data: %d samples in %d shards over %d slots (%d ranks x %d workers): %d batches of %d per "
                 "rank per epoch, %d samples left out per epoch", sum(plan.counts), len(plan.urls), plan.slots,
                 plan.world_size, max(1, plan.num_workers), plan.rank_batches, plan.batch_size, plan.left_out)
        self._warn_short_accumulation(plan)
        return EpochLoader(self._stream(plan), "train", self._begin_train_epoch, self._on_train_batch, self,
                           num_workers=self.config.num_workers, pin_memory=self._pin_memory())

    def _check_labelled(self) -> None:
        """A class-conditional model (`num_classes` set) trains and validates from each sample's integer `label`:
        refuse, before any step, shards whose first sample has none (shards of captions alone), rather than skip
        every sample as corrupt (the validation shards' at the first validation, thousands of steps in)."""
        if self.num_classes is None:
            return
        for key, urls in (("data.train_shards", self.train_urls), ("data.val_shards", self.val_urls)):
            first = _first_metadata(urls)
            if first is None:
                continue
            shard, meta = first
            if not (isinstance(meta, dict) and is_int(meta.get("label"))):
                raise ConfigError(f"{key}: the first sample of {shard} has no integer 'label' in its metadata "
                                  f"(KEY.json: {str(meta)[:80]}), and this class-conditional model trains from one; "
                                  f"write the shards with labels (ldm-data source=folder labels=folders: one class "
                                  f"per subfolder of input_dir; source=shapes), or train a text-conditioned model")

    def uncaptioned_classes(self) -> list[str] | None:
        """The class names of training shards that ldm-data wrote from class folders (labels=folders) with no
        caption for any image; None otherwise. A model conditioned on prompts would learn from empty ones alone."""
        written = _written_summary(self.train_urls or expand_shards(self.config.train_shards, "data.train_shards"))
        classes, splits = written.get("classes"), written.get("splits")
        try:
            count = sum(int(split["count"]) for split in splits.values())
        except (AttributeError, KeyError, TypeError, ValueError):
            return None
        missing = written.get("missing_captions")
        uncaptioned = isinstance(missing, list) and count > 0 and len(missing) >= count
        return classes if isinstance(classes, list) and uncaptioned else None

    def _warn_short_accumulation(self, plan: EpochPlan) -> None:
        """Warn when trainer.accumulate_grad_batches does not divide an epoch's batches (Lightning's limit included):
        the epoch's last optimizer step is then smaller than the global batch printed at start."""
        if self.trainer is None or self.trainer.accumulate_grad_batches == 1:
            return
        accumulate, batches, limit = self.trainer.accumulate_grad_batches, plan.rank_batches, \
            self.trainer.limit_train_batches
        batches = min(batches, limit) if isinstance(limit, int) else int(batches * limit)
        short = batches % accumulate
        if short:
            log.warning("trainer.accumulate_grad_batches=%d does not divide the %d batches per rank per epoch: each "
                        "epoch's last optimizer step takes %d micro-batch(es), its gradient divided by %d like the "
                        "others' (Lightning's rule), so that step sees %d samples per rank, not the %d printed; set "
                        "trainer.accumulate_grad_batches to a divisor of %d (or change data.batch_size)",
                        accumulate, batches, short, accumulate, short * plan.batch_size, accumulate * plan.batch_size,
                        batches)

    def val_dataloader(self) -> EpochLoader | list:
        if self.config.val_shards is None:
            return []
        self.setup("validate")
        self._check_labelled()  # (a sanity check reads these first)
        plan = self._plan(train=False)
        log.info("val data: %d samples in %d shards over %d ranks: %d batches of at most %d per rank, %d samples left "
                 "out", sum(plan.counts), len(plan.urls), plan.world_size, plan.rank_batches, plan.batch_size,
                 plan.left_out)
        return EpochLoader(self._stream(plan), "val", lambda _: (0, 0), self._record_skipped, self,
                           num_workers=self.config.num_workers, pin_memory=self._pin_memory())

    def _pin_memory(self) -> bool:
        return self.config.pin_memory and torch.cuda.is_available()

    # -- epochs, position and resume -----------------------------------------------------------------------------------

    def _begin_train_epoch(self, num_batches: int) -> tuple[int, int]:
        """(epoch, batches to skip) for a new iteration of the train loader, which has `num_batches` per epoch.

        The first iteration after `load_state_dict` continues at the loaded position; a position at the end of an
        epoch (of the saved run's length; of this one's for checkpoints that do not record it) means the start of the
        next (Lightning restarted from such a checkpoint trains that next epoch on the loader's first iterator). A
        position inside the saved epoch under other order settings is refused (`_check_inexact_resume`), also when
        this run's epochs would end before it; allowed, the epoch goes on after the batches trained, or, past the end
        of this run's shorter epoch, runs again from its start (Lightning finishes that epoch on the first iterator,
        and its next one reads the next epoch). Otherwise the epoch is the trainer's when one is attached (Lightning
        iterates the loader once per epoch; epoch 0 again and again under `trainer.overfit_batches`, which must see
        the same batches), else one more than the last iteration's.
        """
        num_batches = self._epoch_length(num_batches)
        if self._resume is not None:
            epoch, skip = self._resume["epoch"], self._resume["batches"]
            saved_end = self._resume["epoch_batches"]  # note: other settings can make this run's epochs longer
            if skip >= (num_batches if saved_end is None else saved_end):
                if self._resume["changed"] and num_batches > skip:  # Lightning goes on counting from the saved batch
                    warnings.warn(f"the checkpoint ended epoch {epoch} after {skip} batches; under the new data order "
                                  f"({', '.join(self._resume['changed'])} changed) an epoch has {num_batches}, and "
                                  f"Lightning counts the next one from batch {skip}: it trains {num_batches - skip} "
                                  f"batches of epoch {epoch + 1}, the epochs after it whole", stacklevel=2)
                epoch, skip = epoch + 1, 0
            if skip and self._resume["changed"]:
                self._check_inexact_resume(epoch, skip, self._resume["changed"], again=skip >= num_batches)
                skip = 0 if skip >= num_batches else skip
            self._resume = None
        elif self.trainer is not None:  # trainer.overfit_batches: the same few batches every epoch (epoch 0's)
            epoch, skip = 0 if self.trainer.overfit_batches else self.trainer.current_epoch, 0
        else:
            epoch, skip = self._epoch + 1, 0
        self._epoch, self._batches, self._trained = epoch, skip, skip
        self._epoch_batches = num_batches
        return epoch, skip

    def _epoch_length(self, num_batches: int) -> int:
        """Train batches per epoch: the loader's `num_batches`, or fewer where a fitting trainer stops its epochs
        early (`trainer.limit_train_batches`), so that a checkpoint at such an epoch's end resumes into the next."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return num_batches
        limit = trainer.limit_train_batches  # note: num_training_batches is set only after the loader's first iter()
        if isinstance(limit, int):                # a count of batches, as Lightning reads it
            return min(num_batches, limit)
        return int(num_batches * limit) if limit is not None and limit < 1.0 else num_batches  # a fraction

    def _on_train_batch(self, skipped: list[tuple[str, str, str, int]]) -> None:
        self._batches += 1
        self._record_skipped(skipped)

    def _record_skipped(self, skipped: list[tuple[str, str, str, int]]) -> None:
        for shard, key, reason, count in skipped:
            log.warning("skipped corrupt sample%s: shard %s, key %s (%s)", "s" if count > 1 else "", shard, key,
                        reason)
            if len(self.skipped) < 1000:
                self.skipped.append((shard, key, reason))
            self.num_skipped += count

    def record_uncaptioned(self, samples: list[tuple[str, str]]) -> None:
        """Count samples without a caption; warn once per shard (they train with the empty caption)."""
        for shard, key in samples:
            if shard not in self.uncaptioned:
                log.warning("shard %s: sample %s has no caption (.txt, or a non-empty caption / text string in its "
                            ".json); it trains with the empty caption \"\" (one warning per shard; the run's total is "
                            "printed at the end)", shard, key)
            self.uncaptioned[shard] = self.uncaptioned.get(shard, 0) + 1

    def record_uncounted(self, shards: dict[str, int]) -> None:
        """Warn once per shard that it holds samples past its recorded count, which are never read."""
        for shard, count in shards.items():
            if shard in self._uncounted:
                continue
            self._uncounted.add(shard)
            if not shard.startswith(REMOTE_PREFIXES) and recorded_counts([shard]) == [None]:
                continue  # counted by its headers, less a last sample perhaps cut short (warned as damaged then)
            log.warning("shard %s holds more samples than its recorded count (%d): the rest are never read. "
                        "Correct the count (ldm-data's summary.json, img2dataset's NAME_stats.json or "
                        "data.samples_per_shard; deleted or unset, the tar headers are counted)", shard, count)

    def _log_data_counts(self) -> tuple[int, int]:
        """(skipped, uncaptioned): the totals of all ranks so far, logged from rank 0 as `data/skipped` and
        `data/uncaptioned` when they changed, at the last step trained (as Lightning logs a step's metrics). A
        collective: every rank calls it at the same point of the fit."""
        trainer = self.trainer
        self._counts_step = trainer.global_step
        counts = torch.tensor([self.num_skipped, sum(self.uncaptioned.values())], dtype=torch.float64)
        totals = trainer.strategy.reduce(counts.to(trainer.strategy.root_device), reduce_op="sum").tolist()
        if tuple(totals) != self._logged_counts:
            self._logged_counts = tuple(totals)
            for logger in trainer.loggers:  # note: Lightning's loggers write on rank 0 only
                logger.log_metrics({"data/skipped": totals[0], "data/uncaptioned": totals[1]},
                                   step=max(trainer.global_step - 1, 0))
        return int(totals[0]), int(totals[1])

    def teardown(self, stage: str) -> None:
        """At the end of a fit: the run's totals of skipped and uncaptioned samples (each rank its own, rank 0 all)."""
        if stage != "fit" or self.trainer is None:
            return
        rank, world_size = rank_and_world(self.trainer)
        skipped, uncaptioned = self._log_data_counts()
        self._fit_first_step = None
        shards = sorted({shard for shard, _, _ in self.skipped})
        log.info("data (rank %d): %d corrupt samples skipped%s; %d samples without a caption in %d shards",
                 rank, self.num_skipped, f" (shards {shards[:5]})" if shards else "",
                 sum(self.uncaptioned.values()), len(self.uncaptioned))
        if world_size > 1 and rank == 0:
            log.info("data (all %d ranks): %d corrupt samples skipped; %d samples without a caption", world_size,
                     skipped, uncaptioned)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning's data hook, called with every batch right before its step: count the training ones, and log the
        skipped and uncaptioned samples of all ranks at the steps Lightning logs (n with (n + 1) %
        `trainer.log_every_n_steps` == 0), once the step after it begins: its first batch, in this process's fit (the
        end of the fit logs the last)."""
        trainer = self.trainer
        if trainer is not None and trainer.training:
            self._trained += 1
            step, every = trainer.global_step, trainer.log_every_n_steps
            if self._fit_first_step is None:
                self._fit_first_step = step
            if every and step % every == 0 and step > self._fit_first_step and step != self._counts_step:
                self._log_data_counts()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """The data position: epoch and train batches consumed in it (Lightning stores this in checkpoints).

        Under a fitting trainer the count is the batches handed to training steps (the loader runs ahead by its
        prefetch); otherwise it is the batches this datamodule's train loader has yielded. The epoch is the one the
        loader is in, whatever the fit loop has counted: Lightning's end-of-run save comes after the loop has closed
        the epoch.
        """
        trainer = self.trainer
        fitting = trainer is not None and trainer.state.fn == TrainerFn.FITTING
        epoch, batches = self._epoch, self._trained if fitting else self._batches
        return {"epoch": max(epoch, 0), "batches": batches, "epoch_batches": self._epoch_batches,
                **self._order_settings()}

    def _order_settings(self) -> dict[str, Any]:
        """This run's values of the `ORDER_SETTINGS`, under their `state_dict` keys."""
        return {"seed": self.config.seed, "world_size": rank_and_world(self.trainer)[1],
                "num_workers": self.config.num_workers, "batch_size": self.config.batch_size,
                "shuffle_buffer": self.config.shuffle_buffer,
                "shard_set": shard_set(self.train_urls, self.train_counts)}

    def check_resume(self, checkpoint: dict[str, Any], world_size: int) -> None:
        """Before a resume from `checkpoint` by `world_size` processes (ldm-train calls it before it writes anything):
        refuse a position inside an epoch under other order settings, as the first batch would (`load_state_dict`),
        while the run's config.yaml and logs still hold the settings to resume with. The order settings that the
        checkpoint's datamodule state lacks are taken from the run config it records (the states of older ldm hold
        no shuffle_buffer: a mid-epoch resume under another one went on unsaid; nor the epoch's length, which is then
        this run's, as the first batch takes it)."""
        data = ((checkpoint.get("ldm") or {}).get("config") or {}).get("data") or {}
        self._recorded_order = {k: data[k] for k in ORDER_SETTINGS if k in data}
        state = checkpoint.get(type(self).__qualname__)
        if not isinstance(state, dict) or self.config.allow_inexact_resume:
            return
        skip, end = int(state.get("batches") or 0), state.get("epoch_batches")
        if not skip:
            return
        self.setup("fit")
        if end is None:  # an older state: the epoch's end by this run's length, as the first batch would judge it
            end = self._plan(train=True, world_size=world_size).rank_batches
        if skip < end:  # inside the saved epoch
            if changed := self._changed_order(state, world_size):
                self._check_inexact_resume(int(state["epoch"]), skip, changed)

    def _changed_order(self, state: dict[str, Any], world_size: int | None = None) -> dict[str, tuple[Any, Any]]:
        """The order settings (by what the user changes) whose saved value in `state` differs from this run's."""
        def order(settings: dict[str, Any]) -> dict[str, Any]:  # what the epoch's data order depends on
            return {ORDER_SETTINGS[k]: max(1, v) if k == "num_workers" else v for k, v in settings.items()
                    if k in ORDER_SETTINGS}
        now = {**self._order_settings(), **({"world_size": world_size} if world_size is not None else {})}
        saved, now = order({**self._recorded_order, **state}), order(now)
        return {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume at the stored position: the next train iteration of that epoch skips the consumed batches."""
        self._resume = {"epoch": int(state_dict["epoch"]), "batches": int(state_dict["batches"]),
                        "changed": self._changed_order(state_dict), "epoch_batches": state_dict.get("epoch_batches")}

    def _check_inexact_resume(self, epoch: int, skip: int, changed: dict[str, tuple[Any, Any]],
                              again: bool = False) -> None:
        """Refuse to continue an epoch under another data order, unless `data.allow_inexact_resume`; `again`: the
        position lies past the end of this run's epoch, which then runs again from its start."""
        what = ", ".join(f"{k} {saved} -> {now}" for k, (saved, now) in changed.items())
        if not self.config.allow_inexact_resume:
            raise ConfigError(f"the checkpoint stopped {skip} batches into epoch {epoch} under another data order "
                              f"({what}; saved -> now): the rest of that epoch cannot be continued exactly. Resume "
                              f"with the saved settings, or set data.allow_inexact_resume=true to go on anyway (the "
                              f"rest of the epoch then repeats some samples and misses others)")
        if again:
            warnings.warn(f"data.allow_inexact_resume: the checkpoint stopped {skip} batches into epoch {epoch}, past "
                          f"the end of an epoch under the new data order ({what}; saved -> now): epoch {epoch} runs "
                          f"again from its start", stacklevel=2)
        else:
            warnings.warn(f"data.allow_inexact_resume: continuing epoch {epoch} after {skip} batches under another "
                          f"data order ({what}; saved -> now): the rest of the epoch repeats some samples and misses "
                          f"others", stacklevel=2)
