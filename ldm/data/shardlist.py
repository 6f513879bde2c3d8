"""Shard sets named in a config: the one place that turns a path, glob, brace pattern, `::` list, Python list or
remote URL into the list of shards (training, encoding and evaluation all call it)."""

from __future__ import annotations

import glob
import lzma
import os
import tarfile
import zlib
from pathlib import Path

import webdataset as wds

from ldm.config import ConfigError, pasteable
from ldm.io import glob_sorted

REMOTE_PREFIXES = ("pipe:", "http://", "https://", "s3://", "gs://", "hf://", "ais://")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")  # any letter case; none ends another
# What reading a damaged tar raises: tarfile's own errors, and, from a compressed one read by random access (a seek
# to the next header, a member's data), the decompressor's, which tarfile passes on unwrapped
TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError)


def expand_shards(spec: str | list[str], key: str, split: str | None = "train") -> list[str]:
    """Shard URLs from a path, brace pattern, glob, `::`-separated list, Python list, or remote URL.

    A directory stands for its `{split}-*.tar` shards (what ldm-data writes; one holding other tars only, as
    img2dataset's `00000.tar`, is refused naming the pattern to give); with `split=None` (ldm-encode, which encodes
    what it is given) it is refused, naming the patterns that take its shards (each split's, or its tars'). Local
    shards come back as absolute paths (a file named `pipe:...` is read, never run as a command). A local pattern that
    matches no file raises FileNotFoundError naming `key` and the pattern, one that matches other files than tars
    (`data/shapes/*`: summary.json, and the other split's shards beside) a ConfigError; remote URLs (`pipe:`,
    `http(s)://`, ...) pass through brace expansion unchecked.
    """
    parts = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    urls: list[str] = []
    patterns: list[str] = []  # the pattern (a `::` list's item, a brace expansion) that named each url
    for part in parts:
        if not isinstance(part, str) or not part:
            raise ConfigError(f"{key}: expected a non-empty string or a list of them, got {part!r}")
        for url in wds.shardlists.expand_urls(part):
            if url.startswith(REMOTE_PREFIXES):
                urls.append(url)
                patterns.append(url)
                continue
            path = os.path.expanduser(url.removeprefix("file:"))
            pattern = None  # a file or folder that exists is taken as named, `[` in its name included
            folder = os.path.isdir(path)
            if folder and split is None:
                named = f"{key}={part!r}" + ("" if url == part else f" (its item {url!r})")
                tars = [os.path.basename(m) for m in _tars_in(path)]
                splits = [s for s in ("train", "val") if any(t.startswith(f"{s}-") for t in tars)]
                if tars and not splits:  # img2dataset's 00000.tar...
                    example = pasteable({key: _example(os.path.join(path, "train-*.tar"), "train")})
                    raise ConfigError(f"{named} is a folder: name its tar shards, e.g. {example}")
                examples = " or ".join(pasteable({key: os.path.join(url, f"{s}-*.tar")})
                                       for s in splits or ("train", "val"))
                raise ConfigError(f"{named} is a folder, which holds one or two splits of shards: name the split's "
                                  f"shards, {examples}")
            if folder:
                pattern = path = os.path.join(path, f"{split}-*.tar")
            elif not os.path.isfile(path) and glob.has_magic(path):
                pattern = path
            matches = glob_sorted(pattern) if pattern else ([path] if os.path.isfile(path) else [])
            if not matches and folder and (tars := _tars_in(os.path.dirname(path))):  # img2dataset's 00000.tar...
                other = "val" if split == "train" else "train"
                if all(os.path.basename(m).startswith(f"{other}-") for m in tars):  # ldm-data's other split only
                    train = pasteable({key: _example(path, other)})  # scoring against the train split: a protocol
                    also = "" if split == "train" else f", or the train shards themselves where you mean them: {train}"
                    raise FileNotFoundError(f"{key}={part!r}: {os.path.dirname(path)} holds {other} shards only "
                                            f"({len(tars)}), no {split}-*.tar: name the folder of the {split} "
                                            f"split{also}")
                unnamed = [m for m in tars if not os.path.basename(m).startswith(f"{other}-")]
                move = f"move the {other}-*.tar shards to a folder of their own, then " if len(unnamed) < len(tars) \
                    else ""
                raise FileNotFoundError(f"{key}={part!r}: a folder stands for the {split}-*.tar shards ldm-data "
                                        f"writes, and {os.path.dirname(path)} holds none but {len(unnamed)} other tar "
                                        f"shards (e.g. {os.path.basename(unnamed[0])}): {move}name them, e.g. "
                                        f"{pasteable({key: _example(path, split)})}")
            if not matches:
                raise FileNotFoundError(f"{key}={part!r}: no shard file matches {path!r} (working directory "
                                        f"{os.getcwd()}); write shards with ldm-data or fix the path")
            others = [m for m in matches if pattern and not is_tar_name(m) and not _holds_a_tar(m)]
            if others:  # (a pattern of braces or a `::` list: suggesting for one of its expansions would mislead)
                fix = _narrower(matches, others, path, split) if url == part else ""
                raise ConfigError(f"{key}={part!r} matches files that are not tar shards ({others[:3]}): narrow the "
                                  f"pattern to the shards{fix}")
            for match in matches:
                if os.path.isdir(match):
                    raise ConfigError(f"{key}={part!r}: {match} is a directory, not a tar shard; name the shards "
                                      f"only (a folder given by itself stands for its {split}-*.tar shards)")
                if not is_tar_name(match) and not _holds_a_tar(match):  # (a tar's name: its damage is the readers')
                    raise ConfigError(f"{key}={part!r}: {match} is no tar shard (it does not open as a tar, plain or "
                                      f"gzip, bzip2 or xz compressed); name the shards only")
            # absolute (a relative `pipe:x.tar` or `s3:x.tar` is a file), `..` kept: after a symlink it is not textual
            urls.extend(os.path.join(os.getcwd(), m) for m in matches)
            patterns.extend([url] * len(matches))
    named: dict[str, tuple[str, str]] = {}  # a shard (a local one by its real path) -> (url, pattern) first naming it
    for url, pattern in zip(urls, patterns):
        shard = url if url.startswith(REMOTE_PREFIXES) else os.path.realpath(url)
        if shard in named:
            first, by = named[shard]
            same = f"{url} is named twice" if first == url else f"{first} and {url} are the same file"
            raise ConfigError(f"{key}: {same}, by {by!r} and by {pattern!r}: its samples would be read twice an "
                              f"epoch; name each shard once")
        named[shard] = (url, pattern)
    if not urls:
        raise ConfigError(f"{key}={spec!r} names no shards")
    return urls


def tar_suffix(path: str) -> str:
    """The tar suffix `path` ends in, as written (`.tar`, `.TAR.GZ`, ...), or "" for another name."""
    return next((path[-len(x):] for x in TAR_SUFFIXES if path.lower().endswith(x)), "")


def shard_name(url: str) -> str:
    """The file name of the latent shard ldm-encode writes for input shard `url`: the input's name, as a plain tar
    (`NAME.tar.gz`, `NAME.tgz`, `NAME.tar.xz`, `NAME.TAR`... give `NAME.tar`)."""
    name = os.path.basename(url)
    return name[:len(name) - len(tar_suffix(name))] + ".tar"


def is_tar_name(path: str) -> bool:
    return bool(tar_suffix(path))


def _holds_a_tar(path: str) -> bool:
    """A file that opens as a tar, plain or gzip, bzip2 or xz compressed (its first header read and checked): a shard
    of another name (a compressed file that holds no tar, `notes.json.gz`, is none)."""
    try:
        with tarfile.open(path, "r:*"):
            return True
    except TAR_ERRORS:
        return False


def _tars_in(folder: str) -> list[str]:
    return [m for m in glob_sorted(os.path.join(glob.escape(folder), "*")) if is_tar_name(m)] \
        if os.path.isdir(folder) else []


def _example(path: str, split: str) -> str:
    """A pattern naming the tar shards beside `path`: the split's (`train-*.tar`, ldm-data's names) where there are
    such, else every tar but the other split's (img2dataset's `00000.tar`), with the suffix they have (a `::` list
    of one pattern per suffix where they have several)."""
    folder = os.path.dirname(path)
    tars = _tars_in(folder)
    other = "val" if split == "train" else "train"
    named = [m for m in tars if os.path.basename(m).startswith(f"{split}-")]
    unnamed = [m for m in tars if not os.path.basename(m).startswith(f"{other}-")]
    pick = named or unnamed
    start = f"{split}-*" if named or not unnamed else "*"
    return "::".join(os.path.join(folder, f"{start}{suffix}")  # one pattern per suffix (.tar, .tar.gz, .TGZ)
                     for suffix in sorted({tar_suffix(m) for m in pick} or {".tar"}))


def _narrower(matches: list[str], others: list[str], path: str, split: str) -> str:
    """", e.g. PATTERN" for a glob that keeps tars among `matches` (by name or content) and none of `others`: the
    split's shards as `_example` names them where that takes some of these tars, else one with the pattern's folder
    part and the tars' names' common start and end around `*` (`data/*/0000*.bin`) where that takes them all; ""
    when neither would do."""
    tars, others = set(matches) - set(others), set(others)
    names = [os.path.basename(m) for m in tars]
    start = os.path.commonprefix(names)
    end = os.path.commonprefix([n[len(start):][::-1] for n in names])[::-1]
    candidates = [(_example(path, split), False)] if _tars_in(os.path.dirname(path)) else []
    if tars:
        candidates.append((os.path.join(os.path.dirname(path), glob.escape(start) + "*" + glob.escape(end)), True))
    for pattern, whole in candidates:
        taken = {m for part in pattern.split("::") for m in glob_sorted(part)}
        if taken and taken <= tars and (not whole or tars <= taken):  # within the tars matched (the split's, or all)
            return f", e.g. {pattern}"
    return ""


def absolute_spec(spec: str | list[str]) -> str | list[str]:
    """`spec` with every local part made absolute (globs, braces and `::` lists kept), so that it names the same
    shards from any working directory; remote URLs pass unchanged."""
    def absolute(part: str) -> str:
        return "::".join(p if p.startswith(REMOTE_PREFIXES) else
                         str(Path(p.removeprefix("file:")).expanduser().absolute()) for p in part.split("::"))

    return [absolute(p) for p in spec] if isinstance(spec, (list, tuple)) else absolute(spec)


def local_shards(spec: str | list[str], key: str = "val_shards") -> list[str]:
    """`expand_shards` for readers that open tar files themselves (evaluation): the validation split of a directory,
    each shard as an absolute path (they key cached statistics); remote URLs are refused naming `key`."""
    urls = expand_shards(spec, key, split="val")
    remote = [url for url in urls if url.startswith(REMOTE_PREFIXES)]
    if remote:
        raise ConfigError(f"{key}: evaluation reads local shard files; got remote {remote[:2]} (copy them locally)")
    return [str(Path(url.removeprefix("file:")).expanduser().resolve()) for url in urls]
