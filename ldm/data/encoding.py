"""Encoding image shards into latent shards: the frozen encoders, the manifest, and one shard at a time.

`ldm-encode` (`ldm.cli.encode`) runs this in one or several processes; `ldm.data.latents` describes the format and
reads it back. A shard is written atomically and then its `NAME_stats.json`; a shard with both, made from the same
input, is finished (`is_finished`), any other is written again.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds

from ldm import __version__
from ldm.config import ConfigError, check_choice, check_min, check_output_dir, to_dataclass
from ldm.data import latents
from ldm.data.shardlist import is_tar_name, shard_name
from ldm.data.shards import MEMBER_MTIME, SUMMARY_NAME
from ldm.data.stream import (
    IMAGE_KEYS,
    MemberWatch,
    no_image,
    read_tar,
    resize_crop,
    sample_caption,
    sample_metadata,
    shard_stops_early,
)
from ldm.images import decode_image
from ldm.io import (
    CONFIG_NAME,
    absolute_if_local,
    atomic_open,
    atomic_write_text,
    export_dir,
    is_export,
    read_json_object,
)

log = logging.getLogger(__name__)

TEXT_KINDS = ("clip", "hf", "byte")  # text encoders whose outputs can be stored
TEXT_SETTINGS = ("kind", "layer", "max_length")  # what, beside the weights and tokenizer, sets the stored text arrays

TEXT_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class EncodeConfig:
    """What `ldm-encode` does: the schema conf/encode.yaml extends (`ldm-encode --cfg job` prints every key)."""

    shards: Any = None                   # required: input image shards (path, glob, brace pattern or list)
    autoencoder_path: str | None = None  # required: what model.autoencoder_path takes (export dir, run dir, .ckpt)
    output_dir: str | None = None        # required: latent shards, manifest.json and *_stats.json go here
    text_encoder: Any = None             # a model.conditioner node (dict) of a frozen pretrained text encoder; null:
    #                                     captions only (stage 2 then runs its text encoder itself)
    text_dtype: str = "float16"          # float16 | float32: how the text encoder's outputs are stored
    resolution: int | None = None        # image side to encode (resize shorter side + centre crop); null: the
    #                                     autoencoder's training resolution
    flips: bool = False                  # also store the moments of each horizontally flipped image (data.hflip)
    batch_size: int = 32                 # images per forward pass (doubled with flips)
    devices: int = 1                     # processes, one per device: cuda:0..N-1 on GPUs, else N CPU processes
    accelerator: str = "auto"            # auto (cuda when available) | cpu | cuda
    overwrite: bool = False              # start over: delete what an earlier run wrote into output_dir
    progress: bool = True                # a progress bar with samples/s and the time left
    extra: Any = None                    # free-form notes (a dict: extra='{run: first}') copied into the manifest

    def __post_init__(self) -> None:
        for key in ("shards", "autoencoder_path", "output_dir"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required, e.g. ldm-encode shards='data/shapes/train-*.tar' "
                                  f"autoencoder_path=runs/vae/export output_dir=data/latents/train")
        self.output_dir = check_output_dir("output_dir", self.output_dir)
        if self.text_encoder is not None and not isinstance(self.text_encoder, dict):
            raise ConfigError(f"text_encoder={self.text_encoder!r} must be a model.conditioner node or null, e.g. "
                              f"text_encoder='{{kind: byte, name_or_path: runs/clip/export}}'")
        if self.extra is not None and not isinstance(self.extra, dict):
            raise ConfigError(f"extra={self.extra!r} must be a dict of notes, e.g. extra='{{run: first}}', or null")
        check_choice("text_dtype", self.text_dtype, list(TEXT_DTYPES))
        check_choice("accelerator", self.accelerator, ["auto", "cpu", "cuda"])
        check_min(1, batch_size=self.batch_size, devices=self.devices, resolution=self.resolution)
        if self.accelerator == "cuda" and self.devices > max(torch.cuda.device_count(), 0):
            raise ConfigError(f"devices={self.devices} but {torch.cuda.device_count()} CUDA devices are visible")


# ----------------------------------------------------------------------------------------------------------------------
# The frozen encoders and the manifest.


@dataclass
class Encoders:
    """What every process needs: the frozen autoencoder, the optional text encoder, and the image side."""

    autoencoder: torch.nn.Module
    latent_stats: dict[str, Any] | None
    text: torch.nn.Module | None  # maps prompts to ((B, L, D), (B, D))
    text_config: dict[str, Any] | None
    resolution: int


def text_encoder_config(node: dict[str, Any]) -> dict[str, Any]:
    """The text encoder node with a byte encoder's architecture read from its export where the node leaves it out.

    note: the quickstart's export knows its width and depth; asking the user to repeat them only invites a mismatch.
    """
    node = dict(node)
    path = node.get("name_or_path")
    name = "text_encoder.name_or_path"
    if node.get("kind", "byte") == "byte" and path and is_export(directory := export_dir(path, name, False)):
        exported = read_json_object(directory / CONFIG_NAME, name)
        for key in ("width", "num_layers", "num_heads", "max_length"):
            if key in exported:  # else another kind of export, which ByteTextEncoder.from_pretrained names
                node.setdefault(key, exported[key])
    return node


def load_encoders(config: EncodeConfig, device: torch.device) -> Encoders:
    from ldm.conditioning import ConditionerConfig, build_conditioner
    from ldm.convert import load_autoencoder_any

    autoencoder, stats, _ = load_autoencoder_any(config.autoencoder_path, key="autoencoder_path")
    resolution = config.resolution or autoencoder.config.resolution
    if resolution % autoencoder.downsample_factor:
        raise ConfigError(f"resolution={resolution} is not divisible by the autoencoder's downsampling factor "
                          f"{autoencoder.downsample_factor}")
    text, text_config = None, None
    if config.text_encoder is not None:
        node = to_dataclass(ConditionerConfig, text_encoder_config(config.text_encoder), "text_encoder")
        if node.kind not in TEXT_KINDS:
            raise ConfigError(f"text_encoder.kind={node.kind} is not a text encoder: give a frozen pretrained one "
                              f"(kind {', '.join(TEXT_KINDS)}), or leave text_encoder null to store no text encoding")
        conditioner = build_conditioner(node, prefix="text_encoder")
        if conditioner.trainable:
            raise ConfigError(f"text_encoder must be a frozen pretrained text encoder (kind clip, hf or byte with "
                              f"name_or_path set and trainable=false), got kind={node.kind}, name_or_path="
                              f"{node.name_or_path}, trainable={node.trainable}: a trained one cannot be precomputed")
        text_config = {**asdict(node), "name_or_path": absolute_if_local(node.name_or_path),
                       "tokenizer": absolute_if_local(node.tokenizer)}  # as errors print them: from anywhere
        text = conditioner.encoder.eval().to(device)
    return Encoders(autoencoder.to(device), stats, text, text_config, resolution)  # frozen as loaded


def build_manifest(config: EncodeConfig, encoders: Encoders) -> dict[str, Any]:
    ae = encoders.autoencoder
    f, channels = ae.downsample_factor, ae.config.embed_dim
    h = encoders.resolution // f
    stats = encoders.latent_stats or {}
    manifest: dict[str, Any] = {
        "format": latents.FORMAT, "version": latents.FORMAT_VERSION,
        "autoencoder": {"path": absolute_if_local(str(config.autoencoder_path)), "sha256": latents.weights_hash(ae),
                        "latent_scale": stats.get("scale_factor"), "downsample_factor": f,
                        "resolution": ae.config.resolution, "embed_dim": channels, "config": asdict(ae.config)},
        "resolution": encoders.resolution,
        "moments": {"dtype": "float16", "shape": [2 * channels, h, h]},
        "flips": config.flips,
        "text_encoder": None,
        "extra": config.extra or {},
    }
    if encoders.text is not None:
        with torch.no_grad():
            context, pooled = encoders.text([""])                               # (1, L, D), (1, D)
        manifest["text_encoder"] = {"sha256": latents.weights_hash(encoders.text),
                                    "tokens_sha256": latents.tokens_hash(encoders.text), "config": encoders.text_config,
                                    "dtype": config.text_dtype, "context_shape": list(context.shape[1:]),
                                    "pooled_shape": list(pooled.shape[1:])}
    return manifest


def read_output_manifest(path: Path) -> dict[str, Any]:
    """The manifest.json already in output_dir (a damaged one is a ConfigError naming the way out)."""
    return latents.read_manifest(path, "output_dir", "restore it, or pass overwrite=true to delete the output_dir's "
                                 "latents and encode again").data


# Keys that may differ between two runs into the same output_dir (`extra`, free-form notes, is merged); everything
# else must match to continue.
RUN_KEYS = ("created", "ldm_version", "inputs", "extra")


def _encoder_identity(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """A manifest's autoencoder or text encoder entry without the paths it was read from (the same weights given as
    another path, relative, a copy, from another directory, are the same encoder: its sha256 says so) and without
    the latent scale (the moments are stored unscaled; training takes its scale from the model)."""
    if entry is None:
        return None
    entry = {k: v for k, v in entry.items() if k not in ("path", "latent_scale")}
    if isinstance(entry.get("config"), dict) and "kind" in entry["config"]:  # a text encoder's conditioner node
        entry["config"] = {k: v for k, v in entry["config"].items() if k in TEXT_SETTINGS}
    return entry


def _compared(old: dict[str, Any], new: dict[str, Any], key: str) -> tuple[Any, Any]:
    """Two manifests' values of `key` as they are compared: the encoders by weights and settings, not by the paths
    they were given as."""
    def comparable(m: dict[str, Any]) -> Any:
        entry = _encoder_identity(m.get(key)) if key in ("autoencoder", "text_encoder") else m.get(key)
        if key == "text_encoder" and entry is not None and not all(
                "tokens_sha256" in (other.get(key) or {}) for other in (old, new)):
            entry.pop("tokens_sha256", None)  # written before manifests recorded it: compared by the rest
        return entry

    return comparable(old), comparable(new)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Manifest keys (other than RUN_KEYS) in which two encodings differ."""
    changed = []
    for key in sorted((set(old) | set(new)) - set(RUN_KEYS)):
        there, now = _compared(old, new, key)
        if there != now:
            changed.append(key)
    return changed


def _difference(old: dict[str, Any], new: dict[str, Any], key: str) -> str:
    """How a changed key differs, for an error: an encoder of other weights by its sha256 and settings; one of the
    same weights by the settings that differ; anything else as it is."""
    there, now = _compared(old, new, key)
    if isinstance(there, dict) and isinstance(now, dict) and "sha256" in there and there["sha256"] == now.get("sha256"):
        return "; ".join(f"{key}.{k}: {there.get(k)!r} there, {now.get(k)!r} now"
                         for k in sorted(set(there) | set(now)) if there.get(k) != now.get(k))

    def described(entry: Any) -> str:
        if isinstance(entry, dict) and "sha256" in entry:
            settings = {k: v for k, v in (entry.get("config") or {}).items() if k in TEXT_SETTINGS}
            settings.update({k: entry[k] for k in ("dtype", "tokens_sha256") if k in entry})
            return f"sha256 {entry['sha256']}" + (f" {settings}" if settings else "")
        return repr(entry)

    return f"{key}: {described(there)} there, {described(now)} now"


def _earlier_outputs(out: Path, urls: list[str]) -> tuple[list[Path], list[Path]]:
    """(the stats files an earlier ldm-encode run wrote in `out`, the latent shards it may have written there: those
    with such stats, and those of this run's names that hold latents). Other tars and stats files (img2dataset's
    image shards, say) are not counted, and never deleted."""
    stats = [p for p in out.glob("*_stats.json") if "input" in _json_object(p)]  # ldm-encode's record its input
    shards = {p.with_name(p.name.removesuffix("_stats.json") + ".tar") for p in stats}
    shards |= {out / name for name in map(shard_name, urls) if latents.holds_latents(out / name)}
    return stats, sorted(shards)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; empty when it cannot be read as one."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def image_shards_in(out: Path) -> Path | None:
    """What shows that `out` holds image shards (ldm-data's summary.json, or a tar that is not a latent shard:
    img2dataset's, say), or None: a manifest written beside them would have every reader take them for latents."""
    if (out / SUMMARY_NAME).is_file():
        return out / SUMMARY_NAME
    tars = sorted(p for p in out.iterdir() if is_tar_name(p.name)) if out.is_dir() else []
    return next((p for p in tars if not latents.holds_latents(p)
                 and "input" not in _json_object(latents.stats_path(p))), None)  # (an encode with no sample: ours)


def check_outputs_have_a_manifest(out: Path, urls: list[str]) -> None:
    """Raise ConfigError when `out` holds latent shards or their stats but no manifest saying which encoder wrote
    them. Read-only: every rank of a distributed encode checks it itself (rank 0 alone would leave the others
    waiting for a manifest it never writes)."""
    if (out / latents.MANIFEST_NAME).exists():
        return  # (the outputs are not looked at: a resume opens no shard here)
    stats, ours = _earlier_outputs(out, urls)
    if stats or any(p.exists() for p in ours):
        raise ConfigError(f"output_dir={out} holds latent shards or *_stats.json but no {latents.MANIFEST_NAME}, so "
                          f"nothing says which encoder wrote them: choose another output_dir, or pass overwrite=true "
                          f"to delete them and encode again")


def check_inputs_kept(out: Path, old: dict[str, Any], urls: list[str]) -> None:
    """Raise ConfigError when a latent shard in `out` was encoded from another input shard of the same name that
    still exists (a second folder encoded into one output_dir would replace the first one's latents); a copy of the
    input with its size and modification time (`cp -a`, `rsync -a`: to local scratch, say) is the same input.
    Read-only: every rank of a distributed encode checks it."""
    replaced = []
    for url in urls:
        name, now = shard_name(url), str(Path(url).resolve())
        was = (old.get("inputs") or {}).get(name)
        if was in (None, now) or not Path(was).exists() or not (out / name).exists():
            continue
        before, after = Path(was).stat(), Path(url).stat()
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            replaced.append((name, was, now))
    if replaced:
        name, was, now = replaced[0]
        raise ConfigError(f"output_dir={out}: {name} holds the latents of {was}, which this run would replace with "
                          f"those of {now} ({len(replaced)} such shard{'s' if len(replaced) > 1 else ''}; a latent "
                          f"shard keeps its input's name): encode each folder into its own output_dir, or pass "
                          f"overwrite=true to replace them")


def prepare_output(config: EncodeConfig, manifest: dict[str, Any], urls: list[str]) -> None:
    """Check (or start) output_dir: a manifest there must describe the same encoding; then write the manifest."""
    out = Path(config.output_dir)
    path = out / latents.MANIFEST_NAME
    inputs = {shard_name(url): str(Path(url).resolve()) for url in urls}
    if config.overwrite:  # an earlier run's shards (those with stats, and this run's names), whatever its manifest
        stats, ours = _earlier_outputs(out, urls)
        for old in [*ours, *stats, path]:
            old.unlink(missing_ok=True)
    else:
        check_outputs_have_a_manifest(out, urls)
    if path.exists():
        old = read_output_manifest(path)
        changed = changed_keys(old, manifest)
        if changed:
            differences = "; ".join(_difference(old, manifest, k) for k in changed)
            raise ConfigError(f"output_dir={out} holds latents encoded with other settings ({differences}): choose "
                              f"another output_dir, or pass overwrite=true to replace them")
        check_inputs_kept(out, old, urls)
        inputs = {**old.get("inputs", {}), **inputs}
        now = manifest["autoencoder"]  # the same weights (or refused above), perhaps by another path and scale
        autoencoder = {**old["autoencoder"], "path": now["path"], "latent_scale": now["latent_scale"]}
        manifest = {**old, "autoencoder": autoencoder, "inputs": inputs,
                    "extra": {**(old.get("extra") or {}), **(manifest["extra"] or {})}}
        gone = sorted(name for name, url in inputs.items() if not Path(url).exists() and (out / name).exists())
        if gone:
            log.warning("output_dir=%s holds %d latent shards whose input shards no longer exist (%s): training on "
                        "%s/*.tar would read them; delete them, or encode again with overwrite=true", out, len(gone),
                        ", ".join(gone[:5]) + (" ..." if len(gone) > 5 else ""), out)
    else:
        manifest = {**manifest, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "ldm_version": __version__, "inputs": inputs}
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", path)


# ----------------------------------------------------------------------------------------------------------------------
# One shard.


def input_identity(url: str) -> dict[str, Any]:
    """What identifies an input shard's contents for resuming: its path, size and modification time."""
    stat = Path(url).stat()
    return {"input": str(Path(url).resolve()), "input_size": stat.st_size, "input_mtime_ns": stat.st_mtime_ns}


def is_finished(url: str, output: Path) -> bool:
    """The shard and its stats file exist, the stats name this input as it is now (a renamed, rewritten or new input
    shard is encoded again) and the shard has the size it was written with (one damaged since is encoded again)."""
    stats = latents.stats_path(output)
    if not (output.is_file() and stats.is_file()):
        return False
    try:
        written = json.loads(stats.read_text())
    except (OSError, ValueError):  # unreadable, not JSON, not UTF-8
        return False
    if not isinstance(written, dict):
        return False
    identity = input_identity(url)
    if Path(str(written.get("input", ""))).resolve() != Path(identity.pop("input")):
        return False  # note: stats of older code hold the path as typed, resolved from the current directory
    if not all(written.get(k) == v for k, v in identity.items()):
        return False
    if "output_size" in written:
        return written["output_size"] == output.stat().st_size
    return _members_complete(output)  # stats written before the size was recorded


def predates_identity(output: Path) -> bool:
    """The stats of the latent shard `output` were written by an older ldm-encode, which recorded no input size and
    time: whether its input changed since cannot be told, so `is_finished` has it encoded again."""
    try:
        written = json.loads(latents.stats_path(output).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(written, dict) and "input" in written and "input_size" not in written


def _members_complete(path: Path) -> bool:
    """Every member of the tar at `path` has all its data (a shard cut short inside a member does not)."""
    size = path.stat().st_size
    try:
        with tarfile.open(path) as tar:
            return all(m.offset_data + m.size <= size for m in tar)
    except (tarfile.TarError, OSError):
        return False


def without_cut_last(samples: Iterator[dict[str, Any]], url: str, skipped: list[list[str]],
                     cut: Callable[[dict[str, Any] | None], bool]) -> Iterator[dict[str, Any]]:
    """`samples`, but for the last one when `cut(it)` (asked once they are read, also with None when there were none:
    the tar ended early, so that it may lack members, a caption gone at a member's boundary), which is reported in
    `skipped` instead."""
    held = None
    for sample in samples:
        if held is not None:
            yield held
        held = sample
    if cut(held) and held is not None:
        skipped.append([held.get("__key__", "?"), f"the shard {url} ends early (cut short, or a damaged member "
                        f"header: what follows is lost): its last sample may lack members; rewrite the shard"])
    elif held is not None:
        yield held


def _images(url: str, resolution: int, skipped: list[list[str]]) -> Iterator[tuple[dict[str, Any], torch.Tensor]]:
    """(raw sample, image (3, R, R) in [-1, 1]) of a shard, transformed exactly as the datamodule does (centre crop)."""
    errors: list[Exception] = []

    def handler(err: Exception) -> bool:
        skipped.append(["?", f"{type(err).__name__}: {err}"[:200]])
        errors.append(err)
        return True

    def cut(last: dict[str, Any] | None) -> bool:
        key = watch.cut_key() if errors else None
        if key is None:
            return stops_early or bool(errors)  # its members stop before its end, or an error at a header
        # an error cut a member's data: its sample is the one cut (named here when its first member was: the sample
        # never formed)
        last_key = last.get("__key__") if last is not None else None
        if last_key != key:
            skipped.append([key, f"the shard {url} ends inside {watch.name}: left out; rewrite the shard"])
        return last_key == key

    stops_early, watch = shard_stops_early(url), MemberWatch()
    samples = read_tar(handler, watch)(iter([{"url": url}]))
    for sample in without_cut_last(samples, url, skipped, cut):
        try:
            ext = next((k for k in IMAGE_KEYS if k in sample), None)
            if ext is None:
                raise ValueError(no_image(sample))
            image = resize_crop(decode_image(sample[ext]), resolution, None)  # as the datamodule: centre crop
            sample_caption(sample)  # a caption or metadata training could not read: left out here too
            sample_metadata(sample)
        except Exception as err:  # noqa: BLE001 -- an undecodable image is reported and left out
            skipped.append([sample.get("__key__", "?"), f"{type(err).__name__}: {err}"[:200]])
            continue
        x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, R, R)
        yield sample, x.float().div_(127.5).sub_(1.0)


@torch.no_grad()
def _encode_batch(samples: list[dict[str, Any]], images: list[torch.Tensor], encoders: Encoders, flips: bool,
                  text_dtype: str, device: torch.device) -> list[dict[str, Any]]:
    x = torch.stack(images).to(device)                                          # (B, 3, R, R)
    if flips:
        x = torch.cat([x, x.flip(3)])                                           # (2B, 3, R, R)
    with torch.autocast(device.type, enabled=False):
        posterior = encoders.autoencoder.encode(x.float())
    moments = torch.cat([posterior.mean, posterior.logvar], dim=1).cpu()       # (B or 2B, 2C, h, w)
    context = pooled = None
    if encoders.text is not None:
        captions = [sample_caption(s) or "" for s in samples]
        context, pooled = (t.float().cpu() for t in encoders.text(captions))   # (B, L, D), (B, D)
    out = []
    for i, sample in enumerate(samples):
        record = {"__key__": sample["__key__"]}
        arrays = [(latents.MOMENTS, moments[i], np.float16)]
        if flips:
            arrays.append((latents.MOMENTS_FLIP, moments[len(samples) + i], np.float16))
        if context is not None:
            arrays += [(latents.CONTEXT, context[i], TEXT_DTYPES[text_dtype]),
                       (latents.POOLED, pooled[i], TEXT_DTYPES[text_dtype])]
        for name, array, dtype in arrays:
            try:
                record[name] = latents.to_npy(array, dtype)
            except ValueError as err:  # note: an encoder whose outputs are not finite, or overflow, is broken for all
                encoder = "autoencoder" if name in (latents.MOMENTS, latents.MOMENTS_FLIP) else "text encoder"
                if not torch.isfinite(array).all():
                    raise ValueError(f"sample {sample['__key__']}, {name}: the {encoder} outputs inf or NaN; "
                                     f"check it") from None
                fix = "its latents exceed float16's range (65504): check the autoencoder" if encoder == "autoencoder" \
                    else "check the text encoder, or store its outputs with text_dtype=float32"
                raise ValueError(f"sample {sample['__key__']}, {name}: {err}; {fix}") from None
        for member in ("txt", "json"):
            if member in sample:
                record[member] = sample[member]
        out.append(record)
    return out


def encode_shard(url: str, output: Path, encoders: Encoders, config: EncodeConfig, device: torch.device,
                 progress: Callable[[int], None] = lambda n: None, expected: int | None = None) -> dict[str, Any]:
    """Encode one image shard into `output` (atomically), then write its stats file; return the stats. `expected`
    is the shard's sample count (summary.json or its tar headers): a shard that ends earlier is reported damaged."""
    identity = input_identity(url)  # note: before reading, so that a shard rewritten meanwhile is encoded again
    skipped: list[list[str]] = []
    count = 0
    with atomic_open(output, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=MEMBER_MTIME)
        samples, images = [], []

        def flush() -> None:
            nonlocal count
            try:
                records = _encode_batch(samples, images, encoders, config.flips, config.text_dtype, device)
            except ValueError as err:
                raise ValueError(f"shard {url}, {err}") from None
            for record in records:
                writer.write(record)
            count += len(samples)
            progress(len(samples))
            samples.clear()
            images.clear()

        try:
            for sample, image in _images(url, encoders.resolution, skipped):
                samples.append(sample)
                images.append(image)
                if len(samples) == config.batch_size:
                    flush()
            if samples:
                flush()
        finally:  # also on an error or Ctrl-C (atomic_open then deletes the file), or the tar stream, left open,
            writer.close()  # writes its end into the closed file when collected (a second traceback)
        # note: that closes the tar stream only; atomic_open still flushes and renames the file
    failed = sum(key != "?" for key, _ in skipped)  # samples left out ("?": a read error, one or two per damage)
    short = expected is not None and count + failed < expected
    if short and (shard_stops_early(url) or any(key == "?" for key, _ in skipped)):  # cut, or a read error
        skipped.append(["?", f"damaged tar: the shard ends after {count + failed} samples but its count says "
                             f"{expected} (truncated, or a damaged member header); rewrite it with ldm-data and "
                             f"run ldm-encode again (it re-encodes a rewritten input shard)"])
        failed = expected - count
    elif expected is not None and count + failed != expected:
        log.warning("%s holds %d samples but its recorded count says %d: the count is out of date (ldm-data's "
                    "summary.json, img2dataset's NAME_stats.json; correct or delete it); every sample it holds "
                    "was read", url, count + failed, expected)
    if failed:
        log.warning("%s: %d samples could not be read and are left out, e.g. %s", url, failed, skipped[-3:])
    elif skipped:  # read errors, no sample named: a shard damaged before its first sample, its count unknown
        log.warning("%s is damaged (%s) before any sample could be read, and no count is recorded to say how many it "
                    "held; rewrite it with ldm-data", url, skipped[-1][1])
    stats = {"successes": count, "failed": failed, "skipped": skipped[:1000], **identity,
             "output_size": output.stat().st_size}
    atomic_write_text(json.dumps(stats, indent=2) + "\n", latents.stats_path(output))
    return stats
