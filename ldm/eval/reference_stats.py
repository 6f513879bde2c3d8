"""Reference statistics: the real side of FID and KID, computed once from a shard set and cached on disk.

The cache file `<cache_dir>/<hash>.pt` holds exactly the states torchmetrics' FrechetInceptionDistance accumulates for
real images (feature sum, sum of outer products, count) plus the features themselves (for KID). `hash` is a digest of
everything that changes them: the shard paths with their sizes and modification times (regenerated data is a new
key), the resolution images are brought to, the requested count, and the feature extractor's identity (network,
layer, resize filter, weights hash). The key is stored beside the states, so a cache file explains itself.

Written atomically (temp file, fsync, rename); under torch.distributed rank 0 computes it while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from ldm.checkpoints import CheckpointError, load_checkpoint
from ldm.data.shardlist import local_shards
from ldm.distributed import rank_and_world
from ldm.eval.feature_extractors import InceptionFeatures
from ldm.eval.sources import READER_VERSION, iter_image_batches, shard_fingerprint
from ldm.io import atomic_open

CACHE_VERSION = 3  # the cache file's layout (what the reader gives is keyed by sources.READER_VERSION)


@dataclass
class ReferenceStats:
    """Real-image feature statistics and where they came from."""

    features_sum: torch.Tensor        # (D,) float64
    features_cov_sum: torch.Tensor    # (D, D) float64, sum of x x^T
    num_samples: int
    features: torch.Tensor            # (N, D) float32, for KID
    key: dict[str, Any]
    hash: str
    path: str

    def protocol(self) -> dict[str, Any]:
        """What a results row records about the reference side."""
        return {"reference_stats": self.path, "reference_hash": self.hash, "reference_num_samples": self.num_samples,
                "reference_shards": [s["path"] for s in self.key["shards"]]}


def default_cache_dir() -> str:
    """Where reference statistics are cached unless told: `$LDM_CACHE_DIR/reference_stats`, else
    `~/.cache/ldm/reference_stats` (ldm-eval, `evaluate(cfg)` and the FID callback alike)."""
    return os.path.join(os.environ.get("LDM_CACHE_DIR") or "~/.cache/ldm", "reference_stats")


def reference_key(shards: list[str], resolution: int, num_samples: int | None,
                  extractor_identity: dict[str, Any]) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "reader": READER_VERSION, "shards": shard_fingerprint(shards),
            "resolution": int(resolution), "num_samples": num_samples, "feature_extractor": extractor_identity}


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def compute_reference_stats(shards: list[str], resolution: int, num_samples: int | None, extractor: InceptionFeatures,
                            batch_size: int = 64, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Inception features of the first `num_samples` images of `shards` at `resolution`, reduced to FID states."""
    dim = extractor.num_features
    features_sum = torch.zeros(dim, dtype=torch.float64)
    cov_sum = torch.zeros(dim, dim, dtype=torch.float64)
    chunks: list[torch.Tensor] = []
    for images, _ in iter_image_batches(shards, resolution, num_samples, batch_size):
        feats = extractor(images.to(device)).double().cpu()  # (B, D)
        features_sum += feats.sum(0)
        cov_sum += feats.T @ feats
        chunks.append(feats.float())
    if not chunks:
        raise ValueError(f"no images found in {len(shards)} shard(s) {shards[:2]}...")
    features = torch.cat(chunks)
    if num_samples is not None and len(features) < num_samples:
        rank_zero_info(f"reference statistics: asked for {num_samples} images, the shards hold {len(features)}")
    return {"features_sum": features_sum, "features_cov_sum": cov_sum, "num_samples": len(features),
            "features": features}


def _atomic_save(obj: Any, path: Path) -> None:
    with atomic_open(path) as f:
        torch.save(obj, f)


def _compute_and_save(shards: list[str], resolution: int, num_samples: int | None, extractor: InceptionFeatures,
                      batch_size: int, device: torch.device | str, key: dict[str, Any], path: Path) -> None:
    rank_zero_info(f"reference statistics: computing {path.stem} from {len(shards)} shard(s) -> {path}")
    stats = compute_reference_stats(shards, resolution, num_samples, extractor, batch_size, device)
    _atomic_save({"key": key, **stats}, path)


def load_or_compute_reference_stats(shards: str | list[str], resolution: int, num_samples: int | None,
                                    extractor: InceptionFeatures, cache_dir: str | Path, batch_size: int = 64,
                                    device: torch.device | str = "cpu") -> ReferenceStats:
    """The cached statistics for this (shards, resolution, count, extractor), computing and caching them on a miss."""
    shard_list = local_shards(shards)
    key = reference_key(shard_list, resolution, num_samples, extractor.identity)
    digest = key_hash(key)
    path = Path(cache_dir).expanduser().absolute() / f"{digest}.pt"
    distributed = dist.is_available() and dist.is_initialized()
    rank = rank_and_world()[0] if distributed else 0
    # Rank 0 computes on a miss while the others wait; they then read its file (or, without a shared disk, compute).
    if rank == 0 and not path.is_file():
        _compute_and_save(shard_list, resolution, num_samples, extractor, batch_size, device, key, path)
    if distributed:
        dist.barrier()
    if not path.is_file():
        _compute_and_save(shard_list, resolution, num_samples, extractor, batch_size, device, key, path)
    try:
        payload = load_checkpoint(path, "reference statistics cache")  # key: dict of plain values, tensors
    except CheckpointError as err:
        raise CheckpointError(f"{err} It is a cache: delete it and it is computed again") from None
    if payload.get("key") != key:
        raise CheckpointError(f"reference statistics {path} were computed for another key; delete the file (it is a "
                              f"cache: computed again)")
    dim = extractor.num_features
    shapes = {"features_sum": (dim,), "features_cov_sum": (dim, dim),
              "features": (payload.get("num_samples"), dim)}
    damaged = [name for name, shape in shapes.items()
               if not isinstance(payload.get(name), torch.Tensor) or tuple(payload[name].shape) != shape]
    if damaged:
        raise CheckpointError(f"reference statistics {path}: {', '.join(damaged)} missing or not of the shapes "
                              f"{[shapes[name] for name in damaged]}; delete the file (it is a cache: computed again)")
    rank_zero_info(f"reference statistics: {digest} ({payload['num_samples']} images) from {path}")
    return ReferenceStats(features_sum=payload["features_sum"], features_cov_sum=payload["features_cov_sum"],
                          num_samples=int(payload["num_samples"]), features=payload["features"], key=key,
                          hash=digest, path=str(path))


def load_into_fid(fid: Any, stats: ReferenceStats) -> None:
    """Put the cached real-image states into a FrechetInceptionDistance, so only generated images are computed.

    torchmetrics sums states across ranks when it syncs; rank 0 alone holds the reference, the others zeros.
    """
    rank = rank_and_world()[0] if dist.is_available() and dist.is_initialized() else 0
    device = fid.real_features_sum.device
    scale = 1 if rank == 0 else 0
    fid.real_features_sum = stats.features_sum.to(device, torch.float64) * scale
    fid.real_features_cov_sum = stats.features_cov_sum.to(device, torch.float64) * scale
    fid.real_features_num_samples = torch.tensor(stats.num_samples * scale, dtype=torch.long, device=device)
    fid.reset_real_features = False  # reset() between sweeps keeps them


def load_into_kid(kid: Any, stats: ReferenceStats) -> None:
    """Put the cached real features into a KernelInceptionDistance; ranks hold disjoint slices, concatenated by sync."""
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = rank_and_world() if distributed else (0, 1)
    kid.real_features = [stats.features[rank::world].to(kid.device)]
    kid.reset_real_features = False
