"""WebDataModule on ldm-encode's latent shards: the same batches, order, flips, DDP split, resume and corrupt-sample
handling as on the image shards they came from."""

from __future__ import annotations

import copy
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from scale_helpers import compose_train, run_cli, tiny_autoencoder_export, tiny_ldm_overrides, tiny_overrides

from ldm import config as configs
from ldm.cli.encode import encode
from ldm.conditioning import ByteTextEncoder
from ldm.config import ConfigError
from ldm.data import latents
from ldm.data.datamodule import WebDataModule
from ldm.data.latents import weights_hash
from ldm.nn.autoencoder import AutoencoderKL


@pytest.fixture(scope="module")
def encoded(shapes_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ (with flips and text) and val/ latents of `shapes_shards` under one root."""
    root = tmp_path_factory.mktemp("encoded")
    torch.manual_seed(1)
    text = ByteTextEncoder(width=16, num_layers=1, num_heads=2, max_length=72).save_pretrained(root / "text")
    autoencoder = tiny_autoencoder_export(root / "ae")
    for split in ("train", "val"):
        encode({"shards": str(shapes_shards / f"{split}-*.tar"), "autoencoder_path": str(autoencoder),
                "output_dir": str(root / split), "flips": True, "progress": False,
                "text_encoder": {"kind": "byte", "name_or_path": str(text)}})
    return root


def stored(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """key -> {member: float32 tensor} of every latent shard in `directory`."""
    out = {}
    for shard in sorted(directory.glob("*.tar")):
        for s in wds.tarfile_to_samples()(iter([{"url": str(shard)}])):
            out[s["__key__"]] = {m: torch.from_numpy(latents.from_npy(s[m]).astype(np.float32))
                                 for m in (latents.MOMENTS, latents.MOMENTS_FLIP, latents.CONTEXT, latents.POOLED)}
    return out


def originals(shards: Path) -> dict[str, torch.Tensor]:
    """key -> image (3, 32, 32) in [-1, 1] of the train image shards."""
    out = {}
    for shard in sorted(shards.glob("train-*.tar")):
        for s in wds.tarfile_to_samples()(iter([{"url": str(shard)}])):
            pixels = np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"), dtype=np.uint8)
            out[s["__key__"]] = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return out


def datamodule(train: str, val: str | None = None, **options) -> WebDataModule:
    dm = WebDataModule(**{"train_shards": train, "val_shards": val, "batch_size": 8, "num_workers": 1, "seed": 0,
                          **options})
    dm.setup("fit")
    return dm


def test_latent_batches_follow_the_image_batches(shapes_shards: Path, encoded: Path):
    images = datamodule(str(shapes_shards / "train-*.tar"), hflip=True)
    lat = datamodule(str(encoded / "train" / "train-*.tar"), str(encoded / "val" / "val-*.tar"), hflip=True)
    assert images.latent_manifest is None and lat.latent_manifest.flips
    arrays, pictures = stored(encoded / "train"), originals(shapes_shards)
    flipped_keys = []  # per epoch: crops and flips are drawn anew each epoch, on both paths alike
    image_loader, latent_loader = images.train_dataloader(), lat.train_dataloader()
    for _ in range(2):  # epochs 0 and 1 (each iteration of a loader is the next epoch)
        flips, flipped_keys = set(), flipped_keys + [set()]
        image_batches, latent_batches = list(image_loader), list(latent_loader)
        assert len(image_batches) == len(latent_batches) == 8
        for ib, lb in zip(image_batches, latent_batches, strict=True):
            assert lb["key"] == ib["key"] and lb["caption"] == ib["caption"]  # same order: the same plan
            assert torch.equal(lb["label"], ib["label"])
            assert lb["moments"].shape == (8, 8, 8, 8) and lb["moments"].dtype == torch.float32
            assert lb["text_context"].shape == (8, 72, 16) and lb["text_pooled"].shape == (8, 16)
            assert "image" not in lb
            for i, key in enumerate(lb["key"]):
                original = pictures[key]
                if torch.equal(original, original.flip(2)):
                    continue  # a mirror-symmetric picture does not show whether it was flipped
                flipped = torch.equal(ib["image"][i], original.flip(2))
                assert flipped or torch.equal(ib["image"][i], original)
                want = arrays[key][latents.MOMENTS_FLIP if flipped else latents.MOMENTS]
                assert torch.equal(lb["moments"][i], want), key  # the same samples flip both ways
                assert torch.equal(lb["text_context"][i], arrays[key][latents.CONTEXT])
                flips.add(flipped)
                if flipped:
                    flipped_keys[-1].add(key)
        assert flips == {True, False}
    assert flipped_keys[0] != flipped_keys[1]  # epoch 1 drew its own flips
    val = list(lat.val_dataloader())
    assert sorted(k for b in val for k in b["key"]) == [f"{i:09d}" for i in range(16)]
    val_arrays = stored(encoded / "val")
    assert all(torch.equal(b["moments"][i], val_arrays[k][latents.MOMENTS])  # validation never flips
               for b in val for i, k in enumerate(b["key"]))


def test_ranks_split_latents_exactly_and_resume(encoded: Path, monkeypatch: pytest.MonkeyPatch):
    train = str(encoded / "train" / "train-*.tar")
    monkeypatch.setenv("WORLD_SIZE", "2")
    keys = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        batches = list(datamodule(train, num_workers=2, batch_size=4).train_dataloader())
        assert len(batches) == 8  # 64 samples / (2 ranks x 2 workers x 4)
        keys.append([k for b in batches for k in b["key"]])
    assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == 64

    monkeypatch.setenv("RANK", "0")
    full = list(datamodule(train, num_workers=2, batch_size=4).train_dataloader())
    interrupted = datamodule(train, num_workers=2, batch_size=4)
    loader = iter(interrupted.train_dataloader())
    head = [next(loader) for _ in range(3)]
    state = interrupted.state_dict()
    resumed = datamodule(train, num_workers=2, batch_size=4)
    resumed.load_state_dict(state)
    for got, want in zip(head + list(resumed.train_dataloader()), full, strict=True):
        assert got["key"] == want["key"] and torch.equal(got["moments"], want["moments"])


def test_a_corrupt_latent_sample_is_skipped_and_reported(encoded: Path, tmp_path: Path):
    copy = tmp_path / "train"
    shutil.copytree(encoded / "train", copy)
    shard = copy / "train-000001.tar"
    samples = list(wds.tarfile_to_samples()(iter([{"url": str(shard)}])))
    bad, misshapen, infinite = samples[3]["__key__"], samples[5]["__key__"], samples[7]["__key__"]
    samples[3][latents.MOMENTS] = b"\x93NUMPY garbage"
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((8, 3, 3), np.float16))  # a readable array of another shape than the manifest's
    samples[5][latents.MOMENTS] = wrong.getvalue()
    moments = np.load(io.BytesIO(samples[7][latents.MOMENTS])).copy()
    moments[0, 0, 0] = np.inf  # ldm-encode never writes one: left in, it made its whole batch's loss NaN
    damaged = io.BytesIO()
    np.save(damaged, moments)
    samples[7][latents.MOMENTS] = damaged.getvalue()
    with wds.TarWriter(str(shard), encoder=False) as sink:
        for s in samples:
            sink.write({k: v for k, v in s.items() if k in ("__key__",) or not k.startswith("__")})
    dm = datamodule(str(copy / "train-*.tar"), num_workers=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 8  # topped up: every rank keeps its batch count
    assert not {bad, misshapen, infinite} & {k for b in batches for k in b["key"]}
    reasons = {key: (shard, reason) for shard, key, reason in dm.skipped}
    assert dm.num_skipped == 3 and set(reasons) == {bad, misshapen, infinite}
    assert "train-000001.tar" in reasons[bad][0] and "the manifest says" in reasons[misshapen][1]
    assert f"{latents.MOMENTS} holds non-finite values" in reasons[infinite][1]


def test_settings_latents_cannot_honour_fail_naming_the_key(shapes_shards: Path, encoded: Path, tmp_path: Path):
    train = str(encoded / "train" / "train-*.tar")
    with pytest.raises(ConfigError, match=r"data.resolution=64 .* encoded at 32 px"):
        datamodule(train, resolution=64)
    with pytest.raises(ConfigError, match="data.random_crop=true"):
        datamodule(train, random_crop=True)
    with pytest.raises(ConfigError, match="both be images or both latent shards"):
        datamodule(train, str(shapes_shards / "val-*.tar"))
    with pytest.raises(ConfigError, match="mixes latent shards"):
        datamodule(f"{train}::{shapes_shards}/train-000000.tar")
    plain = tmp_path / "plain"
    encode({"shards": str(shapes_shards / "val-*.tar"), "output_dir": str(plain), "progress": False,
            "autoencoder_path": str(encoded / "ae"), "text_encoder": {"kind": "byte", "name_or_path": str(encoded /
                                                                                                     "text")}})
    with pytest.raises(ConfigError, match="data.hflip=true .* flips=true"):
        datamodule(str(plain / "val-*.tar"), hflip=True)
    # validation reads unflipped latents: a val split encoded without flips serves a flipping training split
    dm = datamodule(train, str(plain / "val-*.tar"), hflip=True)
    assert next(iter(dm.val_dataloader()))["moments"].shape[0] == 8
    with pytest.raises(ConfigError, match="has flips=True but .* has flips=False"):  # within one split they agree
        datamodule(f"{train}::{plain}/val-*.tar")


def test_latent_shards_without_their_manifest_are_named_as_such(shapes_shards: Path, encoded: Path, tmp_path: Path):
    """The tars copied without manifest.json, alone or after image shards: read as image shards none of whose samples
    decodes, training failed once fitting (naming them damaged, to be rewritten with ldm-data) or skipped them all,
    and ldm-encode wrote empty latent shards."""
    copied = tmp_path / "copied"
    copied.mkdir()
    for shard in (encoded / "train").glob("train-*.tar"):
        shutil.copy(shard, copied)
    message = r"is a latent shard \(ldm-encode's\), but its folder has no manifest\.json saying which encoders wrote it"
    for shards in (str(copied / "train-*.tar"), f"{shapes_shards}/train-000000.tar::{copied}/train-*.tar"):
        with pytest.raises(ConfigError, match=rf"data\.train_shards: .*copied/train-000000\.tar {message}; train on a "
                                              rf"copy of the whole ldm-encode output_dir \(manifest\.json and each "
                                              rf"NAME_stats\.json beside the shards\)"):
            datamodule(shards)
        with pytest.raises(ConfigError, match=rf"^shards: .*copied/train-000000\.tar {message}; this command reads "
                                              rf"image shards: give those the latents were encoded from$"):
            encode({"shards": shards, "autoencoder_path": str(encoded / "ae"), "output_dir": str(tmp_path / "again"),
                    "progress": False})
        assert not (tmp_path / "again").exists()


def test_a_resolution_the_latents_cannot_give_is_named_before_the_models_size(shapes_shards: Path, encoded: Path,
                                                                             tmp_path: Path):
    """data.resolution=16 on latents encoded at 32 px, model.image_size unset: the model's size check asked for
    model.image_size=${data.resolution}, after which the latents' check asked for data.resolution=32."""
    overrides = latent_run(shapes_shards, encoded, encoded / "ae", tmp_path / "run", 2)
    cfg = compose_train([*overrides, "data.resolution=16"])
    module, dm = configs.instantiate(cfg.model, "model"), configs.instantiate(cfg.data, "data")
    with pytest.raises(ConfigError, match=r"data\.resolution=16 .* encoded at 32 px"):
        module.check_data(dm)


def test_stored_text_of_other_settings_is_refused_naming_the_key(encoded: Path):
    """The same text encoder weights read at another layer, padded to another length, pooled by another kind's rule
    or behind another tokenizer give other contexts: the model's conditioner must match the stored text in each, and
    a mismatch names the key, both values and the ldm-encode command that fits the model."""
    manifest = latents.read_manifest(encoded / "train" / latents.MANIFEST_NAME)
    text_hash, ae_hash = manifest.text_encoder["sha256"], manifest.autoencoder["sha256"]
    model = {"kind": "byte", "name_or_path": "/models/text", "layer": "last", "max_length": 72}
    latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash=text_hash, text_encoder=model)
    for key, value, stored in (("max_length", 16, 72), ("layer", "penultimate", "last"), ("kind", "hf", "byte")):
        with pytest.raises(ConfigError, match=rf"encoded with {key}={stored}, but the model's text encoder has model"
                                              rf"\.conditioner\.{key}={value}: set model\.conditioner\.{key}="
                                              rf"{stored}, or encode the shards again with ldm-encode "
                                              rf"text_encoder='{{kind: {value if key == 'kind' else 'byte'}, "
                                              rf"name_or_path: /models/text, "):
            latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash=text_hash,
                                   text_encoder={**model, key: value})
    # the same weights behind another tokenizer (SD 1's and SD 2's CLIP pad with different tokens): other token ids
    tokens = manifest.text_encoder["tokens_sha256"]
    latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash=text_hash,
                           text_encoder={**model, "tokens_sha256": tokens})
    with pytest.raises(ConfigError, match=r"encoded with max_length=72, but"):  # (the token ids differ with it)
        latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash=text_hash,
                               text_encoder={**model, "tokens_sha256": "0" * 64, "max_length": 16})
    with pytest.raises(ConfigError, match=r"hold text tokenized otherwise than by the tokenizer of model\.conditioner"
                                          r"\.name_or_path=/models/text \(the same weights, other token ids\): "
                                          r"encode the shards again"):  # (a byte encoder takes no other tokenizer)
        latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash=text_hash,
                               text_encoder={**model, "tokens_sha256": "0" * 64})
    # a CLIP's tokenizer is the user's key even under model.init_from: offered back, and kept in the ldm-encode advice
    clip = copy.deepcopy(manifest)
    clip.text_encoder["config"]["kind"] = "clip"
    with pytest.raises(ConfigError, match=r"tokenized otherwise than by model\.conditioner\.tokenizer=/tok \(the same "
                                          r"weights, other token ids\): set model\.conditioner\.tokenizer to the one "
                                          r"they were encoded with \(their encoder folder's own\), or encode the "
                                          r"shards again with ldm-encode text_encoder='\{kind: clip, name_or_path: "
                                          r"/models/text, tokenizer: /tok, "):
        latents.check_manifest(clip, ae_hash, "ae", text_encoder_hash=text_hash, text_encoder={
            **model, "kind": "clip", "tokens_sha256": "0" * 64, "tokenizer": "/tok", "init_from": "/models/sd"})
    with pytest.raises(ConfigError, match=rf"\(sha256 {text_hash}\), but model\.conditioner\.name_or_path=/models/"
                                          rf"text has sha256 abc: encode the shards again with ldm-encode .*, set "
                                          rf"model\.conditioner\.name_or_path={encoded / 'text'}"):
        latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash="abc", text_encoder=model)
    # model.init_from sets the conditioner: setting its keys would change nothing, so only re-encoding is offered
    with pytest.raises(ConfigError) as error:
        latents.check_manifest(manifest, ae_hash, "ae", text_encoder_hash=text_hash,
                               text_encoder={**model, "max_length": 16, "init_from": "/models/sd"})
    assert "max_length=16 (model.init_from=/models/sd sets model.conditioner): encode the shards again" in \
        str(error.value) and "set model.conditioner" not in str(error.value)

    # two latent folders (train + val, or two training folders) of the same weights at other settings: compared by
    # their weights alone, the second was read with the first's manifest (its samples skipped as corrupt, or its
    # contexts taken for the model's)
    other = copy.deepcopy(manifest)
    other.path = encoded / "other" / latents.MANIFEST_NAME
    latents.check_same_encoders(manifest, copy.deepcopy(manifest), "data.val_shards")
    for what, value in (("layer", "penultimate"), ("context_shape", [32, 16])):
        (other.text_encoder["config"] if what == "layer" else other.text_encoder)[what] = value
        with pytest.raises(ConfigError, match=rf"data\.val_shards: .* holds text encoded with {what}=.* but "
                                              rf".*other.* with {what}=.*; encode every split with the same"):
            latents.check_same_encoders(manifest, other, "data.val_shards")
    for what in ("autoencoder", "text_encoder"):  # and of other weights
        other = copy.deepcopy(manifest)
        other.path = encoded / "other" / latents.MANIFEST_NAME
        other.data[what]["sha256"] = "0" * 64
        with pytest.raises(ConfigError, match=rf"data\.val_shards: .* and .*other.* were encoded with different "
                                              rf"{what}s \(sha256 .* and 0000"):
            latents.check_same_encoders(manifest, other, "data.val_shards")


def latent_run(shapes_shards: Path, encoded: Path, autoencoder: Path, out: Path, max_steps: int) -> list[str]:
    """ldm-train overrides: the tiny LDM on the encoded shards, with the encoding's frozen text encoder."""
    return tiny_overrides(shapes_shards, out, max_steps=max_steps, every=2) + tiny_ldm_overrides(autoencoder) + [
        f"data.train_shards={encoded}/train/train-*.tar", f"data.val_shards={encoded}/val/val-*.tar",
        "model.conditioner.name_or_path=" + str(encoded / "text"), "model.conditioner.width=16",
        "model.conditioner.num_heads=2", "model.conditioner.max_length=72", "model.unet.context_dim=16"]


def test_ldm_train_runs_on_latent_shards(shapes_shards: Path, encoded: Path, tmp_path: Path):
    out = tmp_path / "run"
    result = run_cli(latent_run(shapes_shards, encoded, encoded / "ae", out, 4), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert "throughput summary: 4 steps, 16 images" in (out / "train.log").read_text()


def test_ldm_train_refuses_latents_of_another_autoencoder(shapes_shards: Path, encoded: Path, tmp_path: Path):
    """Latents encoded by one autoencoder, a model built on another: the run stops at start naming both hashes."""
    other = AutoencoderKL.from_pretrained(encoded / "ae")
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.01)
    stats = json.loads((encoded / "ae" / "latent_stats.json").read_text())
    other.save_pretrained(tmp_path / "other_ae", latent_stats=stats)
    out = tmp_path / "run"
    result = run_cli(latent_run(shapes_shards, encoded, tmp_path / "other_ae", out, 2), env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert weights_hash(other) in result.stderr and weights_hash(AutoencoderKL.from_pretrained(encoded / "ae")) in \
        result.stderr and "Traceback" not in result.stderr
    assert not (out / "checkpoints" / "last.ckpt").exists()


def test_ldm_train_refuses_stored_text_for_a_text_encoder_that_trains(shapes_shards: Path, encoded: Path,
                                                                      tmp_path: Path):
    """Shards holding the frozen encoder's text, a model without `model.conditioner.name_or_path` (a new byte encoder,
    which trains): refused at start, naming the cause and the encoder to condition on."""
    out = tmp_path / "run"
    overrides = latent_run(shapes_shards, encoded, encoded / "ae", out, 2) + ["model.conditioner.name_or_path=null"]
    result = run_cli(overrides, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "model.conditioner.name_or_path is null, so a new byte encoder trains" in result.stderr
    assert f"model.conditioner.name_or_path={encoded / 'text'}" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "checkpoints" / "last.ckpt").exists()


def test_stored_text_of_the_default_clip_names_no_path(encoded: Path):
    """Text encoded by `{kind: clip}` (name_or_path null: CLIP's default) and a model fine-tuning its encoder: the
    message blames trainable=true and suggests no `name_or_path=None` (which Hydra would read as the string)."""
    manifest = latents.read_manifest(encoded / "train" / latents.MANIFEST_NAME)
    manifest.text_encoder["config"] = {"kind": "clip", "name_or_path": None}
    with pytest.raises(ConfigError) as error:
        latents.check_manifest(manifest, manifest.autoencoder["sha256"], "ae",
                               text_encoder_trains="model.conditioner.trainable=true fine-tunes it")
    assert "frozen clip encoder (its default), but model.conditioner.trainable=true fine-tunes it: set " \
           "model.conditioner.kind=clip model.conditioner.trainable=false" in str(error.value)
    assert "None" not in str(error.value)
    # the encoder's folder recorded, and gone (the run and its data moved to another machine): not named as the fix
    manifest.text_encoder["config"] = {"kind": "byte", "name_or_path": "/old/machine/clip/export"}
    with pytest.raises(ConfigError, match=re.escape("set model.conditioner.kind=byte model.conditioner.name_or_path="
                                                    "<the folder it moved to: /old/machine/clip/export is not there "
                                                    "now> model.conditioner.trainable=false")):
        latents.check_manifest(manifest, manifest.autoencoder["sha256"], "ae",
                               text_encoder_trains="model.conditioner.trainable=true fine-tunes it")


def test_image_models_and_image_metrics_refuse_latent_shards(shapes_shards: Path, encoded: Path, tmp_path: Path):
    """The autoencoder and the contrastive model train on images, and FID references and autoencoder evaluation read
    images: latent shards given to them stop the run with one message naming the manifest and the fix."""
    from hydra import compose, initialize_config_dir
    from test_eval_helpers import tiny_ldm_checkpoint

    from ldm.callbacks.fid import FIDCallback
    from ldm.cli.common import CONF_DIR
    from ldm.cli.train import train
    from ldm.eval.evaluator import require_image_shards
    from ldm.modules.latent_diffusion import LatentDiffusionModule

    for experiment, model in (("quickstart_vae", "the autoencoder"), ("quickstart_clip", "the contrastive")):
        overrides = [f"experiment={experiment}", *tiny_overrides(shapes_shards, tmp_path / experiment, 2, 2),
                     f"data.train_shards={encoded}/train/train-*.tar", f"data.val_shards={encoded}/val/val-*.tar"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        with pytest.raises(ConfigError, match=f"latent shards .*train/manifest.json.*, but {model}.* trains on images"):
            train(cfg)
        assert not list((tmp_path / experiment).glob("checkpoints/*.ckpt"))
    with pytest.raises(ConfigError, match=r"need reference images, but .* are latent shards .*val/manifest\.json"):
        require_image_shards(str(encoded / "val" / "val-*.tar"), "FID/KID/rFID need reference images")
    require_image_shards(str(shapes_shards / "val-*.tar"), "FID/KID/rFID need reference images")  # images: no error
    callback = FIDCallback(val_shards=str(encoded / "val" / "val-*.tar"), num_samples=4, num_steps=2)
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    with pytest.raises(ConfigError, match=r"callbacks\.fid\.val_shards are the FID's reference images, but .* are "
                                          r"latent shards .*; training on latents, set callbacks\.fid\.val_shards "
                                          r"to the image shards they were encoded from$"):  # (it named no such key)
        callback.setup(None, module, "fit")  # at the start of fit, before any training


def test_a_compressed_image_shard_and_the_latent_shard_written_from_it_draw_the_same_flips():
    """ldm-encode writes x.tar for x.tar.gz; the per-sample draw named the shard by its own file, so images from the
    compressed shard and latents from its plain one flipped different samples (17 of 31 agreed)."""
    from types import SimpleNamespace

    from ldm.data.stream import ShardStream

    stream = SimpleNamespace(plan=SimpleNamespace(seed=3, epoch=2))
    for key in range(32):
        draws = {url: ShardStream.sample_rng(stream, {"url": url, "key": f"{key:09d}"}).random()
                 for url in ("/data/train-000000.tar.gz", "/data/train-000000.tgz", "/latents/train-000000.tar")}
        assert len(set(draws.values())) == 1, draws
