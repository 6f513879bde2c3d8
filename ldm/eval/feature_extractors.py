"""The networks metrics look through: InceptionV3 (FID, KID) and CLIP (CLIP score), loaded without surprises offline.

Both load from a local path when the config names one, and otherwise from the standard public weights: torch-fidelity's
InceptionV3 (the TensorFlow FID network converted to PyTorch) through the torch hub cache, CLIP through the Hugging Face
cache. Offline (`HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1` or `LDM_OFFLINE=1`) a missing file fails at once with the
config key to set, instead of hanging on a download.

Every extractor has an `identity`: the string that the protocol row and the reference-statistics key record, so that
numbers measured through different weights are never compared by accident.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

INCEPTION_FEATURE_DIMS = (64, 192, 768, 2048)
INCEPTION_NAME = "torch-fidelity-inception-v3-compat"


class WeightsNotFoundError(FileNotFoundError):
    """Weights a metric needs are neither on disk nor downloadable; the message names the config key to set."""


def offline() -> bool:
    """True when the environment forbids downloads (the Hugging Face switches, or LDM_OFFLINE=1)."""
    return any(os.environ.get(k, "0").lower() in ("1", "true", "yes")
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "LDM_OFFLINE"))


@lru_cache(maxsize=32)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, memoised on (path, size, mtime) so a weights file is hashed once per process."""
    stat = Path(path).stat()
    return _file_sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


# --------------------------------------------------------------------------------------------------------------------
# InceptionV3 (FID, KID, rFID).


def _default_inception_file() -> Path:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    return Path(torch.hub.get_dir()) / "checkpoints" / URL_INCEPTION_V3.rsplit("/", 1)[-1]


def resolve_inception_weights(weights_path: str | None, key: str = "feature_extractor_weights_path") -> str | None:
    """Check that InceptionV3 weights can be had before building the network; return the local file to load, or None.

    None means "download the standard weights" (torch-fidelity does it through the torch hub cache). Offline, the
    cached copy is used when present, and its absence raises WeightsNotFoundError naming `key`.
    """
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{key}={weights_path}: no such file. Point it at an InceptionV3 state dict "
                                       f"(torch-fidelity's weights-inception-2015-12-05-6726825d.pth), or set "
                                       f"{key}=null to download the standard weights.")
        return str(path)
    cached = _default_inception_file()
    if cached.is_file():
        return str(cached)
    if offline():
        raise WeightsNotFoundError(f"{key}=null asks for the standard InceptionV3 weights, but they are not in "
                                   f"{cached} and downloads are disabled (offline mode). Copy the file there, or set "
                                   f"{key}=/path/to/weights-inception-2015-12-05-6726825d.pth.")
    return None


def inception_identity(weights_path: str | None, feature_dim: int, antialias: bool) -> dict[str, Any]:
    """What identifies the Inception features: network, layer, resize filter and the weights file's hash (not its
    path: the same file by another path, or the torch hub's copy named, keys the same statistics)."""
    resolved = resolve_inception_weights(weights_path)
    return {
        "name": INCEPTION_NAME,
        "feature_dim": int(feature_dim),
        "antialias": bool(antialias),
        "weights_sha256": file_sha256(resolved) if resolved else "torch-fidelity:6726825d",
    }


class InceptionFeatures(nn.Module):
    """torchmetrics' InceptionV3 at one feature layer: uint8 images (N, 3, H, W) -> features (N, D).

    `calls` counts forward passes; tests use it to see that cached reference statistics skip the network.
    """

    def __init__(self, feature_dim: int = 2048, weights_path: str | None = None, antialias: bool = False,
                 key: str = "feature_extractor_weights_path"):
        super().__init__()
        if feature_dim not in INCEPTION_FEATURE_DIMS:
            raise ValueError(f"feature_dim={feature_dim} is not an InceptionV3 layer; choose one of "
                             f"{INCEPTION_FEATURE_DIMS}")
        resolved = resolve_inception_weights(weights_path, key)
        self.net = _inception_network(feature_dim, _inception_state(resolved, key), antialias,
                                      f"{key}={resolved or weights_path}")
        self.num_features = feature_dim
        self.identity = inception_identity(weights_path, feature_dim, antialias)
        self.calls = 0

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"InceptionFeatures expects uint8 images in [0, 255], got {images.dtype}")
        self.calls += 1
        return self.net(images).float()


def _inception_state(resolved: str | None, key: str) -> dict[str, torch.Tensor]:
    """The InceptionV3 state dict, read without running code: the local file through `load_checkpoint`, or the
    standard weights downloaded into the torch hub cache and read the same way (torch-fidelity would unpickle either
    with weights_only=False)."""
    from ldm.checkpoints import load_checkpoint

    if resolved is not None:
        return load_checkpoint(resolved, key)
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    try:
        return torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, progress=False, weights_only=True)
    except OSError as err:  # the download failed (no network, proxy): say which key avoids it
        raise WeightsNotFoundError(f"could not download the InceptionV3 weights ({err}); set {key} to a local "
                                   f"copy of weights-inception-2015-12-05-6726825d.pth") from err


def _inception_network(feature_dim: int, state: dict[str, torch.Tensor], antialias: bool, what: str) -> nn.Module:
    """torchmetrics' NoTrainInceptionV3 with `state` as its weights, checked key by key. torch-fidelity's constructor
    insists on unpickling a weights file itself; it is handed an empty placeholder, and `state` replaces it."""
    import tempfile

    from torchmetrics.image.fid import NoTrainInceptionV3

    from ldm.checkpoints import CheckpointError

    class Inception(NoTrainInceptionV3):
        def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # noqa: ARG002
            expected = self.state_dict()
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            misshapen = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
            if missing or unexpected or misshapen:
                example = (missing or unexpected or misshapen)[0]
                raise CheckpointError(f"{what} is not torch-fidelity's InceptionV3 state dict ({len(missing)} of its "
                                      f"{len(expected)} tensors missing, {len(unexpected)} unexpected, "
                                      f"{len(misshapen)} of another shape; e.g. {example}); give "
                                      f"weights-inception-2015-12-05-6726825d.pth")
            return super().load_state_dict(state, strict=True, assign=assign)

    with tempfile.TemporaryDirectory() as tmp:
        placeholder = Path(tmp) / "placeholder.pt"
        torch.save({}, placeholder)
        return Inception(name="inception-v3-compat", features_list=[str(feature_dim)],
                         feature_extractor_weights_path=str(placeholder), antialias=antialias)


class PrecomputedFeatures(nn.Module):
    """The identity, standing in for torchmetrics' feature network: FID and KID receive features, not images.

    One Inception pass then feeds FID, KID and the reference statistics alike.
    """

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


# --------------------------------------------------------------------------------------------------------------------
# CLIP (CLIP score).


def clip_loader(model_name_or_path: str, key: str = "clip_model") -> Callable[[], tuple[Any, Any]]:
    """A loader for torchmetrics' CLIPScore (`model_name_or_path=` accepts a callable) that works with local paths.

    torchmetrics accepts only hub names containing "openai"; the callable lets any CLIP checkpoint (a local directory
    written by `save_pretrained`, or a hub name) through. Offline, a name missing from the cache fails here, naming
    `key`.
    """
    from safetensors import SafetensorError
    from transformers import CLIPModel, CLIPProcessor

    from ldm.checkpoints import CheckpointError, pickle_refusal

    local_dir = Path(model_name_or_path).expanduser()
    is_local = local_dir.is_dir()
    if not is_local and not _looks_like_hub_name(model_name_or_path):
        raise WeightsNotFoundError(f"{key}={model_name_or_path}: no such directory; point it at a CLIP model saved "
                                   f"with save_pretrained, or name one on the Hugging Face hub (org/name)")
    source = str(local_dir) if is_local else model_name_or_path
    local_only = is_local or offline()
    if is_local and not any((local_dir / name).is_file() for name in CLIP_WEIGHTS):
        raise WeightsNotFoundError(f"{key}={model_name_or_path}: the folder holds no CLIP weights (none of "
                                   f"{', '.join(CLIP_WEIGHTS)}); point {key} at a CLIP model saved with "
                                   f"save_pretrained")
    if local_only and not is_local:
        _check_hf_cache(model_name_or_path, key)

    def load() -> tuple[Any, Any]:
        try:
            model = CLIPModel.from_pretrained(source, local_files_only=local_only)
            processor = CLIPProcessor.from_pretrained(source, local_files_only=local_only)
        except pickle.UnpicklingError as err:  # torch's message would advise weights_only=False
            raise CheckpointError(f"{key}={model_name_or_path}: the weights' {pickle_refusal(err)}: give "
                                  f"safetensors weights") from None
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # note: a hub
            # name with no network ends here, and a damaged file
            raise WeightsNotFoundError(
                f"{key}={model_name_or_path}: the CLIP model could not be loaded ({str(err).splitlines()[0][:400]}); "
                f"point {key} at a local CLIP directory holding the model and its processor (CLIPModel's and "
                f"CLIPProcessor's save_pretrained), or put the model in the Hugging "
                f"Face cache (HF_HOME){'' if local_only else '; HF_HUB_OFFLINE=1 makes a missing model fail at once'}"
            ) from None
        window = model.config.text_config.max_position_embeddings
        return ClipEmbeddings(model.eval()), TruncatingProcessor(processor, window)

    return load


class TruncatingProcessor:
    """A CLIPProcessor that cuts prompts to the text window keeping their end token, as `clip.tokenize(truncate=True)`.

    note: torchmetrics tokenizes without truncation, then slices the ids to the window, cutting off the end token at
    which CLIP reads the text embedding: every prompt over 77 tokens scored as its start token (or an arbitrary word).
    """

    def __init__(self, processor: Any, max_length: int):
        self.processor = processor
        self.max_length = max_length

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("text") is not None:
            kwargs = {**kwargs, "truncation": True, "max_length": self.max_length}
        return self.processor(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # called for what the instance lacks: the processor's attributes
        if name.startswith("__") or name == "processor":  # (unpickling and copying look for these before __init__)
            raise AttributeError(name)
        return getattr(self.processor, name)


class ClipEmbeddings(nn.Module):
    """A CLIPModel whose `get_image_features` / `get_text_features` return the projected embeddings as tensors.

    note: transformers >= 5 returns output objects (the embedding in `pooler_output`) where torchmetrics' CLIPScore
    expects tensors; this adapter serves both.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _looks_like_hub_name(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _check_hf_cache(repo_id: str, key: str) -> None:
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        return isinstance(try_to_load_from_cache(repo_id, name), str)

    config, weights = cached("config.json"), any(cached(name) for name in CLIP_WEIGHTS)
    if not (config and weights):  # a download cut short after the config leaves no weights
        held = " (only its config.json: no weights)" if config else ""
        raise WeightsNotFoundError(f"{key}={repo_id} is not in the Hugging Face cache{held} and downloads are disabled "
                                   f"(offline mode). Download it on a connected machine "
                                   f"(`huggingface-cli download {repo_id}`) or set {key}=/path/to/local/clip")


CLIP_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",  # what CLIPModel.from_pretrained reads
                "pytorch_model.bin", "pytorch_model.bin.index.json")


def clip_identity(model_name_or_path: str) -> dict[str, Any]:
    """Name (or path) of the CLIP model, with a hash of its weights file when it is a local directory (of the index
    and every shard it lists, for sharded weights)."""
    identity: dict[str, Any] = {"name": "clip", "weights": model_name_or_path}
    local = Path(model_name_or_path).expanduser()
    name = next((n for n in CLIP_WEIGHTS if (local / n).is_file()), None) if local.is_dir() else None
    if name is not None and name.endswith(".index.json"):
        from ldm.io import read_json_object

        shards = sorted(set(read_json_object(local / name, "clip_model").get("weight_map", {}).values()))
        digests = [file_sha256(local / f) for f in [name, *shards] if (local / f).is_file()]
        identity["weights_sha256"] = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    elif name is not None:
        identity["weights_sha256"] = file_sha256(local / name)
    return identity
