"""Evaluation metrics: FID / KID against cached reference statistics, CLIP score, shapes adherence, offline errors.

Networks are random-weight InceptionV3 and CLIP built here and loaded through the local-path options; nothing is
downloaded. FID uses the 64-dim Inception layer to stay fast on CPU (the default, 2048, is the standard protocol).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from test_eval_helpers import random_inception_weights, tiny_clip

from ldm.data.shapes import COLORS, SHAPES
from ldm.data.shardlist import local_shards
from ldm.data.stream import IMAGE_KEYS
from ldm.eval.feature_extractors import InceptionFeatures, WeightsNotFoundError, clip_loader, resolve_inception_weights
from ldm.eval.metrics import GenerationMetrics, ReconstructionMetrics
from ldm.eval.reference_stats import key_hash, load_or_compute_reference_stats, reference_key
from ldm.eval.shapes_adherence import ShapesAdherence, parse_caption, read_color
from ldm.eval.sources import READER_VERSION, iter_image_batches, iter_shard_samples, load_prompts, shard_labels

DIM = 64
N_REF = 32


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception_random.pt")


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip")


@pytest.fixture(scope="session")
def train_images(shapes_shards: Path) -> tuple[torch.Tensor, list[str]]:
    shards = local_shards(str(shapes_shards / "train-*.tar"))
    images, captions = zip(*iter_image_batches(shards, 32, N_REF, N_REF))
    return images[0], list(captions[0])


@pytest.fixture(scope="session")
def reference(shapes_shards: Path, inception_weights: Path, tmp_path_factory: pytest.TempPathFactory):
    """Reference statistics of the first 32 training images, cached in a session directory."""
    cache = tmp_path_factory.mktemp("ref_cache")
    extractor = InceptionFeatures(DIM, str(inception_weights))
    stats = load_or_compute_reference_stats(str(shapes_shards / "train-*.tar"), 32, N_REF, extractor, cache, 16)
    return stats, extractor, cache


def test_fid_of_a_set_against_itself_is_zero_and_against_noise_is_large(reference, train_images):
    stats, extractor, _ = reference
    images, captions = train_images
    metrics = GenerationMetrics(["fid", "kid"], extractor, stats, kid_subset_size=16, kid_subsets=10)
    metrics.update(images, captions)
    same = metrics.compute()
    metrics.reset()  # keeps the reference
    noise = torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    metrics.update(noise, captions)
    different = metrics.compute()
    print(f"FID self {same['fid']:.3g} noise {different['fid']:.3g}; KID self {same['kid']:.3g} "
          f"noise {different['kid']:.3g}")
    assert abs(same["fid"]) < 1e-3
    assert different["fid"] > 5.0
    # note: KID of a set against itself sits slightly below 0 (subsets share images, and the unbiased MMD drops only
    # the diagonal of k(x, x)), far below KID against noise.
    assert different["kid"] > 5 * abs(same["kid"])
    assert different["kid_subset_size"] == 16

    def kid(seed: int) -> float:  # the subsets KID draws come from `seed` (the protocol's, pinned in config)
        metrics = GenerationMetrics(["kid"], extractor, stats, kid_subset_size=8, kid_subsets=5, seed=seed)
        metrics.update(noise, captions)
        return metrics.compute()["kid"]

    assert kid(0) == kid(0) != kid(1)
    # fewer images generated than kid_subset_size (1000 by default): the subsets are as large as there are images
    metrics = GenerationMetrics(["kid"], extractor, stats, kid_subsets=5)
    metrics.update(noise[:8], captions[:8])
    assert metrics.compute()["kid_subset_size"] == 8


@pytest.mark.parametrize("antialias", [False, True])
def test_inception_features_are_torchmetrics_network_with_the_protocols_resize(inception_weights: Path,
                                                                             antialias: bool):
    """`fid_antialias` reaches the network, as the row's identity says: the features equal torchmetrics'
    NoTrainInceptionV3 built with that antialias and the same weights, and differ from the other resize's."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ours = InceptionFeatures(DIM, str(inception_weights), antialias=antialias)
    reference = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(DIM)],
                                   feature_extractor_weights_path=str(inception_weights), antialias=antialias)
    with torch.no_grad():
        expected = reference(images).float()
    assert ours.identity["antialias"] is antialias
    torch.testing.assert_close(ours(images), expected, rtol=1e-5, atol=1e-5)
    other = InceptionFeatures(DIM, str(inception_weights), antialias=not antialias)
    assert not torch.allclose(other(images), expected, rtol=1e-5, atol=1e-5)


def test_reference_statistics_are_cached_and_reused(reference, shapes_shards: Path, inception_weights: Path):
    stats, _, cache = reference
    assert Path(stats.path).is_file() and Path(stats.path).parent == cache.absolute()
    mtime = os.stat(stats.path).st_mtime_ns
    fresh = InceptionFeatures(DIM, str(inception_weights))
    again = load_or_compute_reference_stats(str(shapes_shards / "train-*.tar"), 32, N_REF, fresh, cache, 16)
    assert fresh.calls == 0, "the cached statistics must be read, not recomputed"
    assert again.hash == stats.hash and os.stat(stats.path).st_mtime_ns == mtime
    assert torch.equal(again.features_sum, stats.features_sum) and again.num_samples == N_REF
    # Whatever changes the statistics changes the key: resolution, count, extractor layer, and the data itself.
    shards = local_shards(str(shapes_shards / "train-*.tar"))
    base = reference_key(shards, 32, N_REF, fresh.identity)
    assert key_hash(base) == stats.hash
    variants = [reference_key(shards, 64, N_REF, fresh.identity), reference_key(shards, 32, 16, fresh.identity),
                reference_key(shards, 32, N_REF, {**fresh.identity, "feature_dim": 2048}),
                reference_key(shards[:1], 32, N_REF, fresh.identity),
                {**base, "shards": [{**base["shards"][0], "mtime_ns": 1}] + base["shards"][1:]}]
    assert len({key_hash(k) for k in variants} | {stats.hash}) == len(variants) + 1
    # The same weights file by another path keys the same statistics (the path was part of the key).
    relative = InceptionFeatures(DIM, os.path.relpath(inception_weights))
    assert key_hash(reference_key(shards, 32, N_REF, relative.identity)) == stats.hash
    # more images asked for than the shards hold (16): the statistics of those there, recorded as 16, and read back
    few = load_or_compute_reference_stats(str(shapes_shards / "val-*.tar"), 32, 1000, fresh, cache, 16)
    reread = InceptionFeatures(DIM, str(inception_weights))
    again = load_or_compute_reference_stats(str(shapes_shards / "val-*.tar"), 32, 1000, reread, cache, 16)
    assert few.num_samples == again.num_samples == 16 and reread.calls == 0
    # What the reader decodes is part of the key through READER_VERSION: bump it with the list of image members.
    assert (READER_VERSION, IMAGE_KEYS) == (6, ("png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"))


def test_a_damaged_reference_cache_is_named_as_a_cache_to_delete(reference, shapes_shards: Path,
                                                                  inception_weights: Path, tmp_path: Path):
    """A cache file cut short, or one whose states lack an entry or have another shape: one error saying to delete
    it (the statistics are then computed again), never a KeyError or statistics of the wrong size."""
    from ldm.checkpoints import CheckpointError

    stats, _, cache = reference
    copy = tmp_path / "cache"
    copy.mkdir()
    path = copy / Path(stats.path).name
    good = torch.load(stats.path, weights_only=True)
    extractor = InceptionFeatures(DIM, str(inception_weights))
    for damage, message in ((lambda: path.write_bytes(Path(stats.path).read_bytes()[:500]), "not a readable"),
                            (lambda: torch.save({**good, "features_sum": good["features_sum"][:10]}, path),
                             r"features_sum missing or not of the shapes \[\(64,\)\]"),
                            (lambda: torch.save({k: v for k, v in good.items() if k != "features_cov_sum"}, path),
                             "features_cov_sum missing")):
        damage()
        with pytest.raises(CheckpointError, match=f"{message}.*delete"):
            load_or_compute_reference_stats(str(shapes_shards / "train-*.tar"), 32, N_REF, extractor, copy, 16)
    assert extractor.calls == 0


def test_cached_statistics_are_the_fid_real_states(reference, train_images):
    """Loading the cache into the metric equals feeding it the real images."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    stats, extractor, _ = reference
    images, _ = train_images
    direct = FrechetInceptionDistance(feature=extractor, reset_real_features=False)
    direct.update(images, real=True)
    assert torch.allclose(direct.real_features_sum, stats.features_sum, rtol=1e-5, atol=1e-4)
    assert torch.allclose(direct.real_features_cov_sum, stats.features_cov_sum, rtol=1e-5, atol=1e-3)
    assert int(direct.real_features_num_samples) == stats.num_samples


def test_clip_score_is_transformers_clip_on_the_uint8_images(clip_dir: Path, train_images):
    """torchmetrics' formula, max(mean over pairs of 100 cos(image, text), 0), of CLIPModel's embeddings of the
    processor's inputs (the uint8 images: the processor rescales them; images in [0, 1] scored 0)."""
    from transformers import CLIPModel, CLIPProcessor

    images, captions = train_images
    metrics = GenerationMetrics(["clip_score"], clip_model=str(clip_dir))
    metrics.update(images[:8], captions[:8])
    score = metrics.compute()["clip_score"]
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    with torch.no_grad():
        out = model(**processor(text=captions[:8], images=list(images[:8]), return_tensors="pt", padding=True))
    cosine = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds, dim=-1)
    assert score == pytest.approx(max(float((100 * cosine).mean()), 0.0), abs=1e-3) and score > 0


def test_clip_prompts_over_the_text_window_keep_their_end_token(clip_dir: Path, train_images):
    """torchmetrics tokenizes without truncation and cuts the ids to the window, dropping the end token where CLIP
    reads the text embedding: a long prompt scored as its start token. Cut to the window with the end token kept."""
    _, captions = train_images
    model, processor = clip_loader(str(clip_dir))()
    window = processor.max_length
    ids = processor(text=[captions[0] * 20, captions[1]], return_tensors="pt", padding=True)["input_ids"]
    assert ids.shape[-1] == window and ids[0, -1].item() == processor.tokenizer.eos_token_id
    assert copy.deepcopy(processor).max_length == window  # torchmetrics' clone() deep-copies it


def test_shapes_color_accuracy_is_high_on_real_images_and_chance_on_noise(shapes_shards: Path):
    shards = local_shards(str(shapes_shards / "train-*.tar")) + local_shards(str(shapes_shards))
    real, noise, small = (ShapesAdherence(read_shapes=False) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    for images, captions in iter_image_batches(shards, 32, None, 40):
        real.update(images, captions)
        noise.update(torch.randint(0, 256, images.shape, dtype=torch.uint8, generator=g), captions)
    for images, captions in iter_image_batches(shards, 16, None, 40):  # (the colour of the shape's core: its
        small.update(images, captions)                                  # edges, blended at 16 px, read 4 wrong)
    real_acc, noise_acc = real.compute()["shapes_color_accuracy"], noise.compute()["shapes_color_accuracy"]
    print(f"shapes_color_accuracy real {real_acc:.3f} noise {noise_acc:.3f} (chance {1 / len(COLORS):.3f})")
    assert int(real.total) == 80 and real_acc >= 0.95
    assert noise_acc <= 0.35
    assert small.compute()["shapes_color_accuracy"] >= 0.975


def test_caption_parsing_and_colour_reading():
    assert parse_caption("a small red triangle in the top left on a gray background") == ("red", "triangle")
    assert parse_caption("a photo of a dog") == (None, None)
    image = torch.zeros(3, 16, 16, dtype=torch.uint8) + 128
    image[:, 5:11, 5:11] = torch.tensor(COLORS["cyan"], dtype=torch.uint8)[:, None, None]
    assert read_color(image) == "cyan"
    assert read_color(torch.full((3, 16, 16), 40, dtype=torch.uint8)) is None  # no foreground: a miss
    # a caption naming no colour or shape scores a miss, also on an image where none is read
    adherence = ShapesAdherence()
    adherence.update(torch.full((2, 3, 16, 16), 40, dtype=torch.uint8), ["a photo of a dog", "a red circle"])
    assert adherence.compute() == {"shapes_color_accuracy": 0.0, "shapes_shape_accuracy": 0.0}


def test_reconstruction_metrics_are_perfect_on_identical_images(train_images):
    images, _ = train_images
    metrics = ReconstructionMetrics(["psnr", "ssim"])
    metrics.update(images, images)
    out = metrics.compute()
    assert out["psnr"] > 90 and out["ssim"] == pytest.approx(1.0, abs=1e-4)
    metrics.reset()
    noisy = (images.float() + torch.randn(images.shape, generator=torch.Generator().manual_seed(0)) * 20)
    noisy[5:] += torch.randn(noisy[5:].shape, generator=torch.Generator().manual_seed(1)) * 40  # batches unlike
    noisy = noisy.clamp(0, 255).to(torch.uint8)
    metrics.update(noisy[:5], images[:5])  # in batches of 5 and 27 (the mean is over images, not batches)
    metrics.update(noisy[5:], images[5:])
    out = metrics.compute()
    # per image on 8-bit values, then averaged: 10 log10(255^2 / MSE); SSIM over [0, 255] with its own data range
    mse = ((noisy.double() - images.double()) ** 2).flatten(1).mean(1)
    assert out["psnr"] == pytest.approx(float((10 * torch.log10(255.0 ** 2 / mse)).mean()), abs=1e-4)
    from torchmetrics.functional.image import structural_similarity_index_measure

    ssim = structural_similarity_index_measure(noisy.double(), images.double(), data_range=255.0)
    assert out["ssim"] == pytest.approx(float(ssim), abs=1e-6) and out["ssim"] < 0.99
    # LPIPS takes images in [-1, 1] (as training's loss): the network given the uint8 images mapped there
    from ldm.losses.lpips import build_lpips

    torch.manual_seed(0)
    net = build_lpips(False).eval()  # (a random backbone: no weights to download)
    metrics = ReconstructionMetrics(["lpips"], lpips_fn=net.forward)
    metrics.update(noisy, images)
    with torch.no_grad():
        expected = net(noisy.float() / 127.5 - 1, images.float() / 127.5 - 1).mean()
    assert metrics.compute()["lpips"] == pytest.approx(float(expected), rel=1e-5)


def test_missing_weights_fail_fast_offline_naming_the_config_key(tmp_path: Path, monkeypatch, clip_dir: Path):
    with pytest.raises(WeightsNotFoundError, match="feature_extractor_weights_path=.*no such file"):
        InceptionFeatures(DIM, str(tmp_path / "missing.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached standard weights
    with pytest.raises(WeightsNotFoundError, match="feature_extractor_weights_path"):
        resolve_inception_weights(None)
    with pytest.raises(WeightsNotFoundError, match="clip_model=openai/clip-vit-large-patch14"):
        clip_loader("openai/clip-vit-large-patch14")
    with pytest.raises(WeightsNotFoundError, match="clip_model=.*no such directory"):
        clip_loader(str(tmp_path / "no_clip_here"))
    assert callable(clip_loader(str(clip_dir)))  # a local directory needs nothing else
    (tmp_path / "broken_clip").mkdir()
    (tmp_path / "broken_clip" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsNotFoundError, match="clip_model=.*broken_clip: the CLIP model could not be loaded"):
        clip_loader(str(tmp_path / "broken_clip"))()


def test_clip_without_its_weights_fails_before_any_network_is_built(tmp_path: Path, monkeypatch, clip_dir: Path):
    """A folder or a hub cache holding only config.json (a copy or a download cut short) fails when the command
    checks its weights, not after the reference statistics were computed."""
    import shutil

    from huggingface_hub import constants

    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(clip_dir / "config.json", config_only)
    with pytest.raises(WeightsNotFoundError, match=r"clip_model=.*config_only: the folder holds no CLIP weights"):
        clip_loader(str(config_only))
    snapshot = tmp_path / "hub" / "models--org--clip" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    shutil.copy(clip_dir / "config.json", snapshot)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match=r"clip_model=org/clip is not in the Hugging Face cache \(only "
                                                   r"its config.json: no weights\)"):
        clip_loader("org/clip")
    shutil.copy(clip_dir / "model.safetensors", snapshot)
    assert callable(clip_loader("org/clip"))


def test_prompts_come_from_val_captions_or_a_file_cycled_to_n(shapes_shards: Path, tmp_path: Path):
    prompts = load_prompts("val_shards", 20, local_shards(str(shapes_shards)))
    assert len(prompts) == 20 and prompts[16:] == prompts[:4] and all("background" in p for p in prompts)
    file = tmp_path / "prompts.txt"
    file.write_text("a red circle\n\na blue square\n")
    assert load_prompts("file", 3, prompts_file=str(file)) == ["a red circle", "a blue square", "a red circle"]
    file.write_bytes("\ufeffa red circle\r\n\r\nline with\u2028separator\r\nform\x0cfeed\rold mac\n".encode())
    assert load_prompts("file", 4, prompts_file=str(file)) == ["a red circle", "line with\u2028separator",
                                                              "form\x0cfeed", "old mac"]


def test_eval_reads_captions_as_training_does(shapes_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A caption that is not UTF-8 made ldm-eval and the FID callback stop where training skips the sample: it is left
    out, with a warning naming the shard and key. A sample whose caption sits in its .json only is read from there
    by both (the reader once took the json's "caption" where training read "", and scored another prompt than the
    model learnt)."""
    import io
    import json
    import tarfile

    from ldm.data.stream import SkipLog, caption_and_label

    shard = tmp_path / "val-000000.tar"
    with tarfile.open(shapes_shards / "val-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    with tarfile.open(shard, "w") as out:
        for member, data in members:
            key = member.name.split(".")[0]
            if key == keys[0] and member.name.endswith(".txt"):
                data = b"a red \xff circle"
            elif key == keys[1] and member.name.endswith(".txt"):
                continue  # its caption in the metadata only
            elif key == keys[1] and member.name.endswith(".json"):
                data = json.dumps({**json.loads(data), "caption": "a red circle in the center"}).encode()
            elif key == keys[2] and member.name.endswith(".json"):
                data = b"{bad json"  # training skips the sample: it was scored (and refused a class model's labels)
            member.size = len(data)
            out.addfile(member, io.BytesIO(data))
    with caplog.at_level("WARNING"):
        prompts = load_prompts("val_shards", 14, [str(shard)])
        pairs = list(iter_shard_samples([str(shard)]))
    assert len(prompts) == 14 and len(pairs) == 14
    trained = caption_and_label({"json": json.dumps({"caption": "a red circle in the center"}).encode()}, SkipLog())
    assert prompts[0] == pairs[0][1] == trained[0] == "a red circle in the center"
    assert f"{shard}: sample {keys[0]} left out: it does not read as training reads it" in caplog.text
    assert f"{shard}: sample {keys[2]} left out: it does not read as training reads it (Expecting" in caplog.text
    # a class-conditional model's labels come from the same samples as the prompts they are scored against
    labels = shard_labels([str(shard)], 14)
    assert len(labels) == 14 and all(SHAPES[label] in prompt for label, prompt in zip(labels[1:], prompts[1:]))


def test_eval_groups_tar_members_into_samples_as_training_does(shapes_shards: Path, tmp_path: Path):
    """A `.DS_Store` and macOS' `._KEY.png` companions (bsdtar writes them for files with extended attributes) became
    samples of their own in ldm-eval's reader, which training skips: prompts shifted against their images, captions
    became "", and class labels were refused."""
    import io
    import tarfile

    from ldm.data.datamodule import WebDataModule

    shard = tmp_path / "val-000000.tar"
    with tarfile.open(shapes_shards / "val-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]

    def add(out: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.addfile(info, io.BytesIO(data))

    with tarfile.open(shard, "w") as out:  # half at the top, half in a folder (as macOS' tar writes a folder)
        add(out, ".DS_Store", b"\0\0\0\1Bud1")
        for i, (member, data) in enumerate(members):
            folder = "imgs/" if i >= len(members) // 2 else ""
            if folder and i == len(members) // 2:
                add(out, "imgs/.DS_Store", b"\0\0\0\1Bud1")
            add(out, f"{folder}._{member.name}", b"\0\5\26\7 AppleDouble")
            add(out, folder + member.name, data)
        add(out, "README", b"made on a Mac")
    dm = WebDataModule(train_shards=str(shard), val_shards=str(shard), batch_size=1, num_workers=0, resolution=32)
    dm.setup("fit")
    trained = [caption for batch in dm.val_dataloader() for caption in batch["caption"]]
    assert len(trained) == 16 and "" not in trained and dm.num_skipped == 0
    assert load_prompts("val_shards", 16, [str(shard)]) == trained
    assert [caption for _, caption in iter_shard_samples([str(shard)])] == trained
    labels = shard_labels([str(shard)], 16)
    assert labels is not None and all(SHAPES[label] in prompt for label, prompt in zip(labels, trained))


def test_reference_images_are_the_pixels_validation_trains_on(tmp_path: Path):
    """A non-square photo: the reference reader cropped in the original and then resized, the training loader resizes
    the shorter side and then crops, so FID's references were not the validation images (up to 94/255 apart)."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    from ldm.data.datamodule import WebDataModule
    from ldm.images import to_uint8

    rng = np.random.default_rng(0)
    shard = tmp_path / "val-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for i, size in enumerate([(64, 48), (30, 41), (100, 70)]):  # (width, height)
            smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
            for name, data in ((f"{i:06d}.png", None), (f"{i:06d}.txt", b"a photo")):
                if data is None:
                    buffer = io.BytesIO()
                    smooth.save(buffer, format="PNG")
                    data = buffer.getvalue()
                member = tarfile.TarInfo(name)
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    references = torch.cat([images for images, _ in iter_image_batches([str(shard)], 32, None, 8)])
    dm = WebDataModule(train_shards=str(shard), val_shards=str(shard), resolution=32, batch_size=8, num_workers=0)
    validation = torch.cat([to_uint8(batch["image"]) for batch in dm.val_dataloader()])
    assert references.shape == (3, 3, 32, 32) and torch.equal(references, validation)


def test_eval_reads_every_training_image_format_and_reports_damaged_shards(shapes_shards: Path, tmp_path: Path,
                                                                           caplog: pytest.LogCaptureFixture):
    """The evaluation reader takes the image formats the training loader takes (bmp too); a sample whose image does
    not decode is left out naming its shard and key, and a truncated shard is reported against its count."""
    import io
    import shutil
    import tarfile

    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for name in ("val-000000.tar", "summary.json"):
        shutil.copy(shapes_shards / name, data / name)
    shard = data / "val-000000.tar"
    with tarfile.open(shapes_shards / "val-000000.tar") as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(shard, "w") as out:  # sample 0 as .bmp, sample 1's image replaced by text
        for i, (member, data_) in enumerate(members):
            if member.name.endswith(".png") and i < 3:
                buffer = io.BytesIO()
                Image.open(io.BytesIO(data_)).save(buffer, format="BMP")
                member, data_ = tarfile.TarInfo(member.name.replace(".png", ".bmp")), buffer.getvalue()
            elif member.name.endswith(".png") and i < 6:
                data_ = b"not an image"
            member.size = len(data_)
            out.addfile(member, io.BytesIO(data_))
    with caplog.at_level("WARNING"):
        images, captions = zip(*iter_image_batches([str(shard)], 32, None, 64))
    assert len(torch.cat(images)) == 15  # 16 samples, one undecodable
    assert f"{shard}: sample " in caplog.text and "does not decode" in caplog.text

    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])
    caplog.clear()
    with caplog.at_level("WARNING"):
        images, _ = zip(*iter_image_batches([str(shard)], 32, None, 64))
    read = len(torch.cat(images)) + 1
    assert read < 16 and f"damaged tar {shard}: it ends after" in caplog.text and "its count says 16" in caplog.text


def test_sharded_clip_weights_are_fingerprinted_by_every_shard(tmp_path: Path):
    """A row's clip_model named a sharded folder without a hash: other weights under the same name were taken as
    scored already (skip_done)."""
    import json

    from ldm.eval.feature_extractors import clip_identity

    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in set(index["weight_map"].values()):
        (tmp_path / name).write_bytes(b"shard " + name.encode())
    before = clip_identity(str(tmp_path))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"other weights")
    after = clip_identity(str(tmp_path))
    assert before["weights_sha256"] and before["weights_sha256"] != after["weights_sha256"]

