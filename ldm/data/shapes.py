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

from ldm.config import ConfigError
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


def sample_spec(seed: int, index: int, split: str = "train", sizes: Sequence[str] | None = None,
                positions: Sequence[str] | None = None, scale: float = 1.0) -> ShapeSpec:
    """The attributes of sample `index` of `split`: a pure function of (seed, split, index, sizes, positions, scale).

    `sizes` and `positions` restrict the words drawn from (None: all of SIZES, POSITIONS); `scale` multiplies every
    radius. ["large"] suits 32 px images, where a small shape is 7 px across and its outline hard to tell from
    another's; positions=["center"] leaves room for scale up to 2.1.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split={split!r} is not one of {list(SPLIT_IDS)}")
    sizes, positions = check_layout(sizes, positions, scale)
    rng = random.Random(fold_seed(seed, SPLIT_IDS[split], index))
    shape = rng.choice(SHAPES)
    color = rng.choice(list(COLORS))
    size = rng.choice(sizes)
    position = rng.choice(positions)
    background = rng.choice(list(BACKGROUNDS))
    x, y = POSITIONS[position]
    cx = x + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    cy = y + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
    radius = scale * SIZES[size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
    return ShapeSpec(shape, color, size, position, background, cx, cy, radius)


def check_layout(sizes: Sequence[str] | None, positions: Sequence[str] | None = None,
                 scale: float = 1.0) -> tuple[list[str], list[str]]:
    """The size and position words to draw from (None: all of SIZES, POSITIONS), after checking that each is known
    and that the largest shape, scaled, stays inside the image at every position."""
    sizes = list(SIZES) if sizes is None else list(sizes)
    positions = list(POSITIONS) if positions is None else list(positions)
    if not sizes or any(size not in SIZES for size in sizes):
        raise ValueError(f"sizes={sizes} must be a non-empty list of {list(SIZES)}")
    if not positions or any(position not in POSITIONS for position in positions):
        raise ValueError(f"positions={positions} must be a non-empty list of {list(POSITIONS)}")
    unit = max(SIZES[size] for size in sizes) * (1 + SIZE_JITTER)  # the largest radius at scale 1
    radius = scale * unit
    room = min(min(x, y, 1 - x, 1 - y) for x, y in (POSITIONS[p] for p in positions)) - POSITION_JITTER
    if not 0 < radius <= room + 1e-9:
        hint = "" if positions == ["center"] else " or positions=[center], which leaves the most room"
        raise ValueError(f"scale={scale} draws shapes of radius up to {radius:.3f} of the side, but positions "
                         f"{positions} leave {room:.3f}: use a scale in (0, {room / unit:.2f}]{hint}")
    return sizes, positions


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
        num_samples: number of samples.
        resolution: image side in pixels.
        seed: dataset seed; sample i of split s is a pure function of (seed, s, i) and the layout.
        split: "train", "val" or "test"; the splits are independent streams, so changing num_samples of one leaves
            the others unchanged.
        sizes, positions: the size and position words to draw from; None: all.
        scale: multiplies every radius (checked to fit the positions).
        holdout: train split only: captions containing any of these strings (e.g. "pink diamond", or whole
            captions) are never drawn; the dataset takes the next indices instead, so held-out prompts test
            generalisation to combinations the model never saw.
    """

    def __init__(self, num_samples: int, resolution: int = 32, seed: int = 0, split: str = "train",
                 sizes: Sequence[str] | None = None, positions: Sequence[str] | None = None, scale: float = 1.0,
                 holdout: Sequence[str] = ()):
        if num_samples < 0:
            raise ValueError(f"num_samples={num_samples} must be >= 0")
        if split not in SPLIT_IDS:
            raise ValueError(f"split={split!r} is not one of {list(SPLIT_IDS)}")
        self.num_samples = num_samples
        self.resolution = resolution
        self.seed = seed
        self.split = split
        self.sizes, self.positions = check_layout(sizes, positions, scale)
        self.scale = scale
        self.holdout = list(holdout) if split == "train" else []
        if self.holdout:
            captions = [ShapeSpec(shape, color, size, position, background, 0.0, 0.0, 0.0).caption
                        for shape in SHAPES for color in COLORS for size in self.sizes for position in self.positions
                        for background in BACKGROUNDS]
            unmatched = [part for part in self.holdout if not any(part in caption for caption in captions)]
            if unmatched:  # (a typo held nothing out: the "held-out" prompts were trained on)
                raise ConfigError(f"holdout: {unmatched} match no caption these shapes can have (e.g. "
                                  f"{captions[0]!r}); spell them as the captions do, in lower case")
        self.indices = self._indices() if self.holdout else None  # item -> sample index

    def _spec(self, index: int) -> ShapeSpec:
        return sample_spec(self.seed, index, self.split, self.sizes, self.positions, self.scale)

    def _indices(self) -> list[int]:
        """The sample indices whose captions contain no held-out string, in order (gives up below 1% kept)."""
        indices, index = [], 0
        while len(indices) < self.num_samples:
            if index >= 100 * (self.num_samples + 10):
                raise ConfigError(f"holdout={self.holdout} removes nearly every caption: nothing left to draw; hold "
                                  f"out whole prompts or rarer words")
            if not any(part in self._spec(index).caption for part in self.holdout):
                indices.append(index)
            index += 1
        return indices

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, item: int) -> dict[str, Any]:
        if not 0 <= item < self.num_samples:
            raise IndexError(f"index {item} out of range for {self.num_samples} samples")
        spec = self._spec(self.indices[item] if self.indices is not None else item)
        return {"image": render(spec, self.resolution), "caption": spec.caption, "metadata": spec.metadata()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for item in range(self.num_samples):
            yield self[item]


def vocabulary() -> dict[str, Any]:
    """The attribute vocabulary, JSON-serialisable (written into summary.json of shapes shards)."""
    return {"colors": {k: list(v) for k, v in COLORS.items()}, "shapes": list(SHAPES), "sizes": list(SIZES),
            "positions": list(POSITIONS), "backgrounds": {k: list(v) for k, v in BACKGROUNDS.items()}}
