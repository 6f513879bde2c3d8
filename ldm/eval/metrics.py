"""Metric sets over torchmetrics: what a generator is scored on, and what an autoencoder is scored on.

All states are torchmetrics states, so under torch.distributed each rank updates with its own images and `compute()`
syncs (sums, or concatenates) across ranks: the result equals a single-process run up to float summation order.
KID gathers its features in global sample order instead (its random subsets are index draws).

Generation (`GenerationMetrics`): FID and KID against cached reference statistics (one Inception pass feeds both),
CLIP score between images and their prompts, and the offline prompt-adherence scores of the `shapes` data set.
Reconstruction (`ReconstructionMetrics`): rFID of reconstructions against the originals' statistics, PSNR, SSIM and
LPIPS, each the mean over images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.distributed import gather_all_tensors

from ldm.eval.feature_extractors import InceptionFeatures, PrecomputedFeatures, clip_loader
from ldm.eval.reference_stats import ReferenceStats, load_into_fid, load_into_kid

GENERATION_METRICS = ("fid", "kid", "clip_score", "shapes_color_accuracy", "shapes_shape_accuracy")
RECONSTRUCTION_METRICS = ("rfid", "psnr", "ssim", "lpips")
INCEPTION_METRICS = ("fid", "kid", "rfid")


def _fid(reference: ReferenceStats, dim: int) -> FrechetInceptionDistance:
    fid = FrechetInceptionDistance(feature=PrecomputedFeatures(dim), reset_real_features=False)
    load_into_fid(fid, reference)
    return fid


class GenerationMetrics(nn.Module):
    """FID, KID, CLIP score and shapes adherence of generated images (uint8, (N, 3, H, W)) and their prompts.

    Args:
        metrics: names from GENERATION_METRICS.
        inception: the feature network for FID/KID (required when either is asked for).
        reference: cached real statistics for FID/KID.
        clip_model: hub name or local directory of the CLIP model (required for clip_score), or a loader returning
            (model, processor) as `clip_loader` makes one.
        kid_subsets, kid_subset_size: KID's subset estimator; the size is capped by the sample counts.
        seed: seeds KID's random subsets, so the value repeats.
    """

    def __init__(self, metrics: Sequence[str], inception: InceptionFeatures | None = None,
                 reference: ReferenceStats | None = None,
                 clip_model: str | Callable[[], tuple[Any, Any]] | None = None, kid_subsets: int = 100,
                 kid_subset_size: int = 1000, seed: int = 0):
        super().__init__()
        unknown = sorted(set(metrics) - set(GENERATION_METRICS))
        if unknown:
            raise ValueError(f"unknown generation metrics {unknown}; choose from {list(GENERATION_METRICS)}")
        self.names = list(metrics)
        self.inception = inception
        self.seed = seed
        needs_inception = [m for m in self.names if m in INCEPTION_METRICS]
        if needs_inception and (inception is None or reference is None):
            raise ValueError(f"metrics {needs_inception} need an Inception network and reference statistics")
        self.fid = _fid(reference, inception.num_features) if "fid" in self.names else None
        self.kid = None
        if "kid" in self.names:
            self.kid = KernelInceptionDistance(feature=PrecomputedFeatures(inception.num_features),
                                               subsets=kid_subsets, subset_size=kid_subset_size,
                                               reset_real_features=False)
            load_into_kid(self.kid, reference)
        self.clip = None
        if "clip_score" in self.names:
            if not clip_model:
                raise ValueError("metrics=[clip_score] needs clip_model (a hub name or a local CLIP directory)")
            from torchmetrics.multimodal.clip_score import CLIPScore

            self.clip = CLIPScore(model_name_or_path=clip_model if callable(clip_model) else clip_loader(clip_model))
        self.shapes = None
        if any(m.startswith("shapes_") for m in self.names):
            from ldm.eval.shapes_adherence import ShapesAdherence

            self.shapes = ShapesAdherence(read_shapes="shapes_shape_accuracy" in self.names)
        self.kid_subset_size = kid_subset_size

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Add a batch of generated uint8 images (N, 3, H, W) and the prompts they were generated from."""
        if self.fid is not None or self.kid is not None:
            features = self.inception(images)
            if self.fid is not None:
                self.fid.update(features, real=False)
            if self.kid is not None:
                self.kid.update(features, real=False)
        if self.clip is not None:
            self.clip.update(list(images), list(prompts))
        if self.shapes is not None:
            self.shapes.update(images, list(prompts))

    def compute(self) -> dict[str, float]:
        """Every asked-for metric as a float (synced across ranks); KID adds kid_std and its subset size."""
        out: dict[str, float] = {}
        if self.fid is not None:
            out["fid"] = float(self.fid.compute())
        if self.kid is not None:
            out.update(_compute_kid(self.kid, self.kid_subset_size, self.seed))
        if self.clip is not None:
            out["clip_score"] = float(self.clip.compute())
        if self.shapes is not None:
            shapes = self.shapes.compute()
            out.update({k: v for k, v in shapes.items() if k in self.names})
        return out

    def reset(self) -> None:
        for metric in (self.fid, self.kid, self.clip, self.shapes):
            if metric is not None:
                metric.reset()


def _compute_kid(kid: KernelInceptionDistance, subset_size: int, seed: int) -> dict[str, float]:
    """KID with the subset size capped by both sample counts, its random subsets drawn from `seed`.

    KID's subsets are index draws, so the features must be in one order whatever the process count: every rank
    gathers both sets in global sample order (rank r holds samples r, r + W, ..., of the generated images and of the
    reference features alike) and computes on them alone. torchmetrics' own sync would concatenate rank by rank, and
    the same seed would pick other images under another world size."""
    real = _gather_interleaved(torch.cat(kid.real_features))                  # (N_real, D), global order
    fake = _gather_interleaved(torch.cat(kid.fake_features))                  # (N_fake, D)
    ordered = KernelInceptionDistance(feature=PrecomputedFeatures(real.shape[1]), subsets=kid.subsets,
                                      subset_size=max(2, min(subset_size, len(real), len(fake))), degree=kid.degree,
                                      gamma=kid.gamma, coef=kid.coef, sync_on_compute=False).to(real.device)
    ordered.update(real, real=True)                                           # PrecomputedFeatures: as they are
    ordered.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = ordered.compute()
    return {"kid": float(mean), "kid_std": float(std), "kid_subset_size": float(ordered.subset_size)}


def _gather_interleaved(rows: torch.Tensor) -> torch.Tensor:
    """All ranks' `rows` (rank r's k-th row is global row r + k * world) in global order; `rows` itself in a single
    process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rows
    parts = gather_all_tensors(rows)  # torchmetrics': ranks of different row counts, in rank order
    out = torch.empty(sum(len(part) for part in parts), *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


class ReconstructionMetrics(nn.Module):
    """rFID, PSNR, SSIM and LPIPS of reconstructions against originals, both uint8 (N, 3, H, W).

    PSNR and SSIM (Gaussian window 11, sigma 1.5) are computed per image on [0, 1] pixels and averaged over images
    (the autoencoder-paper convention); LPIPS takes [-1, 1] inputs through `lpips_fn` (per-image distances).
    """

    def __init__(self, metrics: Sequence[str], inception: InceptionFeatures | None = None,
                 reference: ReferenceStats | None = None,
                 lpips_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        unknown = sorted(set(metrics) - set(RECONSTRUCTION_METRICS))
        if unknown:
            raise ValueError(f"unknown reconstruction metrics {unknown}; choose from {list(RECONSTRUCTION_METRICS)}")
        self.names = list(metrics)
        if "rfid" in self.names and (inception is None or reference is None):
            raise ValueError("rfid needs an Inception network and reference statistics of the originals")
        if "lpips" in self.names and lpips_fn is None:
            raise ValueError("lpips needs an LPIPS network (lpips_fn)")
        self.inception = inception
        self.lpips_fn = lpips_fn
        self.fid = _fid(reference, inception.num_features) if "rfid" in self.names else None
        self.means = nn.ModuleDict({name: MeanMetric() for name in ("psnr", "ssim", "lpips") if name in self.names})

    @torch.no_grad()
    def update(self, reconstructions: torch.Tensor, originals: torch.Tensor) -> None:
        if self.fid is not None:
            self.fid.update(self.inception(reconstructions), real=False)
        x = reconstructions.float() / 255.0
        y = originals.float() / 255.0
        if "psnr" in self.means:
            mse = (x - y).square().flatten(1).mean(1).clamp_min(1e-10)
            self.means["psnr"].update(10 * torch.log10(1.0 / mse))
        if "ssim" in self.means:
            # note: float64, since in float32 E[x^2] - E[x]^2 cancels badly on flat images (SSIM(x, x) = 0.998)
            ssim = structural_similarity_index_measure(x.double(), y.double(), data_range=1.0, reduction="none")
            self.means["ssim"].update(ssim.float())
        if "lpips" in self.means:
            self.means["lpips"].update(self.lpips_fn(x * 2 - 1, y * 2 - 1).flatten())

    def compute(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.fid is not None:
            out["rfid"] = float(self.fid.compute())
        out.update({name: float(metric.compute()) for name, metric in self.means.items()})
        return out

    def reset(self) -> None:
        if self.fid is not None:
            self.fid.reset()
        for metric in self.means.values():
            metric.reset()

