"""Offline prompt adherence on `shapes`: read the drawn shape's colour (and shape) back and compare with the caption.

A deterministic analyser with no learned weights, so it runs anywhere and means the same thing everywhere:

1. Background colour: the median of the image's border pixels (a `shapes` image is one shape on a plain field, and
   no shape touches the border).
2. Foreground: pixels farther than `threshold` from the background colour (RGB distance); the colour is read from its
   core, the half of those pixels farthest from the background (anti-aliased edges blend in the background).
3. Colour: the nearest entry of the `shapes` COLORS vocabulary to the core's median colour.
4. Shape: the foreground mask is compared (IoU) with every shape of the vocabulary drawn by the data set's own
   renderer at the mask's centre and size; the best match wins.

The caption is parsed with the same vocabulary: its colour word and its shape word. An image whose foreground is
empty, or a caption that names no colour (shape), counts as a miss, so noise scores near chance
(1 / number of colours), never better.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torchmetrics import Metric

from ldm.data.shapes import COLORS, SHAPES, ShapeSpec, render


def parse_caption(caption: str, colors: Sequence[str] = tuple(COLORS), shapes: Sequence[str] = SHAPES,
                  ) -> tuple[str | None, str | None]:
    """The first colour word and the first shape word of `caption` (None when absent)."""
    words = re.findall(r"[a-z]+", caption.lower())
    color = next((w for w in words if w in colors), None)
    shape = next((w for w in words if w in shapes), None)
    return color, shape


def foreground(image: torch.Tensor, threshold: float = 60.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground mask (H, W) of a uint8 image (3, H, W) and each pixel's RGB distance from the border median."""
    x = image.float()                                                           # (3, H, W)
    border = torch.cat([x[:, 0, :], x[:, -1, :], x[:, 1:-1, 0], x[:, 1:-1, -1]], dim=1)  # (3, P)
    background = border.median(dim=1).values                                   # (3,)
    distance = (x - background[:, None, None]).norm(dim=0)                     # (H, W)
    return distance > threshold, distance


def read_color(image: torch.Tensor, palette: Mapping[str, tuple[int, int, int]] = COLORS,
               threshold: float = 60.0) -> str | None:
    """The palette colour nearest to the foreground core of a uint8 image (3, H, W); None without a foreground."""
    mask, distance = foreground(image, threshold)
    if mask.sum() < 2:
        return None
    core = distance >= distance[mask].median()                                 # the farther half of the foreground
    color = image.float()[:, core & mask].median(dim=1).values                 # (3,)
    names = list(palette)
    references = torch.tensor([palette[n] for n in names], dtype=torch.float32)  # (C, 3)
    return names[int((references - color).norm(dim=1).argmin())]


def read_shape(image: torch.Tensor, shapes: Sequence[str] = SHAPES, threshold: float = 60.0) -> str | None:
    """The vocabulary shape whose rendering best overlaps (IoU) the foreground mask of a uint8 image (3, H, W).

    Each candidate is drawn so that its bounding box has the mask's larger extent, then shifted onto the mask's
    bounding-box centre.
    """
    mask, _ = foreground(image, threshold)
    if mask.sum() < 4:
        return None
    side = image.shape[-1]
    top, bottom, left, right = _bbox(mask)
    extent = max(bottom - top, right - left) + 1                               # pixels
    best, best_iou = None, -1.0
    for shape in shapes:
        radius = extent / 2 / _EXTENT_PER_RADIUS[shape] / side                 # circumradius, fraction of the side
        spec = ShapeSpec(shape, "red", "small", "center", "black", 0.5, 0.5, radius)
        template = _mask_of(render(spec, side))
        t_top, t_bottom, t_left, t_right = _bbox(template)
        dy = round((top + bottom - t_top - t_bottom) / 2)
        dx = round((left + right - t_left - t_right) / 2)
        template = torch.roll(template, shifts=(dy, dx), dims=(0, 1))
        iou = float((template & mask).sum()) / float((template | mask).sum())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def _bbox(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return int(ys.min()), int(ys.max()), int(xs.min()), int(xs.max())


def _mask_of(image) -> torch.Tensor:
    """Pixels of a red-on-black rendering covered at least half by the shape."""
    from ldm.eval.sources import pil_to_uint8

    return pil_to_uint8(image)[0].float() > (15 + 220) / 2


def _extent_per_radius(shape: str, side: int = 512, radius: float = 0.3) -> float:
    """Half the larger bounding-box side of `shape` per unit circumradius, measured on a large rendering."""
    top, bottom, left, right = _bbox(_mask_of(render(ShapeSpec(shape, "red", "small", "center", "black", 0.5, 0.5,
                                                                radius), side, supersample=1)))
    return (max(bottom - top, right - left) + 1) / 2 / (radius * side)


_EXTENT_PER_RADIUS = {shape: _extent_per_radius(shape) for shape in SHAPES}


class ShapesAdherence(Metric):
    """Fractions of images whose read colour (shape) matches the caption's: `shapes_color_accuracy`,
    `shapes_shape_accuracy`. States are sums, so the metric syncs across ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float = 60.0, read_shapes: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.threshold = threshold
        self.read_shapes = read_shapes
        self.add_state("color_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("shape_correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, captions: Sequence[str]) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(captions):
            raise ValueError(f"expected uint8 images (N, 3, H, W) and N captions, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(captions)} captions")
        for image, caption in zip(images.cpu(), captions):
            want_color, want_shape = parse_caption(caption)
            got_color = read_color(image, threshold=self.threshold)
            self.color_correct += int(want_color is not None and got_color == want_color)
            if self.read_shapes:
                got_shape = read_shape(image, threshold=self.threshold)
                self.shape_correct += int(want_shape is not None and got_shape == want_shape)
        self.total += len(captions)

    def compute(self) -> dict[str, float]:
        total = max(int(self.total), 1)
        return {"shapes_color_accuracy": int(self.color_correct) / total,
                "shapes_shape_accuracy": int(self.shape_correct) / total}


def adherence_protocol(read_shapes: bool) -> dict[str, object]:
    """The protocol fields of a results row scored by `ShapesAdherence`: the analyser and the chance levels."""
    protocol: dict[str, object] = {
        "shapes_analyser": "ldm.eval.shapes_adherence (border-median background, nearest COLORS entry)",
        "shapes_color_chance": 1 / len(COLORS)}
    if read_shapes:
        protocol["shapes_shape_chance"] = 1 / len(SHAPES)
    return protocol
