"""ldm-encode on real shards: moments equal the autoencoder's own, manifest content, flips, text, resume, several
processes, and the errors that name both encoders."""

from __future__ import annotations

import copy
import gzip
import io
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from scale_helpers import REPO, cli_env, tiny_autoencoder_export

from ldm.cli.data import write_dataset
from ldm.cli.encode import encode
from ldm.cli.run_lock import RunDirectoryLocked
from ldm.conditioning import ByteTextEncoder
from ldm.config import ConfigError, pasteable
from ldm.data import encoding, latents
from ldm.data.datamodule import WebDataModule
from ldm.data.shards import MEMBER_MTIME
from ldm.nn.autoencoder import load_autoencoder


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a random KL-f4 autoencoder export for 32 px, a random frozen byte text encoder export)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(1)
    text = ByteTextEncoder(width=16, num_layers=1, num_heads=2, max_length=72).save_pretrained(root / "text")
    return tiny_autoencoder_export(root / "ae"), text


def run_encode(shards: Path, autoencoder: Path, out: Path, **options) -> dict:
    return encode({"shards": str(shards / "train-*.tar"), "autoencoder_path": str(autoencoder),
                   "output_dir": str(out), "progress": False, "batch_size": 8, **options})


def read_shard(path: Path) -> list[dict]:
    return list(wds.tarfile_to_samples()(iter([{"url": str(path)}])))


def images_of(shard: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(keys, captions, images (N, 3, 32, 32) in [-1, 1]) of an image shard, scaled as the datamodule does."""
    samples = read_shard(shard)
    pixels = [np.asarray(Image.open(io.BytesIO(s["png"])).convert("RGB"), dtype=np.uint8) for s in samples]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return [s["__key__"] for s in samples], [s["txt"].decode() for s in samples], x


def test_moments_text_and_manifest_round_trip(shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    autoencoder, text = encoders
    out = tmp_path / "latents"
    summary = run_encode(shapes_shards, autoencoder, out, flips=True,
                         text_encoder={"kind": "byte", "name_or_path": str(text)})
    assert summary["shards_encoded"] == 4 and summary["samples"] == 64 and summary["failed"] == 0
    assert sorted(p.name for p in out.glob("*.tar")) == sorted(p.name for p in shapes_shards.glob("train-*.tar"))
    # ldm-eval's prompts and class labels of a model trained on them: the latent shards' captions (it found none, as
    # their samples hold no image)
    from ldm.eval.sources import shard_captions, shard_labels
    images, encoded = sorted(map(str, shapes_shards.glob("train-*.tar"))), sorted(map(str, out.glob("*.tar")))
    assert shard_captions(encoded) == shard_captions(images) and len(shard_captions(encoded)) == 64
    assert shard_labels(encoded) == shard_labels(images) is not None

    ae, stats = load_autoencoder(autoencoder)
    encoder = ByteTextEncoder.from_pretrained(text)
    manifest = latents.read_manifest(out / latents.MANIFEST_NAME)
    assert manifest.autoencoder["sha256"] == latents.weights_hash(ae)
    assert manifest.autoencoder["latent_scale"] == pytest.approx(stats["scale_factor"])
    assert (manifest.autoencoder["downsample_factor"], manifest.autoencoder["resolution"]) == (4, 32)
    assert manifest.resolution == 32 and manifest.flips
    assert manifest.data["moments"] == {"dtype": "float16", "shape": [8, 8, 8]}
    assert manifest.text_encoder["sha256"] == latents.weights_hash(encoder)
    assert manifest.text_encoder["config"]["width"] == 16  # read from the export
    assert manifest.text_encoder["context_shape"] == [72, 16] and manifest.text_encoder["pooled_shape"] == [16]
    # absolute, as errors name them to a training run started anywhere
    assert manifest.autoencoder["path"] == str(autoencoder.resolve())
    assert manifest.text_encoder["config"]["name_or_path"] == str(text.resolve())

    keys, captions, x = images_of(shapes_shards / "train-000001.tar")
    stored = read_shard(out / "train-000001.tar")
    assert [s["__key__"] for s in stored] == keys
    assert [s["txt"].decode() for s in stored] == captions
    assert all("json" in s for s in stored)
    with tarfile.open(out / "train-000001.tar") as tar:  # one ustar header per member, no PAX record
        assert all(m.pax_headers == {} and m.mtime == MEMBER_MTIME for m in tar.getmembers())
    with torch.no_grad():
        posterior, flipped = ae.encode(x), ae.encode(x.flip(3))
        context, pooled = encoder(captions)
    want = torch.cat([posterior.mean, posterior.logvar], 1)                    # (16, 8, 8, 8)
    want_flip = torch.cat([flipped.mean, flipped.logvar], 1)

    def arrays(name: str) -> torch.Tensor:
        values = np.stack([latents.from_npy(s[name]) for s in stored])
        assert values.dtype == np.float16
        return torch.from_numpy(values.astype(np.float32))

    # Within fp16 rounding of the autoencoder's own moments (one ulp of fp16: 2**-10 relative).
    torch.testing.assert_close(arrays(latents.MOMENTS), want, rtol=2**-10, atol=1e-4)
    torch.testing.assert_close(arrays(latents.MOMENTS_FLIP), want_flip, rtol=2**-10, atol=1e-4)
    assert not torch.allclose(want, want_flip, atol=1e-2)  # the flipped copy really is another image
    torch.testing.assert_close(arrays(latents.CONTEXT), context, rtol=2**-10, atol=1e-3)
    torch.testing.assert_close(arrays(latents.POOLED), pooled, rtol=2**-10, atol=1e-3)
    assert json.loads((out / "train-000001_stats.json").read_text())["successes"] == 16


def test_resume_skips_finished_shards_and_rewrites_a_partial_one(shapes_shards: Path, encoders: tuple[Path, Path],
                                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture):
    autoencoder, _ = encoders
    out = tmp_path / "latents"
    run_encode(shapes_shards, autoencoder, out)
    finished = {name: (out / name).stat() for name in ("train-000000.tar", "train-000001.tar")}
    complete = (out / "train-000002.tar").read_bytes()
    # Interrupted runs: shard 2 half-written (no stats file yet), shard 3 never renamed into place (a temp file).
    (out / "train-000002.tar").write_bytes(complete[: len(complete) // 2])
    (out / "train-000002_stats.json").unlink()
    (out / "train-000003.tar").rename(out / ".train-000003.tar.x1y2.tmp")
    (out / "train-000003_stats.json").rename(out / ".train-000003_stats.json.x1y2.tmp")  # its stats' write, and the
    (out / ".manifest.json.x1y2.tmp").write_text("{")                                    # manifest's, cut too

    summary = run_encode(shapes_shards, autoencoder, out)
    assert summary["shards_finished_before"] == 2 and summary["shards_encoded"] == 2 and summary["samples"] == 32
    for name, before in finished.items():  # not rewritten
        after = (out / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert len(read_shard(out / "train-000002.tar")) == 16 and len(read_shard(out / "train-000003.tar")) == 16
    assert not list(out.glob(".*.tmp"))

    whole = (out / "train-000001.tar").read_bytes()  # damaged after it was finished (a copy cut short)
    (out / "train-000001.tar").write_bytes(whole[: len(whole) // 3])
    summary = run_encode(shapes_shards, autoencoder, out)
    assert summary["shards_finished_before"] == 3 and summary["shards_encoded"] == 1
    assert (out / "train-000001.tar").read_bytes() == whole

    stats = json.loads((out / "train-000001_stats.json").read_text())  # as written before shard sizes were recorded
    del stats["output_size"]
    (out / "train-000001_stats.json").write_text(json.dumps(stats))
    summary = run_encode(shapes_shards, autoencoder, out)
    assert summary["shards_finished_before"] == 4, "an intact shard of such stats is kept"
    with tarfile.open(out / "train-000001.tar") as tar:  # cut inside the data of a member in the middle
        member = tar.getmembers()[len(tar.getmembers()) // 2]
    (out / "train-000001.tar").write_bytes(whole[: member.offset_data + member.size // 2])
    summary = run_encode(shapes_shards, autoencoder, out)
    assert summary["shards_finished_before"] == 3 and (out / "train-000001.tar").read_bytes() == whole
    for damaged in (b"[]", b"\xff\xfe"):  # stats that are JSON but no object, or not text: encoded again
        (out / "train-000001_stats.json").write_bytes(damaged)
        summary = run_encode(shapes_shards, autoencoder, out)
        assert summary["shards_finished_before"] == 3 and (out / "train-000001.tar").read_bytes() == whole
    # stats of an ldm-encode that recorded no input size and time: encoded again, and the log says why (it said
    # nothing, and a rerun over an older version's output re-encoded everything unexplained)
    stats = json.loads((out / "train-000001_stats.json").read_text())
    (out / "train-000001_stats.json").write_text(json.dumps({k: v for k, v in stats.items()
                                                             if k not in ("input_size", "input_mtime_ns")}))
    with caplog.at_level(logging.INFO, logger="ldm.cli.encode"):
        summary = run_encode(shapes_shards, autoencoder, out)
    assert summary["shards_finished_before"] == 3 and (out / "train-000001.tar").read_bytes() == whole
    assert "(3 finished earlier; 1 written by an older ldm-encode, which recorded no input size and time to tell " \
           "them current, encoded again)" in caplog.text


def test_an_interrupted_shard_leaves_no_file_behind(shapes_shards: Path, encoders: tuple[Path, Path],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stop in the middle of a shard (Ctrl-C after its first batch was written) leaves neither that shard nor a
    temp file, only the manifest and the shards finished before it; the next run encodes the rest."""
    autoencoder, _ = encoders
    out, calls = tmp_path / "latents", []
    encode_batch = encoding._encode_batch

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # 16 samples a shard, batches of 8: shard 1's second batch
            raise KeyboardInterrupt
        return encode_batch(*args, **kwargs)

    monkeypatch.setattr(encoding, "_encode_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_encode(shapes_shards, autoencoder, out)
    assert sorted(p.name for p in out.iterdir()) == [latents.MANIFEST_NAME, "train-000000.tar",
                                                     "train-000000_stats.json"]  # the manifest comes first
    # Training on what is there: told that the manifest lists shards the folder lacks; a shard renamed into place
    # whose stats file is not written yet (the stop came between the two) is refused.
    with pytest.warns(UserWarning, match=r"lists 4 input shards, but 3 have no finished latent shard beside it"):
        WebDataModule(train_shards=str(out / "train-*.tar"), batch_size=8, num_workers=0).setup("fit")
    (out / "train-000000_stats.json").rename(tmp_path / "stats.json")
    with pytest.raises(ConfigError, match=r"train-000000\.tar has no train-000000_stats\.json, .* run the same "
                                          r"ldm-encode command again"):
        WebDataModule(train_shards=str(out / "train-*.tar"), batch_size=8, num_workers=0).setup("fit")
    with pytest.raises(ConfigError, match=r"are latent shards"):  # as ldm-encode's input: what they are, not how done
        encode({"shards": str(out / "train-*.tar"), "autoencoder_path": str(autoencoder),
                "output_dir": str(tmp_path / "again"), "progress": False})
    (tmp_path / "stats.json").rename(out / "train-000000_stats.json")
    monkeypatch.setattr(encoding, "_encode_batch", encode_batch)
    summary = run_encode(shapes_shards, autoencoder, out)
    assert summary["shards_finished_before"] == 1 and summary["shards_encoded"] == 3
    assert len(read_shard(out / "train-000001.tar")) == 16


def test_a_second_encode_into_the_output_dir_is_refused_until_the_first_is_gone(
        shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Two encodes into one output_dir removed each other's temp files as an interrupted run's (one stopped with a
    FileNotFoundError): the second is refused, naming the first; a lock its killed holder left is taken over."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    autoencoder, _ = encoders
    out = tmp_path / "latents"
    out.mkdir()
    holder = {"pid": 1, "host": socket.gethostname(), "started": "2026-01-01 00:00:00"}  # pid 1: alive
    (out / "encode.lock").write_text(json.dumps(holder))
    with pytest.raises(RunDirectoryLocked, match=rf"output_dir={out} is in use by another ldm-encode \(pid 1 "):
        run_encode(shapes_shards, autoencoder, out)
    assert [p.name for p in out.iterdir()] == ["encode.lock"]
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "encode.lock").write_text(json.dumps({**holder, "pid": int(finished.stdout)}))  # its process is gone
    assert run_encode(shapes_shards, autoencoder, out)["shards_encoded"] == 4
    assert not (out / "encode.lock").exists()


def test_rewritten_inputs_are_encoded_again_and_damaged_or_vanished_ones_are_named(
        shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Resuming compares each input's size and modification time, not only its path: shards rewritten since (other
    data under the same names) are encoded again. A truncated input shard is reported with the samples it lost,
    and latent shards whose inputs are gone are named (a training glob would still read them)."""
    autoencoder, _ = encoders
    data, out = tmp_path / "data", tmp_path / "latents"
    shutil.copytree(shapes_shards, data)
    run_encode(data, autoencoder, out)
    first, zero = read_shard(out / "train-000001.tar"), [s["__key__"] for s in read_shard(out / "train-000000.tar")]
    # Shard 1 rewritten with shard 0's samples; shard 2 cut where sample 8's caption begins (summary.json still says
    # 16: sample 8 kept its image, and was encoded without its caption); shard 3 deleted.
    shutil.copy(data / "train-000000.tar", data / "train-000001.tar")
    damaged = (data / "train-000002.tar").read_bytes()
    with tarfile.open(data / "train-000002.tar") as tar:
        cut_at = [member.offset for member in tar if member.name.endswith(".txt")][8]
    (data / "train-000002.tar").write_bytes(damaged[:cut_at])
    (data / "train-000003.tar").unlink()
    # shard 0 cut inside the image of its second-to-last sample: the read errors (two for one cut) were counted as
    # lost samples, 17 of 16 in all, and the damage against the count went unreported
    damaged = (data / "train-000000.tar").read_bytes()
    with tarfile.open(data / "train-000000.tar") as tar:
        cut_at = [member.offset_data for member in tar if member.name.endswith(".png")][14] + 100
    (data / "train-000000.tar").write_bytes(damaged[:cut_at])

    with caplog.at_level("WARNING"):
        summary = run_encode(data, autoencoder, out)
    assert summary["shards_finished_before"] == 0 and summary["shards_encoded"] == 3
    stats = json.loads((out / "train-000000_stats.json").read_text())
    assert stats["successes"] == 14 and stats["failed"] == 2
    # cut inside its first sample's first member (the header count says 0): the sample was lost unnamed
    with tarfile.open(fileobj=io.BytesIO(damaged)) as tar:
        opening = next(iter(tar))
    (tmp_path / "first.tar").write_bytes(damaged[:opening.offset_data + 20])
    skipped: list[list[str]] = []
    assert list(encoding._images(str(tmp_path / "first.tar"), 32, skipped)) == []
    assert [key for key, _ in skipped if key != "?"] == [opening.name.partition(".")[0]]
    assert "damaged tar: the shard ends after 15 samples but its count says 16" in stats["skipped"][-1][1]
    again = read_shard(out / "train-000001.tar")
    assert [s["__key__"] for s in again] == zero
    assert [s["__key__"] for s in again] != [s["__key__"] for s in first]
    stats = json.loads((out / "train-000002_stats.json").read_text())
    assert stats["successes"] == 8 and stats["failed"] == 8
    assert "ends early (cut short, or a damaged member header: what follows is lost): its last sample" in \
        stats["skipped"][0][1]
    assert "damaged tar: the shard ends after" in stats["skipped"][-1][1]
    assert all("txt" in sample for sample in read_shard(out / "train-000002.tar"))
    assert "whose input shards no longer exist (train-000003.tar)" in caplog.text


def test_an_intact_shard_with_a_stale_count_is_encoded_whole_and_its_count_named(
        shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """summary.json says 20 (or 10) where the intact tar holds 16: not a damaged tar to rewrite with ldm-data (the
    advice given), every sample is encoded and the stale count named."""
    autoencoder, _ = encoders
    data = tmp_path / "data"
    shutil.copytree(shapes_shards, data)
    summary = json.loads((data / "summary.json").read_text())
    summary["splits"]["train"]["shard_counts"][:2] = [20, 10]  # (too low: it was not named)
    (data / "summary.json").write_text(json.dumps(summary))
    with caplog.at_level("WARNING"):
        run_encode(data, autoencoder, tmp_path / "latents")
    stats = json.loads((tmp_path / "latents" / "train-000000_stats.json").read_text())
    assert (stats["successes"], stats["failed"], stats["skipped"]) == (16, 0, [])
    assert "train-000000.tar holds 16 samples but its recorded count says 20: the count is out of date" in caplog.text
    assert "train-000001.tar holds 16 samples but its recorded count says 10: the count is out of date" in caplog.text


def test_another_autoencoder_into_the_same_output_dir_fails_naming_both(shapes_shards: Path,
                                                                        encoders: tuple[Path, Path], tmp_path: Path):
    autoencoder, text = encoders
    out = tmp_path / "latents"
    run_encode(shapes_shards, autoencoder, out)
    copy = shutil.copytree(autoencoder, tmp_path / "copy")  # the same weights by another path: the run resumes
    assert run_encode(shapes_shards, copy, out)["shards_finished_before"] == 4
    other, _ = load_autoencoder(autoencoder)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.01)  # one changed value is another autoencoder
    other_dir = other.save_pretrained(tmp_path / "other", latent_stats={"scale_factor": 0.8})
    ours, theirs = latents.weights_hash(load_autoencoder(autoencoder)[0]), latents.weights_hash(other)
    assert ours != theirs
    with pytest.raises(ConfigError, match=f"(?s)output_dir=.*{ours}.*{theirs}.*overwrite=true"):
        run_encode(shapes_shards, other_dir, out)
    summary = run_encode(shapes_shards, other_dir, out, overwrite=True)
    assert summary["shards_encoded"] == 4
    # another text encoder (here: none) is named by its own hash, not the unchanged autoencoder's
    run_encode(shapes_shards, other_dir, tmp_path / "text", text_encoder={"kind": "byte", "name_or_path": str(text)})
    stored = latents.read_manifest(tmp_path / "text" / latents.MANIFEST_NAME).text_encoder["sha256"]
    with pytest.raises(ConfigError, match=rf"text_encoder: sha256 {stored} \{{'kind': 'byte', .*\}} there, "
                                          rf"None now\): choose another"):
        run_encode(shapes_shards, other_dir, tmp_path / "text")
    # the model's settings in the node (pooled, cond_drop_prob) do not change the stored arrays: the run resumes
    node = {"kind": "byte", "name_or_path": str(text), "pooled": True, "cond_drop_prob": 0.3}
    assert run_encode(shapes_shards, other_dir, tmp_path / "text", text_encoder=node)["shards_finished_before"] == 4
    assert latents.read_manifest(out / latents.MANIFEST_NAME).autoencoder["sha256"] == theirs


def test_manifest_check_names_both_autoencoder_hashes(shapes_shards: Path, encoders: tuple[Path, Path],
                                                      tmp_path: Path):
    autoencoder, _ = encoders
    run_encode(shapes_shards, autoencoder, tmp_path / "latents")
    manifest = latents.read_manifest(tmp_path / "latents" / latents.MANIFEST_NAME)
    ae, _ = load_autoencoder(autoencoder)
    latents.check_manifest(manifest, latents.weights_hash(ae), str(autoencoder))  # the same one passes
    half = copy.deepcopy(ae).half()  # weights held in fp16 hash as their float32 values: loading them either way
    assert latents.weights_hash(half) == latents.weights_hash(copy.deepcopy(half).float())  # gives one hash
    with torch.no_grad():
        ae.encoder.conv_in.weight[0, 0, 0, 0] += 1.0
    mine = latents.weights_hash(ae)
    with pytest.raises(ConfigError, match=f"{manifest.autoencoder['sha256']}.*model.autoencoder_path=/x/ae.*{mine}"):
        latents.check_manifest(manifest, mine, "/x/ae")


def test_bad_options_fail_naming_the_key(shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    autoencoder, text = encoders
    with pytest.raises(ConfigError, match="output_dir is required"):
        encode({"shards": str(shapes_shards / "train-*.tar"), "autoencoder_path": str(autoencoder)})
    with pytest.raises(FileNotFoundError, match="shards="):
        run_encode(tmp_path / "nowhere", autoencoder, tmp_path / "out")
    with pytest.raises(ConfigError, match="frozen pretrained text encoder"):
        run_encode(shapes_shards, autoencoder, tmp_path / "out", text_encoder={"kind": "byte", "width": 16,
                                                                              "num_heads": 2})
    with pytest.raises(ConfigError, match=r"text_encoder\.kind=class is not a text encoder"):
        run_encode(shapes_shards, autoencoder, tmp_path / "out", text_encoder={"kind": "class"})
    with pytest.raises(ConfigError, match="resolution=30 is not divisible"):
        run_encode(shapes_shards, autoencoder, tmp_path / "out", resolution=30)
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder behind
    with pytest.raises(ConfigError, match="resolution=-8 must be >= 1"):
        run_encode(shapes_shards, autoencoder, tmp_path / "out", resolution=-8)
    twice = {"shards": f"{shapes_shards}/train-*.tar::{shapes_shards}/../{shapes_shards.name}/train-00000[01].tar",
             "autoencoder_path": str(autoencoder), "output_dir": str(tmp_path / "out")}  # each name once, counted
    with pytest.raises(ConfigError, match=r"shards: .*/train-000000\.tar and .*/\.\./shapes_shards0/train-000000\.tar "
                                          r"are the same file, by '.*/train-\*\.tar' and by "
                                          r"'.*/\.\./shapes_shards0/train-00000\[01\]\.tar': its samples would be "
                                          r"read twice an epoch; name each shard once$"):
        encode(twice)
    other = tmp_path / "other"  # the same names in two folders, and (below) a .tar and a .tar.gz in one folder
    shutil.copytree(shapes_shards, other)
    with pytest.raises(ConfigError, match=r"4 output names are .*; encode each folder into its own output_dir$"):
        encode({**twice, "shards": f"{shapes_shards}/train-*.tar::{other}/train-*.tar"})
    (other / "train-000000.tar.gz").write_bytes(gzip.compress((other / "train-000000.tar").read_bytes()))
    with pytest.raises(ConfigError, match=r"1 output name is .*; rename or leave out one of the shards whose names "
                                          r"differ only in the tar suffix$"):
        encode({**twice, "shards": f"{other}/train-00000[0].tar*"})
    with pytest.raises(ConfigError, match=r"1 output name is .*; rename or leave out one of the shards whose names "
                                          r"differ only in the tar suffix; encode each folder into its own "
                                          r"output_dir$"):
        encode({**twice, "shards": f"{other}/train-00000[0].tar*::{shapes_shards}/train-00000[01].tar"})
    in_place = tmp_path / "in_place"
    shutil.copytree(shapes_shards, in_place)
    before = (in_place / "train-000000.tar").read_bytes()
    with pytest.raises(ConfigError, match=r"output_dir=.*in_place holds the input shards themselves"):
        run_encode(in_place, autoencoder, in_place)
    assert (in_place / "train-000000.tar").read_bytes() == before
    # another folder of image shards: its manifest.json made every reader take those images for latents
    images = tmp_path / "other_images"
    shutil.copytree(shapes_shards, images)
    (images / "train-000000.tar").unlink()
    with pytest.raises(ConfigError, match=r"output_dir=.*other_images holds image shards \(summary\.json\): a "
                                          r"manifest\.json beside them would"):
        run_encode(shapes_shards, autoencoder, images)
    assert not (images / "manifest.json").exists()
    # img2dataset's: its NAME_stats.json were taken for latents' and overwrite=true deleted the images
    (images / "summary.json").unlink()
    (images / "00000.tar").write_bytes(before)
    (images / "00000_stats.json").write_text('{"successes": 16}')
    for overwrite in (False, True):
        with pytest.raises(ConfigError, match=r"other_images holds image shards \(00000\.tar\)"):
            run_encode(shapes_shards, autoencoder, images, overwrite=overwrite)
    assert (images / "00000.tar").read_bytes() == before and (images / "00000_stats.json").exists()
    # latents given as input: every sample was dropped, empty shards were written and marked finished (exit 0)
    run_encode(shapes_shards, autoencoder, tmp_path / "latents")
    with pytest.raises(ConfigError, match=r"are latent shards \(written by ldm-encode: .*manifest\.json\); ldm-encode "
                                          r"reads image shards"):
        run_encode(tmp_path / "latents", autoencoder, tmp_path / "again")
    assert not (tmp_path / "again").exists()
    splits = [re.escape(pasteable({"shards": f"{shapes_shards}/{split}-*.tar"})) for split in ("train", "val")]
    with pytest.raises(ConfigError, match=rf"^shards={re.escape(repr(str(shapes_shards)))} is a folder, which holds "
                                          rf"one or two splits of shards: name the split's shards, {splits[0]} or "
                                          rf"{splits[1]}$"):  # (train-*.tar was taken)
        encode({"shards": str(shapes_shards), "autoencoder_path": str(autoencoder), "output_dir": str(tmp_path / "f")})
    with pytest.raises(ConfigError, match=rf"^shards='.*::{shapes_shards}' \(its item '{shapes_shards}'\) is a folder"):
        encode({"shards": f"{shapes_shards}/val-*.tar::{shapes_shards}", "autoencoder_path": str(autoencoder),
                "output_dir": str(tmp_path / "f")})
    img2dataset = tmp_path / "img2dataset"  # its names: the pattern that takes them
    img2dataset.mkdir()
    shutil.copy(shapes_shards / "train-000000.tar", img2dataset / "00000.tar")
    example = re.escape(pasteable({"shards": f"{img2dataset}/*.tar"}))
    with pytest.raises(ConfigError, match=rf"is a folder: name its tar shards, e.g. {example}$"):
        encode({"shards": str(img2dataset), "autoencoder_path": str(autoencoder), "output_dir": str(tmp_path / "f")})
    # ... and ldm-data into a folder of latents: its manifest.json stayed, and the image shards were read as latents
    with pytest.raises(ConfigError, match=r"output_dir=.*latents holds latent shards \(written by ldm-encode"):
        write_dataset({"source": "shapes", "output_dir": str(tmp_path / "latents"), "num_samples": 4,
                       "val_samples": 0, "overwrite": True})


def test_a_caption_training_could_not_read_is_left_out_not_fatal(shapes_shards: Path, encoders: tuple[Path, Path],
                                                                 tmp_path: Path):
    """A non-UTF-8 caption or damaged metadata (training skips such a sample) is left out and listed, with a text
    encoder too."""
    autoencoder, text = encoders
    source = tmp_path / "in"
    source.mkdir()
    samples = read_shard(shapes_shards / "train-000000.tar")
    samples[2]["txt"] = b"\xff\xfe not utf-8"
    samples[5]["json"] = b"{bad json"  # was encoded (its caption is in .txt), then skipped by training every epoch
    with wds.TarWriter(str(source / "train-000000.tar"), encoder=False) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")})
    text_encoder = {"kind": "byte", "name_or_path": str(text)}
    summary = run_encode(source, autoencoder, tmp_path / "out", text_encoder=text_encoder)
    assert summary["samples"] == len(samples) - 2 and summary["failed"] == 2  # counted, the run goes on
    stats = json.loads(next((tmp_path / "out").glob("*_stats.json")).read_text())
    assert stats["skipped"][0][0] == samples[2]["__key__"] and "UnicodeDecodeError" in stats["skipped"][0][1]
    assert stats["skipped"][1][0] == samples[5]["__key__"] and "JSONDecodeError" in stats["skipped"][1][1]


def test_console_script_reads_a_text_encoder_node(shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    autoencoder, text = encoders
    out = tmp_path / "latents"
    script = Path(sys.executable).parent / "ldm-encode"
    result = subprocess.run(
        [str(script), f"shards='{shapes_shards}/train-00000[01].tar'", f"autoencoder_path={autoencoder}",
         f"output_dir={out}", f"text_encoder={{kind: byte, name_or_path: {text}}}", "progress=false",
         "extra={run: first}"],  # as the README writes the notes, without Hydra's +
        cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "32 samples in 2 shards" in result.stdout + result.stderr
    manifest = latents.read_manifest(out / latents.MANIFEST_NAME)
    assert manifest.text_encoder["config"]["name_or_path"] == str(text) and manifest.data["extra"] == {"run": "first"}


def test_two_processes_encode_their_own_shards(shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    autoencoder, text = encoders
    out, single = tmp_path / "two", tmp_path / "one"
    text_node = {"kind": "byte", "name_or_path": str(text)}
    summary = run_encode(shapes_shards, autoencoder, out, text_encoder=text_node, devices=2, accelerator="cpu")
    assert summary["shards_encoded"] == 4 and summary["samples"] == 64
    run_encode(shapes_shards, autoencoder, single, text_encoder=text_node)
    for name in ("train-000000.tar", "train-000003.tar"):  # the same arrays from either process layout
        a, b = read_shard(out / name), read_shard(single / name)
        assert [x["__key__"] for x in a] == [y["__key__"] for y in b]
        for x, y in zip(a, b):
            for member in (latents.MOMENTS, latents.CONTEXT):
                np.testing.assert_allclose(latents.from_npy(x[member]).astype(np.float32),
                                           latents.from_npy(y[member]).astype(np.float32), rtol=2e-3, atol=2e-3)


def test_an_error_in_one_of_several_processes_is_told_as_in_one(shapes_shards: Path, encoders: tuple[Path, Path],
                                                                  tmp_path: Path):
    """A write that fails in a spawned process (here a file size limit, as a full disk) stops ldm-encode devices=2
    with that error in one line, as one process tells it (it was a page of the child's traceback in one line)."""
    autoencoder, _ = encoders
    script = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              f"resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192)); "
              f"sys.argv = ['ldm-encode', \"shards={shapes_shards}/train-*.tar\", 'autoencoder_path={autoencoder}', "
              f"'output_dir={tmp_path / 'out'}', 'progress=false', 'accelerator=cpu', 'devices=2']; "
              f"from ldm.cli.encode import main; main()")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=cli_env({"OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ldm-encode: error: OSError: [Errno 27] File too large" in done.stderr
    assert "Traceback" not in done.stderr and "process 0 failed" not in done.stderr


@pytest.mark.slow  # (two ranks of one launch: test_two_processes_encode_their_own_shards)
def test_torchrun_style_ranks_split_the_shards(shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    autoencoder, _ = encoders
    out = tmp_path / "latents"
    args = [sys.executable, "-m", "ldm.cli.encode", f"shards='{shapes_shards}/train-*.tar'",
            f"autoencoder_path={autoencoder}", f"output_dir={out}", "progress=false", "accelerator=cpu"]
    ranks = [subprocess.Popen(args, cwd=REPO, env=cli_env({"RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                                           "OMP_NUM_THREADS": "1"}),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    logs = [p.communicate(timeout=300)[0] for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], logs
    assert "32 samples in 2 shards" in logs[0] and "rank 0 of 2" in logs[0]  # shards 0 and 2
    assert "32 samples in 2 shards" in logs[1] and "rank 1 of 2" in logs[1]  # shards 1 and 3
    assert sorted(p.name for p in out.glob("*_stats.json")) == [f"train-00000{i}_stats.json" for i in range(4)]
    assert latents.read_manifest(out / latents.MANIFEST_NAME).autoencoder["path"] == str(autoencoder)

    # Shards without a manifest: rank 0 refuses, and so does rank 1 at once, instead of waiting 10 minutes for the
    # manifest rank 0 will never write (srun, or torchrun on another node, would not stop it).
    (out / latents.MANIFEST_NAME).unlink()
    lone = subprocess.run(args, cwd=REPO, env=cli_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                       "OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=120)
    assert lone.returncode == 2 and "but no manifest.json" in lone.stderr, lone.stderr[-2000:]


def test_npy_members_read_like_np_load_and_refuse_what_it_refuses():
    arrays = [np.random.rand(8, 16, 16).astype(np.float16), np.asfortranarray(np.random.rand(3, 5)),
              np.arange(7, dtype=np.int64), np.float32(2.5) * np.ones((), np.float32)]
    for array in arrays:
        for version in ((1, 0), (2, 0)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, array, version=version)
            for _ in range(2):  # parsed, then from the header cache
                got = latents.from_npy(buf.getvalue())
                want = np.load(io.BytesIO(buf.getvalue()), allow_pickle=False)
                assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
    data = latents.to_npy(arrays[0])
    with pytest.raises(ValueError, match="data bytes for an array of shape"):
        latents.from_npy(data[:-2])  # a truncated member, after its header was cached
    with pytest.raises(ValueError):
        latents.from_npy(b"\x93NUMPY garbage")
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="object arrays"):
        latents.from_npy(buf.getvalue())


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGKILL"])
def test_a_killed_multiprocess_encode_stops_its_processes(signum: str, encoders: tuple[Path, Path], tmp_path: Path):
    """`kill PID` of `ldm-encode devices=2` left both encoding processes running on, orphaned, racing a rerun; now
    they stop with it (SIGTERM: the parent stops them; SIGKILL: they see it gone), and the rerun encodes what is
    left."""
    import signal
    import time

    from ldm.cli.data import write_dataset

    shards = tmp_path / "shards"
    write_dataset({"source": "shapes", "output_dir": str(shards), "num_samples": 1920, "val_samples": 0,
                   "resolution": 32, "seed": 0, "samples_per_shard": 16})
    out = tmp_path / "latents"
    command = [sys.executable, "-m", "ldm.cli.encode", f"shards={shards}/train-*.tar",
               f"autoencoder_path={encoders[0]}", f"output_dir={out}", "devices=2", "accelerator=cpu",
               "progress=false", "batch_size=8"]
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while len(list(out.glob("*_stats.json"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    workers = [pid for pid in _children(process.pid) if b"spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert process.poll() is None and len(workers) == 2, "the test needs both processes still encoding"
    process.send_signal(getattr(signal, signum))
    assert process.wait(timeout=60) == (128 + signal.SIGTERM if signum == "SIGTERM" else -signal.SIGKILL)
    time.sleep(3)
    alive = [pid for pid in workers if Path(f"/proc/{pid}").exists()
             and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert alive == []
    finished = len(list(out.glob("*_stats.json")))
    assert 2 <= finished < 120
    summary = run_encode(shards, encoders[0], out)
    assert summary["shards_encoded"] == 120 - finished and len(list(out.glob("train-*.tar"))) == 120


def test_shards_without_a_manifest_are_never_taken_for_this_encoders(shapes_shards: Path,
                                                                     encoders: tuple[Path, Path], tmp_path: Path):
    """A manifest lost (deleted, a partial copy): the shards could be any encoder's. Without overwrite the folder is
    refused; with it every shard is encoded again (they were kept and labelled with the new autoencoder)."""
    autoencoder, _ = encoders
    out = tmp_path / "latents"
    run_encode(shapes_shards, autoencoder, out, extra={"note": "first"})
    before = (out / "train-000000.tar").read_bytes()
    (out / latents.MANIFEST_NAME).unlink()
    with pytest.raises(ConfigError, match=r"no manifest.json.*overwrite=true"):
        run_encode(shapes_shards, autoencoder, out)
    other, _ = load_autoencoder(autoencoder)
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.01)
        other.encoder.conv_out.bias.add_(0.5)
    other_dir = other.save_pretrained(tmp_path / "other", latent_stats={"scale_factor": 0.8})
    summary = run_encode(shapes_shards, other_dir, out, overwrite=True)
    assert summary["shards_encoded"] == 4 and summary["shards_finished_before"] == 0
    assert (out / "train-000000.tar").read_bytes() != before

    (out / latents.MANIFEST_NAME).write_text('{"format": "ldm-latents", "autoenc')  # a copy cut short
    with pytest.raises(ConfigError, match=r"output_dir: cannot read the latent manifest .*overwrite=true"):
        run_encode(shapes_shards, other_dir, out)


def test_resume_by_another_spelling_of_the_paths_keeps_finished_shards_and_merges_notes(
        shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    autoencoder, _ = encoders
    out = tmp_path / "latents"
    monkeypatch.chdir(shapes_shards.parent)
    relative = Path(shapes_shards.name)
    assert run_encode(relative, autoencoder, out, extra={"a": 1})["shards_encoded"] == 4
    summary = run_encode(shapes_shards.resolve(), autoencoder, out, extra={"b": 2})
    assert summary["shards_encoded"] == 0 and summary["shards_finished_before"] == 4
    manifest = json.loads((out / latents.MANIFEST_NAME).read_text())
    assert manifest["extra"] == {"a": 1, "b": 2}
    assert manifest["inputs"]["train-000000.tar"] == str((shapes_shards / "train-000000.tar").resolve())


def test_another_folder_of_the_same_shard_names_is_refused_not_encoded_over(
        shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    """A second folder whose shards have the first one's names, encoded into the same output_dir, replaced the first
    folder's latents without a word (the manifest's inputs rewritten too), also under torchrun, where only rank 0
    refused; a shard whose recorded input is gone (a moved folder) is encoded again as before, and a copy with the
    input's size and modification time (`cp -a` to local scratch) is the same input."""
    autoencoder, _ = encoders
    out, other = tmp_path / "latents", shutil.copytree(shapes_shards, tmp_path / "other")  # (copy2: times kept)
    run_encode(shapes_shards, autoencoder, out)
    assert run_encode(other, autoencoder, out)["shards_encoded"] == 4  # a copy: encoded again, not refused
    run_encode(shapes_shards, autoencoder, out)
    for shard in other.glob("*.tar"):
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))  # other data, same names
    before = (out / "train-000000.tar").read_bytes()
    refused = (r"output_dir=.*latents: train-000000\.tar holds the latents of .*/train-000000\.tar, which this run "
               r"would replace with those of .*other/train-000000\.tar \(4 such shards; .*encode each folder into its "
               r"own output_dir")
    with pytest.raises(ConfigError, match=refused):
        run_encode(other, autoencoder, out)
    with pytest.raises(ConfigError, match=refused):  # rank 1 of torchrun's 2 (rank 0 would have refused first)
        with pytest.MonkeyPatch.context() as env:
            for key, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
                env.setenv(key, value)
            run_encode(other, autoencoder, out)
    assert (out / "train-000000.tar").read_bytes() == before
    moved = shapes_shards.rename(tmp_path / "moved")
    try:
        assert run_encode(other, autoencoder, out)["shards_encoded"] == 4
    finally:
        moved.rename(shapes_shards)
    manifest = json.loads((out / latents.MANIFEST_NAME).read_text())
    assert manifest["inputs"]["train-000000.tar"] == str((other / "train-000000.tar").resolve())


def test_another_latent_scale_of_the_same_weights_resumes_and_other_settings_are_named(
        shapes_shards: Path, encoders: tuple[Path, Path], tmp_path: Path):
    """The moments are stored unscaled: re-measured latent statistics (the same weights at another scale) resume
    the encode, and the manifest records the scale as it is now. A setting that differs for the same weights is
    named, not the two equal hashes."""
    autoencoder, text = encoders
    out = tmp_path / "latents"
    run_encode(shapes_shards, autoencoder, out)
    rescaled = shutil.copytree(autoencoder, tmp_path / "rescaled")
    (rescaled / "latent_stats.json").write_text(json.dumps({"scale_factor": 0.7, "global_std": 1.43}))
    assert run_encode(shapes_shards, rescaled, out)["shards_finished_before"] == 4
    recorded = json.loads((out / latents.MANIFEST_NAME).read_text())["autoencoder"]
    assert (recorded["latent_scale"], recorded["path"]) == (0.7, str(rescaled.resolve()))  # the scale's own path
    node = {"kind": "byte", "name_or_path": str(text)}
    run_encode(shapes_shards, autoencoder, tmp_path / "text", text_encoder=node)
    with pytest.raises(ConfigError, match=r"\(text_encoder\.dtype: 'float16' there, 'float32' now\): choose another"):
        run_encode(shapes_shards, autoencoder, tmp_path / "text", text_encoder=node, text_dtype="float32")


def test_gzipped_input_shards_give_plain_tars_named_as_such(shapes_shards: Path, encoders: tuple[Path, Path],
                                                            tmp_path: Path):
    """`NAME.tar.gz` inputs: the latent shard (a plain tar) is `NAME.tar`; the run resumes, and overwrite=true
    deletes it (its stats named a `NAME.tar.gz.tar`)."""
    autoencoder, _ = encoders
    gz = tmp_path / "gz"
    gz.mkdir()
    for shard in sorted(shapes_shards.glob("train-00000[01].tar")):
        (gz / f"{shard.name}.gz").write_bytes(gzip.compress(shard.read_bytes()))
    out = tmp_path / "latents"
    options = {"autoencoder_path": str(autoencoder), "output_dir": str(out), "progress": False}
    assert encode({"shards": str(gz / "train-*.tar.gz"), **options})["shards_encoded"] == 2
    written = sorted(p.name for p in out.iterdir())
    assert written == ["manifest.json", "train-000000.tar", "train-000000_stats.json", "train-000001.tar",
                       "train-000001_stats.json"]
    assert latents.holds_latents(out / "train-000000.tar")
    inputs = json.loads((out / latents.MANIFEST_NAME).read_text())["inputs"]
    assert inputs["train-000000.tar"] == str((gz / "train-000000.tar.gz").resolve())
    assert encode({"shards": str(gz / "train-*.tar.gz"), **options})["shards_finished_before"] == 2
    encode({"shards": str(shapes_shards / "train-00000[23].tar"), **options, "overwrite": True})
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train-000002.tar", "train-000002_stats.json",
                                                      "train-000003.tar", "train-000003_stats.json"]


def test_an_overflow_to_float16_names_the_encoder_at_fault(encoders: tuple[Path, Path]):
    """Moments are stored in float16 whatever text_dtype says: their overflow names the autoencoder, a text
    encoding's the text encoder and text_dtype=float32 (both were told to try text_dtype)."""
    autoencoder_path, text_path = encoders
    config = encoding.EncodeConfig(shards="unused", autoencoder_path=str(autoencoder_path), output_dir="unused",
                                   text_encoder={"kind": "byte", "name_or_path": str(text_path)})
    enc = encoding.load_encoders(config, torch.device("cpu"))
    sample, image = {"__key__": "k0", "txt": b"a red circle"}, torch.zeros(3, 32, 32)
    with torch.no_grad():
        enc.autoencoder.quant_conv.bias[:4].fill_(1e5)  # the posterior means
        with pytest.raises(ValueError, match=r"k0, moments\.npy: non-finite values after casting to float16 .*; its "
                                             r"latents exceed float16's range \(65504\): check the autoencoder$"):
            encoding._encode_batch([sample], [image], enc, False, "float16", torch.device("cpu"))
        enc.autoencoder.quant_conv.bias[:4].zero_()
        enc.text.norm.bias.fill_(1e5)  # every token state
        with pytest.raises(ValueError, match=r"k0, context\.npy: .*check the text encoder, or store its outputs "
                                             r"with text_dtype=float32$"):
            encoding._encode_batch([sample], [image], enc, False, "float16", torch.device("cpu"))
        assert encoding._encode_batch([sample], [image], enc, False, "float32", torch.device("cpu"))
        enc.text.norm.bias.fill_(float("nan"))  # not an overflow: no dtype can help
        with pytest.raises(ValueError, match=r"k0, context\.npy: the text encoder outputs inf or NaN; check it$"):
            encoding._encode_batch([sample], [image], enc, False, "float32", torch.device("cpu"))
