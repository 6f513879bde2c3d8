"""The shapes generator: deterministic per seed, and every caption says what is drawn."""

from __future__ import annotations

import numpy as np
import pytest

from ldm.data import shapes


def _pixels(index: int, seed: int = 0, resolution: int = 32, split: str = "train") -> np.ndarray:
    return np.asarray(shapes.render(shapes.sample_spec(seed, index, split), resolution), dtype=np.int32)


def test_vocabulary_is_distinct():
    assert len(shapes.SHAPES) >= 5 and len(shapes.COLORS) == 8 and len(shapes.SIZES) == 2
    assert len(shapes.POSITIONS) >= 5 and len(shapes.BACKGROUNDS) >= 3
    colors = np.array(list(shapes.COLORS.values()) + list(shapes.BACKGROUNDS.values()))
    dist = np.linalg.norm(colors[:, None] - colors[None], axis=-1) + np.eye(len(colors)) * 1e9
    assert dist.min() > 60, "every two colours (foreground or background) must be far apart"
    for rgb in shapes.BACKGROUNDS.values():
        assert max(rgb) == min(rgb), "backgrounds are achromatic"
    for rgb in shapes.COLORS.values():
        assert (max(rgb) - min(rgb)) / max(rgb) > 0.6, "foreground colours are saturated"


def test_deterministic_per_seed_and_index():
    a = [_pixels(i, seed=3) for i in range(8)]
    b = [_pixels(i, seed=3) for i in reversed(range(8))][::-1]  # order of generation does not matter
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert shapes.ShapesDataset(8, 32, seed=3)[5]["caption"] == shapes.sample_spec(3, 5).caption
    other_seed = [_pixels(i, seed=4) for i in range(8)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_seed))
    val = [_pixels(i, seed=3, split="val") for i in range(8)]
    assert not all(np.array_equal(x, y) for x, y in zip(a, val)), "splits are independent streams"


def test_sizes_restricts_the_size_words():
    default = [shapes.sample_spec(3, i) for i in range(64)]
    assert {s.size for s in default} == {"small", "large"}
    assert [s.caption for s in default] == [shapes.sample_spec(3, i, sizes=["small", "large"]).caption
                                            for i in range(64)]  # None means every size, drawn the same way
    large = shapes.ShapesDataset(64, 32, seed=3, sizes=["large"])
    specs = [shapes.sample_spec(3, i, sizes=["large"]) for i in range(64)]
    assert {s.size for s in specs} == {"large"} and all(s.radius >= 0.18 for s in specs)
    assert [large[i]["caption"] for i in range(64)] == [s.caption for s in specs]
    with pytest.raises(ValueError, match="sizes"):
        shapes.sample_spec(3, 0, sizes=[])


def test_positions_and_scale_draw_larger_shapes_where_there_is_room():
    specs = [shapes.sample_spec(3, i, sizes=["large"], positions=["center"], scale=1.7) for i in range(64)]
    assert {s.position for s in specs} == {"center"}
    assert all(0.34 * 0.9 <= s.radius <= 0.34 * 1.1 + 1e-9 for s in specs)
    for spec in specs[:8]:  # every pixel of the border stays background, so a reader finds the background there
        img = np.asarray(shapes.render(spec, 32), dtype=np.int32)
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == shapes.BACKGROUNDS[spec.background]).all(), spec
    with pytest.raises(ValueError, match=r"scale=1.2 draws shapes of radius up to 0.264 of the side, but positions "
                                         r"\['top left', .*\] leave 0.220: use a scale in \(0, 1.00\] "
                                         r"or positions=\[center\]"):
        shapes.sample_spec(3, 0, sizes=["large"], scale=1.2)
    with pytest.raises(ValueError, match=r"positions=\['middle'\] must be a non-empty list of \['top left'"):
        shapes.ShapesDataset(4, positions=["middle"])


def test_holdout_keeps_captions_out_of_the_train_split_only():
    held = ["red circle", "a large blue square in the center on a gray background"]
    plain = [shapes.sample_spec(5, i, sizes=["large"], positions=["center"]).caption for i in range(400)]
    assert any(h in c for c in plain for h in held), "the held-out captions occur without holdout"
    train = shapes.ShapesDataset(400, 16, seed=5, sizes=["large"], positions=["center"], holdout=held)
    captions = [sample["caption"] for sample in train]
    assert len(captions) == 400 and not any(h in c for c in captions for h in held)
    kept = [c for c in plain if not any(h in c for h in held)]
    assert captions[:len(kept)] == kept, "the kept samples are the same draws, in order"
    val = shapes.ShapesDataset(400, 16, seed=5, split="val", sizes=["large"], positions=["center"], holdout=held)
    assert any(h in sample["caption"] for sample in val for h in held), "held-out prompts stay in val"
    with pytest.raises(ValueError, match="removes nearly every caption"):
        shapes.ShapesDataset(4, 16, holdout=["a "])
    # a typo, another letter case, or words the layout never draws held nothing out, silently
    for held, layout in ((["pink diamnd"], {}), (["Pink diamond"], {}), (["a small red circle"], {"sizes": ["large"]})):
        with pytest.raises(ValueError, match=rf"holdout: \['{held[0]}'\] match no caption these shapes can have"):
            shapes.ShapesDataset(4, 16, holdout=held, **layout)


@pytest.mark.parametrize("resolution", [32, 64])
def test_captions_match_pixels(resolution: int):
    areas: dict[tuple[str, str], list[float]] = {}
    seen = set()
    for index in range(150):
        spec = shapes.sample_spec(7, index)
        img = _pixels(index, seed=7, resolution=resolution)
        seen.update([spec.shape, spec.color, spec.position, spec.background])
        assert spec.caption == (f"a {spec.size} {spec.color} {spec.shape} "
                                f"{'in the center' if spec.position == 'center' else 'in the ' + spec.position} "
                                f"on a {spec.background} background")
        # Foreground: pixels away from the background colour. Its dominant (fully covered) colour is the caption's.
        bg = np.array(shapes.BACKGROUNDS[spec.background])
        fg = np.abs(img - bg).sum(-1) > 60
        colors, counts = np.unique(img[fg].reshape(-1, 3), axis=0, return_counts=True)
        assert tuple(colors[counts.argmax()]) == shapes.COLORS[spec.color], spec
        # Centroid in the captioned quadrant (or near the middle for "center").
        ys, xs = np.nonzero(fg)
        cx, cy = xs.mean() / resolution, ys.mean() / resolution
        if spec.position == "center":
            assert abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1, spec
        else:
            assert (cy < 0.5) == spec.position.startswith("top") and (cx < 0.5) == spec.position.endswith("left"), spec
        assert spec.label == shapes.SHAPES.index(spec.shape)
        areas.setdefault((spec.shape, spec.size), []).append(fg.mean())
    for shape in shapes.SHAPES:  # per shape, every large one covers more pixels than every small one
        assert max(areas[shape, "small"]) < min(areas[shape, "large"]), shape
    assert seen >= set(shapes.SHAPES) | set(shapes.COLORS) | set(shapes.POSITIONS) | set(shapes.BACKGROUNDS)


def test_shapes_are_antialiased():
    """The shape is drawn large and box-filtered down: its edge pixels blend the two colours (nearest-neighbour
    sampling left two colours and jagged edges)."""
    spec = shapes.sample_spec(0, 3)
    pixels = np.asarray(shapes.render(spec, 32)).reshape(-1, 3)
    pure = {shapes.COLORS[spec.color], shapes.BACKGROUNDS[spec.background]}
    assert sum(tuple(int(v) for v in p) not in pure for p in pixels) >= 8
