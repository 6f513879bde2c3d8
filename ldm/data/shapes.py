"""`shapes`: a built-in synthetic captioned dataset of coloured geometric shapes.

Each sample is one shape drawn with PIL on a plain background, with a compositional caption naming every attribute:

    "a small red triangle in the top left on a gray background"

A sample depends on `(seed, split, index)` only: its attributes and jitter come from a generator seeded by those three
numbers, so the dataset is the same whatever its size, the order it is read in or the process that draws it.
Backgrounds are achromatic (gray, white, black) and foreground colours saturated, so a colour analyser separates the
shape from the background by saturation alone and reads the shape's colour back (`ldm.eval` uses `COLORS`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw

from ldm.seeding import fold_seed

# Saturated foreground colours (HSV saturation >= 0.6), pairwise far apart in RGB; no achromatic colour here.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 20),
    "green": (30, 170, 50),
    "cyan": (20, 200, 220),
    "blue": (30, 60, 220),
    "purple": (130, 40, 190),
    "pink": (245, 90, 185),
}
# Achromatic backgrounds: saturation 0, clearly apart from every foreground colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross")
# Circumradius of the shape as a fraction of the image side (before jitter).
SIZES: dict[str, float] = {"small": 0.12, "large": 0.2}
# Centre of the shape as (x, y) fractions of the image side; quadrant centres and the middle.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "center": (0.5, 0.5),
}
POSITION_JITTER = 0.03  # uniform +-, fraction of the side: the shape stays inside its quadrant
SIZE_JITTER = 0.1  # uniform +-, relative to the radius: small and large never overlap (0.132 < 0.18)
SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to draw and caption one sample."""

    shape: str
    color: str
    size: str
    position: str
    background: str
    cx: float  # centre x, fraction of the image side (jittered)
    cy: float  # centre y
    radius: float  # circumradius, fraction of the image side (jittered)

    @property
    def label(self) -> int:
        """The shape's index in SHAPES (a class label for class-conditional models)."""
        return SHAPES.index(self.shape)

    @property
    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"in the {self.position}"
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"

    def metadata(self) -> dict[str, Any]:
        """What the `.json` member of a shard sample holds."""
        return {"shape": self.shape, "color": self.color, "size": self.size, "position": self.position,
                "background": self.background, "label": self.label, "cx": self.cx, "cy": self.cy,
                "radius": self.radius}


def sample_spec(seed: int, index: int, split: str = "train", sizes: Sequence[str] | None = None) -> ShapeSpec:
    """The attributes of sample `index` of `split`: a pure function of (seed, split, index, sizes).

    `sizes` restricts the size words drawn from; None: all of SIZES. ["large"] suits 32 px images, where a small
    shape is 7 px across and its outline hard to tell from another's.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split={split!r} is not one of {list(SPLIT_IDS)}")
    sizes = check_sizes(sizes)
    rng = random.Random(fold_seed(seed, SPLIT_IDS[split], index))
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    size = rng.choice(sizes)
    position = rng.choice(list(POSITIONS))
    background = rng.choice(list(BACKGROUNDS))
    x, y = POSITIONS[position]
    cx = x + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = y + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    radius = SIZES[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    return ShapeSpec(shape, color, size, position, background, cx, cy, radius)


def check_sizes(sizes: Sequence[str] | None) -> list[str]:
    """The size words to draw from: all of SIZES for None, else `sizes` after checking each is known."""
    if sizes is None:
        return list(SIZES)
    unknown = [size for size in sizes if size not in SIZES]
    if not sizes or unknown:
        raise ValueError(f"sizes={list(sizes)} must be a non-empty list of {list(SIZES)}")
    return list(sizes)


def _regular_polygon(cx: float, cy: float, r: float, n: int, phase: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(phase + 2 * math.pi * k / n), cy + r * math.sin(phase + 2 * math.pi * k / n))
            for k in range(n)]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices (pixels, y down) of every shape but the circle."""
    if shape == "square":
        h = r / math.sqrt(2)  # circumradius r: half side r / sqrt(2)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # apex up
        return _regular_polygon(cx, cy + 0.15 * r, r, 3, -math.pi / 2)
    if shape == "diamond":  # a square standing on a corner, slightly narrow so it never reads as a rotated square
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "hexagon":
        return _regular_polygon(cx, cy, r, 6, 0.0)
    if shape == "star":  # five points, inner radius 0.45 r
        outer = _regular_polygon(cx, cy, r, 5, -math.pi / 2)
        inner = _regular_polygon(cx, cy, 0.45 * r, 5, -math.pi / 2 + math.pi / 5)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":  # a plus sign, arm half-width 0.33 r
        a, w = r, 0.33 * r
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}; choose one of {list(SHAPES)}")


def render(spec: ShapeSpec, resolution: int = 32, supersample: int = 4) -> Image.Image:
    """Draw `spec` as an RGB image of side `resolution`, anti-aliased by drawing `supersample` times larger."""
    if resolution < 8:
        raise ValueError(f"resolution={resolution} is too small to draw a shape; use at least 8")
    side = resolution * supersample
    image = Image.new("RGB", (side, side), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    fill = COLORS[spec.color]
    cx, cy, r = spec.cx * side, spec.cy * side, spec.radius * side
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_outline(spec.shape, cx, cy, r), fill=fill)
    if supersample > 1:
        image = image.resize((resolution, resolution), Image.Resampling.BOX)  # box filter: area-weighted coverage
    return image


class ShapesDataset:
    """`num_samples` samples of one split, indexable and iterable: dicts with image (PIL), caption and metadata.

    Args:
        num_samples: number of samples (indices 0 .. num_samples - 1).
        resolution: image side in pixels.
        seed: dataset seed; sample i of split s is a pure function of (seed, s, i).
        split: "train", "val" or "test"; the splits are independent streams, so changing num_samples of one leaves
            the others unchanged.
        sizes: the size words to draw from; None: all of SIZES.
    """

    def __init__(self, num_samples: int, resolution: int = 32, seed: int = 0, split: str = "train",
                 sizes: Sequence[str] | None = None):
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        if split not in SPLIT_IDS:
            raise ValueError(f"split={split!r} is not one of {list(SPLIT_IDS)}")
        self.num_samples = num_samples
        self.resolution = resolution
        self.seed = seed
        self.split = split
        self.sizes = check_sizes(sizes)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        spec = sample_spec(self.seed, index, self.split, self.sizes)
        return {"image": render(spec, self.resolution), "caption": spec.caption, "metadata": spec.metadata()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(self.num_samples):
            yield self[index]


def vocabulary() -> dict[str, Any]:
    """The attribute vocabulary, JSON-serialisable (written into summary.json of shapes shards)."""
    return {"colors": {k: list(v) for k, v in COLORS.items()}, "shapes": list(SHAPES), "sizes": list(SIZES),
            "positions": list(POSITIONS), "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}}
