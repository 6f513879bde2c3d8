"""Latent shards: what `ldm-encode` writes and the datamodule reads instead of images.

A latent shard has the name of the image shard it was encoded from (a `.tar.gz` or `.tgz` one's as `.tar`) and
holds, per sample (WebDataset members sharing the sample's key):

    KEY.moments.npy       (2C, h, w) float16: the posterior's mean and log-variance stacked on channels, as
                          `DiagonalGaussianDistribution(moments)` takes them
    KEY.moments_flip.npy  the same for the horizontally flipped image (only when encoded with flips=true)
    KEY.context.npy       (L, D) the frozen text encoder's tokens for the caption (only with a text encoder)
    KEY.pooled.npy        (D,) its pooled vector (only with a text encoder)
    KEY.txt, KEY.json     the caption and metadata, copied unchanged from the image shard

Arrays are plain .npy (read with `allow_pickle=False`: loading a shard never runs code). Beside the shards,
`manifest.json` names the autoencoder (sha256 of its weights, latent scale, factor, resolution) and the text encoder
(sha256, config); each finished shard has a `NAME_stats.json` (img2dataset's convention: `successes` is its sample
count, which the datamodule reads).

The datamodule recognises latent shards by the manifest beside them and reads them through `LatentStream`: the same
epoch plan, DDP split, resume and corrupt-sample handling as image shards, with batches

    moments       (B, 2C, h, w) float32
    caption, key  list[str]
    label         (B,) int64, when every sample's metadata has an integer label
    text_context  (B, L, D) float32 and text_pooled (B, D) float32, when the text was encoded
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.config import ConfigError
from ldm.data.stream import TAR_ERRORS, EpochPlan, ShardStream, SkipLog, caption_and_label

MANIFEST_NAME = "manifest.json"
FORMAT = "ldm-latents"
FORMAT_VERSION = 1
MOMENTS, MOMENTS_FLIP, CONTEXT, POOLED = "moments.npy", "moments_flip.npy", "context.npy", "pooled.npy"


# ----------------------------------------------------------------------------------------------------------------------
# Identity of the frozen encoders.


# Prompts whose token ids tell two tokenizers apart (vocabulary, case, padding token, truncation, end token).
TOKEN_PROBES = ("", "a photo of a cat", "A RED Circle, on white!  ", "caf\u00e9 \u732b 123", "word " * 100)


def tokens_hash(encoder: nn.Module) -> str:
    """sha256 of the token ids a text encoder (`tokenize(prompts)` -> (B, L)) gives TOKEN_PROBES: the same weights
    behind another tokenizer encode other contexts."""
    ids = encoder.tokenize(list(TOKEN_PROBES)).to(torch.int64).cpu().contiguous()
    return hashlib.sha256(f"{tuple(ids.shape)};".encode() + ids.numpy().tobytes()).hexdigest()


def weights_hash(weights: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """sha256 over a module's state dict (names, shapes, values), independent of the device and the float dtype.

    Floating tensors are hashed as their float32 values, so fp16 weights (an SD checkpoint) hash the same loaded in
    half precision or cast to float32, on any device; any changed value, name or shape changes the hash.

    Args:
        weights: a module (its `state_dict()`) or a state dict.
    """
    state = weights.state_dict() if isinstance(weights, nn.Module) else weights
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach()
        if tensor.is_floating_point():
            tensor = tensor.float()
        tensor = tensor.cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{str(tensor.dtype).removeprefix('torch.')}:{tuple(state[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# The manifest.


@dataclass
class LatentManifest:
    """`manifest.json` of a latent shard directory: `path` is the file, `data` its content."""

    path: Path
    data: dict[str, Any]

    @property
    def autoencoder(self) -> dict[str, Any]:
        return self.data["autoencoder"]

    @property
    def text_encoder(self) -> dict[str, Any] | None:
        return self.data.get("text_encoder")

    @property
    def resolution(self) -> int:
        return int(self.data["resolution"])

    @property
    def flips(self) -> bool:
        return bool(self.data.get("flips", False))

def read_manifest(path: str | Path, key: str = "data.train_shards",
                  fix: str = "encode the shards again with ldm-encode") -> LatentManifest:
    """Read and check a latent manifest; `key` is the config key that led here and `fix` what to do about a damaged
    or foreign file, both named in errors."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: cannot read the latent manifest {path} ({type(err).__name__}: {err}); "
                          f"{fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
        found = (data.get("format"), data.get("version")) if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{key}: {path} is not a manifest of ldm-encode (found {found}, expected format "
                          f"{FORMAT!r} version {FORMAT_VERSION}); {fix}")
    text, moments = data.get("text_encoder"), data.get("moments")
    damaged = [name for name, ok in (
        ("autoencoder", isinstance(data.get("autoencoder"), dict) and "sha256" in data["autoencoder"]),
        ("moments", isinstance(moments, dict) and isinstance(moments.get("shape"), list)),
        ("resolution", isinstance(data.get("resolution"), int)),
        ("text_encoder", text is None or isinstance(text, dict) and isinstance(text.get("config"), dict)
         and all(isinstance(text.get(k), list) for k in ("context_shape", "pooled_shape")))) if not ok]
    if damaged:
        raise ConfigError(f"{key}: the latent manifest {path} is damaged (its {', '.join(damaged)} entries are not "
                          f"what ldm-encode writes); {fix}")
    return LatentManifest(path, data)


def holds_latents(shard: Path) -> bool:
    """Whether the tar at `shard` is a latent shard (its first sample has moments), not image shards'."""
    try:
        with tarfile.open(shard) as tar:
            first = tar.next()
            key = first.name.split(".", 1)[0] if first is not None else None
            member = first
            while member is not None and member.name.split(".", 1)[0] == key:
                if member.name.endswith(f".{MOMENTS}"):
                    return True
                member = tar.next()
    except TAR_ERRORS:
        pass
    return False


def stats_path(shard: Path) -> Path:
    """The `NAME_stats.json` beside shard `NAME.tar` (img2dataset's; ldm-encode writes it once the shard is done)."""
    return shard.with_name(shard.name.removesuffix(".tar") + "_stats.json")


def find_manifest(urls: list[str], key: str, to_read: bool = True) -> LatentManifest | None:
    """The latent manifest beside local shards, or None for image shards (a folder whose first shard is a latent
    shard but which holds no manifest raises ConfigError naming `key`); shards from two manifests that name
    different encoders raise ConfigError naming `key`. With `to_read` (the shards are to be trained on), so does a
    shard ldm-encode has not finished (no stats file yet), and shards the manifest lists that its folder lacks while
    their inputs still exist (an ldm-encode stopped early, which writes the manifest first) are warned about: a pattern
    may pick a subset on purpose, but not of shards that are not there."""
    found: dict[Path, LatentManifest] = {}
    folders: dict[Path, bool] = {}  # folder -> holds a manifest (asked once per folder, not once per shard)
    plain = []
    for url in urls:
        if "://" in url or url.startswith("pipe:"):
            plain.append(url)  # note: a remote shard cannot show a manifest; remote latents are not supported
            continue
        path = Path(url.removeprefix("file:")).resolve()
        folder = path.parent
        if folder not in folders:
            folders[folder] = (folder / MANIFEST_NAME).is_file()
            if folders[folder]:
                found[folder] = read_manifest(folder / MANIFEST_NAME, key)
                if to_read:
                    _warn_unfinished(found[folder])
            elif holds_latents(path):  # (the folder's first shard, its first sample): copied without the manifest
                fix = (f"train on a copy of the whole ldm-encode output_dir ({MANIFEST_NAME} and each "
                       f"NAME_stats.json beside the shards), or on the image shards" if to_read else
                       "this command reads image shards: give those the latents were encoded from")
                raise ConfigError(f"{key}: {url} is a latent shard (ldm-encode's), but its folder has no "
                                  f"{MANIFEST_NAME} saying which encoders wrote it; {fix}")
        if not folders[folder]:
            plain.append(url)
        elif to_read and not stats_path(path).is_file():
            raise ConfigError(f"{key}: {url} has no {stats_path(path).name}, which ldm-encode writes once a shard is "
                              f"done: its run was stopped; run the same ldm-encode command again to finish it "
                              f"(finished shards are skipped)")
    if not found:
        return None
    if plain:
        raise ConfigError(f"{key} mixes latent shards (a manifest in {next(iter(found))}) with shards that have no "
                          f"{MANIFEST_NAME}, e.g. {plain[0]!r}: train on images or on latents, not both")
    first, *others = found.values()
    for other in others:
        check_same_encoders(first, other, key)
    return first


def _warn_unfinished(manifest: LatentManifest) -> None:
    folder = manifest.path.parent
    inputs = manifest.data.get("inputs") or {}
    # inputs that still exist but have no finished latent shard here (that of an input since deleted is removed on
    # purpose, as ldm-encode advises)
    missing = sorted(name for name, source in inputs.items() if Path(source).exists()
                     and not ((folder / name).is_file() and stats_path(folder / name).is_file()))
    if missing:
        listed, some = len(inputs), ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        warnings.warn(f"{manifest.path} lists {listed} input shards, but {len(missing)} have no finished latent shard "
                      f"beside it ({some}): an ldm-encode stopped before the end trains on part of the data; run it "
                      f"again to finish", stacklevel=3)


def check_same_encoders(a: LatentManifest, b: LatentManifest, key: str,
                        settings: tuple[str, ...] = ("resolution", "flips")) -> None:
    """Raise ConfigError unless two latent directories were encoded by the same autoencoder and text encoder, with the
    same `settings` (the training and validation splits may differ in flips: validation reads unflipped latents)."""
    for what in ("autoencoder", "text_encoder"):
        ours, theirs = (m.data.get(what) or {} for m in (a, b))
        if ours.get("sha256") != theirs.get("sha256"):
            raise ConfigError(f"{key}: {a.path} and {b.path} were encoded with different {what}s (sha256 "
                              f"{ours.get('sha256')} and {theirs.get('sha256')}); encode every split with the same one")
    for what in settings:
        if a.data.get(what) != b.data.get(what):
            raise ConfigError(f"{key}: {a.path} has {what}={a.data.get(what)} but {b.path} has {what}="
                              f"{b.data.get(what)}; encode every split with the same ldm-encode settings")
    # the same text encoder weights at another layer, prompt length, pooling or tokenizer give other stored arrays
    ours, theirs = (_text_settings(m) for m in (a, b))
    for what in sorted(ours.keys() & theirs.keys()):
        if ours[what] is not None and theirs[what] is not None and ours[what] != theirs[what]:
            raise ConfigError(f"{key}: {a.path} holds text encoded with {what}={ours[what]} but {b.path} with "
                              f"{what}={theirs[what]}; encode every split with the same text_encoder settings")


def _text_settings(manifest: LatentManifest) -> dict[str, Any]:
    """What, beside the weights, sets a latent folder's stored text arrays (all None for a folder without text)."""
    text = manifest.data.get("text_encoder") or {}
    config = text.get("config") or {}
    return {"kind": config.get("kind"), "layer": config.get("layer", "last") if text else None,
            "context_shape": text.get("context_shape"), "pooled_shape": text.get("pooled_shape"),
            "tokens_sha256": text.get("tokens_sha256")}


def require_images(datamodule: Any, model: str) -> None:
    """Raise ConfigError when the datamodule reads latent shards but `model` (named in the message) trains on images."""
    manifest = getattr(datamodule, "latent_manifest", None)
    if manifest is not None:
        raise ConfigError(f"data.train_shards are latent shards (written by ldm-encode: {manifest.path}), but {model} "
                          f"trains on images; point data.train_shards and data.val_shards at image shards (ldm-data)")


def require_resolution(datamodule: Any, key: str, resolution: int, advice: str) -> None:
    """Raise ConfigError, naming `key` (the model's input size, `resolution`) and giving `advice` (`{data}`: the data's
    size), when the datamodule's images are of another size."""
    data = getattr(datamodule, "config", None)
    if data is not None and data.resolution != resolution:
        raise ConfigError(f"{key}={resolution} but data.resolution={data.resolution}: "
                          f"{advice.format(data=data.resolution)}")


def _now(path: str) -> str:
    """A recorded encoder folder as a fix names it: itself where it is, else where the user has it now (a run and
    its data moved to another machine: the recorded folder is gone, and naming it sent the user there)."""
    gone = os.path.isabs(path) and not os.path.exists(path)
    return f"<the folder it moved to: {path} is not there now>" if gone else path


def check_manifest(manifest: LatentManifest, autoencoder_hash: str, autoencoder_path: str,
                   key: str = "model.autoencoder_path", text_encoder_hash: str | None = None,
                   text_encoder_trains: str | None = None, text_encoder: dict[str, Any] | None = None) -> None:
    """Raise ConfigError unless `manifest` was encoded by the autoencoder (and text encoder) the model uses.

    Args:
        manifest: the training data's manifest (`WebDataModule.latent_manifest`).
        autoencoder_hash: `weights_hash` of the model's frozen autoencoder.
        autoencoder_path: where the model's autoencoder came from, named in the error.
        key: the config key that set `autoencoder_path`.
        text_encoder_hash: `weights_hash` of the model's frozen text encoder, when the manifest holds text; None
            skips that check.
        text_encoder_trains: why the model's text encoder trains (then stored text encodings cannot stand for
            it), or None when it is frozen.
        text_encoder: the model's frozen text encoder as the error names it and as its output depends on beyond its
            weights: {"kind", "name_or_path", "tokenizer", "layer", "max_length", "tokens_sha256" (`tokens_hash`)},
            and "init_from" when model.init_from set them (the error then offers re-encoding only); None skips the
            settings check.
    """
    theirs = manifest.autoencoder
    if theirs["sha256"] != autoencoder_hash:
        raise ConfigError(f"the latent shards beside {manifest.path} were encoded by the autoencoder "
                          f"{theirs.get('path')} (sha256 {theirs['sha256']}), but {key}={autoencoder_path} has sha256 "
                          f"{autoencoder_hash}: encode the shards again with ldm-encode "
                          f"autoencoder_path={autoencoder_path}, or set {key} to the autoencoder they were encoded "
                          f"with")
    text = manifest.text_encoder
    if text is not None and text_encoder_trains is not None:
        kind, path = text["config"].get("kind"), text["config"].get("name_or_path")
        named = f"model.conditioner.name_or_path={_now(path)} " if path else ""  # null: the kind's default (CLIP's)
        raise ConfigError(f"the latent shards beside {manifest.path} hold text encoded by the frozen {kind} encoder "
                          f"{path or '(its default)'}, but {text_encoder_trains}: set model.conditioner.kind={kind} "
                          f"{named}model.conditioner.trainable=false, or encode the shards without text (ldm-encode "
                          f"text_encoder=null)")
    if text is None or text_encoder_hash is None:
        return
    mine = text_encoder or {}
    kind, path = text["config"].get("kind"), text["config"].get("name_or_path")
    tokenizer = f", tokenizer: {mine['tokenizer']}" if mine.get("tokenizer") else ""
    encode = (f"encode the shards again with ldm-encode text_encoder='{{kind: {mine.get('kind')}, name_or_path: "
              f"{mine.get('name_or_path')}{tokenizer}, layer: {mine.get('layer')}, max_length: "
              f"{mine.get('max_length')}}}'")
    # model.init_from sets the conditioner's encoder, layer and prompt length itself: setting them would not help
    init_from = mine.get("init_from")
    fixed = f" (model.init_from={init_from} sets model.conditioner)" if init_from else ""
    if text["sha256"] != text_encoder_hash:
        alternative = "" if init_from else f", set model.conditioner.name_or_path={_now(path)}"
        raise ConfigError(f"the latent shards beside {manifest.path} hold text encoded by the {kind} encoder {path} "
                          f"(sha256 {text['sha256']}), but model.conditioner.name_or_path={mine.get('name_or_path')} "
                          f"has sha256 {text_encoder_hash}{fixed}: {encode}{alternative}, or leave text out of "
                          f"ldm-encode (text_encoder=null)")
    # The same weights read at another layer, padded to another length, pooled by another kind's rule or behind
    # another tokenizer give other contexts.
    stored = {"kind": text["config"].get("kind"), "layer": text["config"].get("layer", "last"),
              "max_length": text["context_shape"][0]}
    for name, value in stored.items():
        if name in mine and mine[name] != value:
            alternative = "" if init_from else f"set model.conditioner.{name}={value}, or "
            raise ConfigError(f"the latent shards beside {manifest.path} hold text encoded with {name}={value}, but "
                              f"the model's text encoder has model.conditioner.{name}={mine[name]}{fixed}: "
                              f"{alternative}{encode}")
    if "tokens_sha256" in text and mine.get("tokens_sha256") not in (None, text["tokens_sha256"]):
        # note: model.init_from sets the encoder, never the tokenizer (model.conditioner.tokenizer stays the user's)
        tokenizer = f"model.conditioner.tokenizer={mine['tokenizer']}" if mine.get("tokenizer") else \
            f"the tokenizer of model.conditioner.name_or_path={mine.get('name_or_path')}"
        theirs = text["config"].get("tokenizer") or "their encoder folder's own"
        give = f"set model.conditioner.tokenizer to the one they were encoded with ({theirs}), or " \
            if mine.get("kind") == "clip" else ""
        raise ConfigError(f"the latent shards beside {manifest.path} hold text tokenized otherwise than by "
                          f"{tokenizer} (the same weights, other token ids): {give}{encode}")


def check_data_config(manifest: LatentManifest, resolution: int, hflip: bool, random_crop: bool,
                      prefix: str = "data") -> None:
    """Raise ConfigError for data settings latent shards cannot honour (they were fixed when encoding)."""
    if resolution != manifest.resolution:
        raise ConfigError(f"{prefix}.resolution={resolution} but the latent shards beside {manifest.path} were encoded "
                          f"at {manifest.resolution} px; set {prefix}.resolution={manifest.resolution}")
    if random_crop:
        raise ConfigError(f"{prefix}.random_crop=true cannot apply to latent shards ({manifest.path}): crops are fixed "
                          f"when encoding; set {prefix}.random_crop=false")
    if hflip and not manifest.flips:
        raise ConfigError(f"{prefix}.hflip=true but the latent shards beside {manifest.path} hold no flipped copies; "
                          f"encode them with ldm-encode flips=true, or set {prefix}.hflip=false")


# ----------------------------------------------------------------------------------------------------------------------
# Arrays in tar members.


def to_npy(array: torch.Tensor | np.ndarray, dtype: np.dtype | type = np.float16) -> bytes:
    """An array as .npy bytes in `dtype`; a value that does not fit (inf after the cast) raises ValueError."""
    if isinstance(array, torch.Tensor):
        array = array.detach().float().cpu().numpy()
    out = np.ascontiguousarray(array, dtype=dtype)
    if not np.isfinite(out).all():
        raise ValueError(f"non-finite values after casting to {np.dtype(dtype).name} (max |x| of the input "
                         f"{float(np.abs(array).max()):.4g})")
    buf = io.BytesIO()
    np.save(buf, out, allow_pickle=False)
    return buf.getvalue()


# header bytes -> (shape, Fortran order, dtype, offset of the data)
_NPY_HEADERS: dict[bytes, tuple[tuple[int, ...], bool, np.dtype, int]] = {}


def from_npy(data: bytes) -> np.ndarray:
    """A .npy member's array (read-only, a view of `data`); never unpickles.

    note: `np.load` parses every header with `ast.literal_eval`, about 95 us of the 100 us it takes for a latent
    sample's array (a third of reading a latent batch). The members of a shard share a handful of headers, so each
    distinct header is parsed once, by numpy's own reader, and the data is viewed in place.
    """
    end = data.find(b"\n", 0, 65536) + 1  # the header ends with a newline (format versions 1-3)
    spec = _NPY_HEADERS.get(data[:end]) if end else None
    if spec is None:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed (they would be unpickled)")
        spec = shape, fortran, dtype, stream.tell()
        if end == spec[3] and len(_NPY_HEADERS) < 256:
            _NPY_HEADERS[data[:end]] = spec
    shape, fortran, dtype, offset = spec
    count = math.prod(shape)
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{len(data) - offset} data bytes for an array of shape {shape} and dtype {dtype}")
    return np.frombuffer(data, dtype, count, offset).reshape(shape, order="F" if fortran else "C")


# ----------------------------------------------------------------------------------------------------------------------
# Reading: the worker side.


def _finite(array: np.ndarray) -> bool:
    """No inf or NaN in `array`; fp16 by its exponent bits (numpy's isfinite takes 5x as long on fp16)."""
    if array.dtype == np.float16:
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(array).all())


def _decode_latents(samples: Iterator[dict[str, Any]], skips: SkipLog, required: tuple[str, ...],
                    num_classes: int | None = None, shapes: dict[str, tuple[int, ...]] | None = None
                    ) -> Iterator[dict[str, Any]]:
    """Arrays, caption and label of raw latent samples; unreadable samples (or without a `required` member, or
    without an integer label in [0, num_classes) when `num_classes` is given) are recorded and dropped."""
    for sample in samples:
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        try:
            for member in required:
                if member not in sample:
                    raise ValueError(f"no {member} member, found "
                                     f"{sorted(k for k in sample if not k.startswith('__'))}")
            arrays = {name: from_npy(sample[name]) for name in (MOMENTS, MOMENTS_FLIP, CONTEXT, POOLED)
                      if name in sample}
            if arrays[MOMENTS].ndim != 3:
                raise ValueError(f"{MOMENTS} has shape {arrays[MOMENTS].shape}, expected (2C, h, w)")
            for name, shape in (shapes or {}).items():
                if name in arrays and tuple(arrays[name].shape) != shape:
                    raise ValueError(f"{name} has shape {arrays[name].shape}, the manifest says {shape}")
            for name, array in arrays.items():
                if not _finite(array):  # ldm-encode refuses to write them: a damaged shard
                    raise ValueError(f"{name} holds non-finite values")
            caption, label = caption_and_label(sample, skips, num_classes)
        except Exception as err:  # noqa: BLE001 -- any unreadable sample is skipped and reported
            skips.add(url, key, f"{type(err).__name__}: {err}"[:200])
            continue
        yield {"arrays": arrays, "caption": caption, "key": key, "url": url, "label": label}


def collate_latents(samples: list[dict[str, Any]]) -> dict[str, Any]:
    batch: dict[str, Any] = {"moments": torch.stack([s["moments"] for s in samples]),  # (B, 2C, h, w)
                             "caption": [s["caption"] for s in samples], "key": [s["key"] for s in samples]}
    if all(s["label"] is not None for s in samples):
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)  # (B,)
    if all("text_context" in s for s in samples):
        batch["text_context"] = torch.stack([s["text_context"] for s in samples])   # (B, L, D)
        batch["text_pooled"] = torch.stack([s["text_pooled"] for s in samples])     # (B, D)
    return batch


class LatentStream(ShardStream):
    """The batches of one rank from latent shards: `ShardStream`'s plan, split, resume and skipping, with arrays
    instead of images. `plan.hflip` picks the flipped copy with the per-sample draw that flips an image."""

    def __init__(self, plan: EpochPlan, manifest: LatentManifest):
        super().__init__(plan)
        self.manifest = manifest

    def decode_samples(self, samples: Iterator[dict[str, Any]], skips: SkipLog) -> Iterator[dict[str, Any]]:
        required = (MOMENTS, MOMENTS_FLIP) if self.plan.train and self.plan.hflip else (MOMENTS,)
        if self.manifest.text_encoder is not None:
            required += (CONTEXT, POOLED)
        m, text = self.manifest.data, self.manifest.text_encoder
        shapes = {MOMENTS: tuple(m["moments"]["shape"]), MOMENTS_FLIP: tuple(m["moments"]["shape"])}
        if text is not None:
            shapes.update({CONTEXT: tuple(text["context_shape"]), POOLED: tuple(text["pooled_shape"])})
        return _decode_latents(samples, skips, required, self.plan.num_classes, shapes)

    def collate_batch(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        return collate_latents(samples)

    def _to_tensor(self, sample: dict[str, Any]) -> dict[str, Any]:
        p = self.plan
        arrays = sample.pop("arrays")
        name = MOMENTS
        if p.train and p.hflip:
            # The image path's draw (ShardStream._to_tensor without random crops): the same samples flip.
            if self.sample_rng(sample).random() < 0.5:
                name = MOMENTS_FLIP
        sample["moments"] = torch.from_numpy(arrays[name].astype(np.float32))                  # (2C, h, w)
        if CONTEXT in arrays:
            sample["text_context"] = torch.from_numpy(arrays[CONTEXT].astype(np.float32))      # (L, D)
            sample["text_pooled"] = torch.from_numpy(arrays[POOLED].astype(np.float32))        # (D,)
        return sample
