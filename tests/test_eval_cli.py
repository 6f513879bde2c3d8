"""The checkpoint evaluator: sweeps and their protocol rows, 1 vs 2 processes, autoencoders, the ldm-eval CLI.

Tiny random checkpoints (16 px LDM and autoencoder) and random-weight Inception / CLIP built locally; the Inception
features are its 64-dim layer, for speed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_eval_helpers import (
    OracleGenerator,
    random_inception_weights,
    save_checkpoint,
    tiny_autoencoder_module,
    tiny_clip,
    tiny_ldm_checkpoint,
)

from ldm.checkpoints import MissingCheckpointError
from ldm.config import ConfigError
from ldm.data.shardlist import local_shards
from ldm.eval.evaluator import EvalConfig, Evaluator, evaluate
from ldm.eval.feature_extractors import WeightsNotFoundError
from ldm.eval.results import read_results
from ldm.eval.sources import READER_VERSION, generation_labels, row_shards, shard_fingerprint, shard_labels

PROTOCOL_FIELDS = ("checkpoint", "checkpoint_kind", "checkpoint_step", "weights", "sampler", "num_steps",
                   "guidance_scale", "num_samples", "resolution", "seed", "seed_rule", "world_size", "prompts_source",
                   "prompts", "prompts_sha256", "reference_stats", "reference_hash", "reference_num_samples",
                   "reference_shards", "feature_extractor", "clip_model", "kid_subsets", "ldm_version", "timestamp")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory, shapes_shards: Path) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eval_assets")
    return {"inception": str(random_inception_weights(root / "inception.pt")), "clip": str(tiny_clip(root / "clip")),
            "ldm": str(tiny_ldm_checkpoint(root / "ldm")), "shards": str(shapes_shards), "cache": str(root / "cache")}


def make_cfg(assets: dict[str, str], output_dir: Path, **overrides) -> dict:
    cfg = {"ckpt_path": assets["ldm"], "output_dir": str(output_dir), "num_samples": 8, "batch_size": 4,
           "samplers": ["ddim"], "num_steps": [2], "guidance_scales": [2.0],
           "metrics": ["fid", "shapes_color_accuracy"],
           "val_shards": assets["shards"], "cache_dir": assets["cache"], "feature_dim": 64,
           "feature_extractor_weights_path": assets["inception"], "clip_model": assets["clip"], "device": "cpu"}
    cfg.update(overrides)
    return cfg


def test_sweep_over_two_guidance_scales_appends_two_rows_with_the_full_protocol(assets, tmp_path: Path,
                                                                               capsys: pytest.CaptureFixture):
    out = tmp_path / "eval"
    cfg = make_cfg(assets, out, guidance_scales=[1.0, 3.0], kid_subset_size=4, kid_subsets=5,
                   metrics=["fid", "kid", "clip_score", "shapes_color_accuracy"])
    rows = evaluate(cfg)
    assert [r["guidance_scale"] for r in rows] == [1.0, 3.0]
    saved = read_results(out)
    assert saved == json.loads(json.dumps(rows))
    for row in saved:
        missing = [f for f in PROTOCOL_FIELDS if f not in row]
        assert not missing, missing
        assert row["weights"] == "ema" and row["num_samples"] == 8 and row["resolution"] == 16
        assert row["checkpoint_kind"] == "latent_diffusion" and row["checkpoint_step"] == 7
        assert row["feature_extractor"]["feature_dim"] == 64 and row["feature_extractor"]["weights_sha256"]
        assert row["reference_num_samples"] == 16 and Path(row["reference_stats"]).is_file()
        assert row["fid"] > 0 and 0 <= row["clip_score"] <= 100 and 0 <= row["shapes_color_accuracy"] <= 1
        assert "kid" in row and "kid_std" in row and row["non_finite_samples"] == 0
    with open(out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and set(PROTOCOL_FIELDS) <= set(table[0])
    # A second run keeps a sweep point results.jsonl holds already (skip_done: a requeued job goes on where it
    # stopped); with skip_done=false it scores it again and appends, reusing the cached reference statistics.
    again = evaluate({**cfg, "guidance_scales": [1.0, 2.0], "metrics": ["fid"]})
    assert again[0] == saved[0] and again[1]["guidance_scale"] == 2.0 and len(read_results(out)) == 3
    ldm = Path(assets["ldm"])  # the same file by a path through "..": kept too (it was scored again)
    # (a run killed between its append to results.jsonl and the CSV's rewrite left the CSV a row short for good: a
    # rerun that scores nothing new rebuilds it)
    (out / "results.csv").write_text((out / "results.csv").read_text().splitlines(keepends=True)[0])
    evaluate({**cfg, "ckpt_path": str(ldm.parent / ".." / ldm.parent.name / ldm.name), "guidance_scales": [1.0]})
    assert len(read_results(out)) == 3
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 3
    # where the files were found is no protocol: a moved statistics cache (a job on another machine, another
    # $LDM_CACHE_DIR) and a copied CLIP folder, the same contents, kept the rows too (each point was scored again)
    cache, clip = shutil.copytree(assets["cache"], tmp_path / "cache"), shutil.copytree(assets["clip"], tmp_path / "c")
    evaluate({**cfg, "cache_dir": str(cache), "clip_model": str(clip), "guidance_scales": [1.0]})
    assert len(read_results(out)) == 3
    evaluate({**cfg, "guidance_scales": [1.0], "metrics": ["fid"], "skip_done": False})
    assert len(read_results(out)) == 4 and read_results(out)[3]["reference_hash"] == rows[0]["reference_hash"]
    capsys.readouterr()
    evaluate({**cfg, "guidance_scales": [1.0], "metrics": ["fid"], "seed": 1})  # another protocol: scored
    assert len(read_results(out)) == 5 and "scored otherwise" not in capsys.readouterr().out  # (a seed chosen)
    evaluate({**cfg, "guidance_scales": [1.0], "metrics": ["kid"], "kid_subset_size": 6})  # another KID subset size
    assert len(read_results(out)) == 6 and read_results(out)[5]["kid_subset_size_asked"] == 6
    # said, naming what differs from the closest row of this checkpoint and point (a row of older ldm, whose
    # protocol record differed, was scored again unsaid), or the metric it lacks
    assert "guidance 1: results.jsonl holds a row of it scored otherwise (kid_subset_size_asked: 4 there, 6 here" \
           in capsys.readouterr().out
    evaluate({**cfg, "guidance_scales": [3.0], "metrics": ["fid", "shapes_shape_accuracy"]})
    # (not the fields that metric's protocol adds, shapes_shape_chance, as a setting that differs)
    assert "guidance 3: results.jsonl holds a row of it scored otherwise (without shapes_shape_accuracy): scored " \
           "again" in capsys.readouterr().out
    evaluate({**cfg, "guidance_scales": [1.0], "metrics": ["fid"], "fid_antialias": True})
    # (a setting inside a dict field, named by its entry: the two dicts' shortened reprs read the same)
    assert "guidance 1: results.jsonl holds a row of it scored otherwise (feature_extractor.antialias: False there, " \
           "True here; " in capsys.readouterr().out


def test_a_clip_folder_that_does_not_load_fails_before_the_reference_statistics(assets, tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture):
    """A CLIP folder holding the model but not its processor (CLIPModel.save_pretrained alone) passed the check at
    start and failed after the reference statistics and the samples (hours at N = 50k)."""
    model_only = tmp_path / "clip_model_only"
    model_only.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(assets["clip"]) / name, model_only)
    cfg = make_cfg(assets, tmp_path / "eval", metrics=["fid", "clip_score"], clip_model=str(model_only),
                   cache_dir=str(tmp_path / "cache"))
    with pytest.raises(WeightsNotFoundError, match=r"clip_model=.*clip_model_only: the CLIP model could not be "
                                                   r"loaded .*holding the model and its processor"):
        evaluate(cfg)
    assert "reference statistics" not in capsys.readouterr().out


def test_reference_statistics_are_kept_per_resolution(assets, tmp_path: Path):
    """One ldm-eval over checkpoints of two image sizes: each scored against references at its own size."""
    evaluator = Evaluator(EvalConfig(**make_cfg(assets, tmp_path / "eval")))
    small, large = (evaluator.reference(local_shards(assets["shards"]), size, None) for size in (16, 32))
    assert (small.key["resolution"], large.key["resolution"]) == (16, 32)
    assert evaluator.reference(local_shards(assets["shards"]), 16, None) is small  # (kept for the next row)


def test_rows_record_the_seed_and_the_hash_of_the_prompts_used(assets, tmp_path: Path):
    """A row names the protocol it was scored under: the seed given, the sweep point, and the SHA-256 (first 16 hex
    digits) of the N prompts used, one a line; a prompt file whose text changed under the same name is another
    protocol, so skip_done scores it again."""
    out, prompts = tmp_path / "eval", tmp_path / "prompts.txt"
    lines = ["a large red circle in the center on a white background",
             "a large blue square in the center on a black background"]
    prompts.write_text("\n".join(lines) + "\n")
    cfg = make_cfg(assets, out, seed=3, prompts_source="file", prompts_file=str(prompts),
                   metrics=["shapes_color_accuracy"])

    def digest(used: list[str]) -> str:
        return hashlib.sha256("\n".join(used).encode()).hexdigest()[:16]

    row = evaluate(cfg)[0]
    assert (row["seed"], row["sampler"], row["num_steps"], row["guidance_scale"], row["num_samples"]) == \
        (3, "ddim", 2, 2.0, 8)
    assert row["prompts_sha256"] == digest(lines * 4) and row["prompts"] == str(prompts)
    assert evaluate(cfg)[0] == read_results(out)[0] and len(read_results(out)) == 1  # the same protocol: kept
    prompts.write_text(lines[1] + "\n")
    assert evaluate(cfg)[0]["prompts_sha256"] == digest([lines[1]] * 8) and len(read_results(out)) == 2


def test_evaluator_scores_a_perfect_generator_above_noise(assets, tmp_path: Path):
    """An oracle that draws each caption exactly: colour accuracy 1 and small FID; noise: chance and large FID."""
    cfg = EvalConfig(**{**make_cfg(assets, tmp_path, num_samples=16, batch_size=8,
                                   metrics=["fid", "shapes_color_accuracy"]), "reference_num_samples": 16})
    evaluator = Evaluator(cfg)
    info = {"checkpoint": "oracle", "checkpoint_kind": "latent_diffusion"}
    oracle = evaluator.evaluate_generation(OracleGenerator(32), info)[0]
    noise = evaluator.evaluate_generation(OracleGenerator(32, noise=True), info)[0]
    print(f"oracle: fid {oracle['fid']:.3g} color {oracle['shapes_color_accuracy']:.3f}; "
          f"noise: fid {noise['fid']:.3g} color {noise['shapes_color_accuracy']:.3f}")
    assert oracle["shapes_color_accuracy"] == 1.0 and noise["shapes_color_accuracy"] <= 0.4
    assert oracle["fid"] < 0.2 * noise["fid"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, cfg: dict, result_file: str) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rows = evaluate(cfg)
        Path(f"{result_file}.{rank}").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def test_two_process_evaluation_equals_one_process(assets, tmp_path: Path):
    """KID too: its random subsets (4 of 8 images, 20 times) pick the same images whatever the process count."""
    metrics = ["fid", "kid", "clip_score", "shapes_color_accuracy"]
    kid = {"kid_subset_size": 4, "kid_subsets": 20}
    single = evaluate(make_cfg(assets, tmp_path / "one", metrics=metrics, **kid))[0]
    cfg = make_cfg(assets, tmp_path / "two", metrics=metrics, **kid)
    # fork: the workers inherit the imported modules instead of importing torch, Lightning and transformers again
    mp.start_processes(_distributed_worker, args=(2, _free_port(), cfg, str(tmp_path / "rows")), nprocs=2,
                       join=True, start_method="fork")
    ranks = [json.loads(Path(f"{tmp_path / 'rows'}.{r}").read_text())[0] for r in range(2)]
    print(f"1 process: fid {single['fid']!r} clip {single['clip_score']!r}; "
          f"2 processes: fid {ranks[0]['fid']!r} clip {ranks[0]['clip_score']!r}")
    assert ranks[0]["world_size"] == 2 and len(read_results(tmp_path / "two")) == 1  # rank 0 alone writes
    for row in ranks:
        assert row["fid"] == pytest.approx(single["fid"], rel=1e-4, abs=1e-6)
        assert (row["kid"], row["kid_std"]) == pytest.approx((single["kid"], single["kid_std"]), rel=1e-4, abs=1e-7)
        assert row["clip_score"] == pytest.approx(single["clip_score"], rel=1e-4)
        assert row["shapes_color_accuracy"] == single["shapes_color_accuracy"]
        assert row["reference_hash"] == single["reference_hash"]


def test_reference_shards_are_the_reference_beside_val_shards(assets, tmp_path: Path):
    """val_shards gives the prompts, reference_shards the reference images when set (beside val_shards too)."""
    train = sorted(str(p) for p in Path(assets["shards"]).resolve().glob("train-*.tar"))
    row = evaluate(make_cfg(assets, tmp_path / "e", metrics=["fid"], num_samples=4,
                            reference_shards=f"{assets['shards']}/train-*.tar"))[0]
    assert (row["reference_shards"], row["reference_num_samples"]) == (train, 64)
    assert row["prompts_source"] == "val_shards"


def test_the_wandb_table_labels_rank_0s_images_with_their_global_samples(tmp_path: Path, monkeypatch):
    """Rank 0 of 2 holds samples 0, 2, 4, ...: its images are shown with those samples' seeds and prompts."""
    from ldm.eval.evaluator import WandbConfig
    from ldm.eval.results import WandbTable

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = EvalConfig(ckpt_path="x.ckpt", output_dir=str(tmp_path), wandb=WandbConfig(enabled=True, num_images=3))
    table = WandbTable(cfg)
    row = {"checkpoint": "runs/a/checkpoints/last.ckpt", "checkpoint_step": 7, "world_size": 2, "seed": 10,
           "sampler": "ddim", "num_steps": 2, "guidance_scale": 2.0}
    table.log_samples(row, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), [f"prompt {i}" for i in range(8)])
    table.finish([])
    (path,) = tmp_path.glob("wandb/offline-run-*/files/media/table/samples/a_last/ddim_2_cfg2_*.table.json")
    data = json.loads(path.read_text())["data"]
    assert [tuple(r[:5]) for r in data] == [(row["checkpoint"], 7, k, 10 + k, f"prompt {k}") for k in (0, 2, 4)]


def test_two_process_reconstruction_metrics_equal_one_process(assets, tmp_path: Path):
    """One batch of 8 images over 2 processes: dealt out as whole batches, rank 1 got none, and torchmetrics' FID
    cannot compute without an update (no row was written)."""
    ckpt = save_checkpoint(tiny_autoencoder_module(), tmp_path / "vae.ckpt", global_step=3)
    options = {"ckpt_path": str(ckpt), "batch_size": 8, "reconstruction_metrics": ["rfid", "psnr", "ssim"]}
    single = evaluate(make_cfg(assets, tmp_path / "one", **options))[0]
    cfg = make_cfg(assets, tmp_path / "two", **options)
    mp.start_processes(_distributed_worker, args=(2, _free_port(), cfg, str(tmp_path / "rows")), nprocs=2,
                       join=True, start_method="fork")
    for rank in range(2):
        row = json.loads(Path(f"{tmp_path / 'rows'}.{rank}").read_text())[0]
        assert row["num_samples"] == single["num_samples"] == 8
        for key in options["reconstruction_metrics"]:
            assert row[key] == pytest.approx(single[key], rel=1e-4), key


def test_autoencoder_checkpoint_reports_reconstruction_metrics(assets, tmp_path: Path):
    module = tiny_autoencoder_module()
    ckpt = save_checkpoint(module, tmp_path / "vae.ckpt", global_step=3)
    rows = evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), lpips_pretrained_backbone=False))
    assert len(rows) == 1
    row = rows[0]
    assert row["checkpoint_kind"] == "autoencoder" and row["checkpoint_step"] == 3
    assert row["resolution"] == 16 and row["num_samples"] == 8 and row["weights"] == "raw"
    assert row["rfid"] > 0 and 0 < row["psnr"] < 60 and -1 <= row["ssim"] <= 1 and row["lpips"] >= 0
    assert row["lpips"] is not None and row["lpips"] == row["lpips"] and row["feature_extractor"]["feature_dim"] == 64
    assert "sampler" not in row
    # the random LPIPS backbone (smoke tests) came from the global RNG: the same command gave another lpips each run
    again = evaluate(make_cfg(assets, tmp_path / "again", ckpt_path=str(ckpt), lpips_pretrained_backbone=False,
                              reconstruction_metrics=["lpips"]))[0]
    assert again["lpips"] == row["lpips"]
    # its protocol beside the value (the value overwrote it: a random backbone's number passed for LPIPS)
    assert again["lpips_model"] == {"net": "vgg", "version": "0.1", "pretrained_backbone": False,
                                    "backbone_seed": again["seed"]}
    export = module.autoencoder.save_pretrained(tmp_path / "export")  # an export is known by its weights file
    row = evaluate(make_cfg(assets, tmp_path / "e1", ckpt_path=str(export), reconstruction_metrics=["psnr"]))[0]
    assert row["weights"] == "export" and row["checkpoint_size"] == (export / "model.safetensors").stat().st_size
    # A rerun (an interrupted sweep over checkpoints, requeued) keeps the row results.jsonl holds (skip_done), as
    # for generation; it scored the point again and appended a duplicate. Another protocol is scored.
    assert evaluate(make_cfg(assets, tmp_path / "e1", ckpt_path=str(export), reconstruction_metrics=["psnr"])) == \
        read_results(tmp_path / "e1")
    for _ in range(2):  # more samples asked for than the shards hold: the row scores those there, and is kept too
        evaluate(make_cfg(assets, tmp_path / "e3", ckpt_path=str(export), reconstruction_metrics=["psnr"],
                          num_samples=1000))
    assert [(r["num_samples"], r["num_samples_asked"]) for r in read_results(tmp_path / "e3")] == [(16, 1000)]
    evaluate(make_cfg(assets, tmp_path / "e1", ckpt_path=str(export), reconstruction_metrics=["psnr"], seed=1))
    assert [r["seed"] for r in read_results(tmp_path / "e1")] == [0, 1]
    # a row of an older image reader (another crop, other captions) is not this reader's number: scored again
    results = tmp_path / "e3" / "results.jsonl"
    results.write_text(json.dumps({**read_results(tmp_path / "e3")[0], "image_reader": 3}) + "\n")
    evaluate(make_cfg(assets, tmp_path / "e3", ckpt_path=str(export), reconstruction_metrics=["psnr"],
                      num_samples=1000))
    assert [r["image_reader"] for r in read_results(tmp_path / "e3")] == [3, READER_VERSION]
    # shards rewritten in place (same paths, other images): the row's fingerprint covers their sizes and times, so it
    # is scored again
    copy = tmp_path / "copy"
    shutil.copytree(assets["shards"], copy)
    cfg = make_cfg(assets, tmp_path / "e4", ckpt_path=str(export), reconstruction_metrics=["psnr"],
                   val_shards=str(copy))
    row = evaluate(cfg)[0]
    assert row["data_shards"] == [str(p) for p in sorted(copy.resolve().glob("val-*.tar"))]
    assert re.fullmatch(r"[0-9a-f]{16}", row["data_fingerprint"])
    shard = Path(row["data_shards"][0])
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    evaluate(cfg)
    assert len(read_results(tmp_path / "e4")) == 2
    # a row of older ldm, which held the fingerprint list itself (and named every shard): the same data, kept (it
    # was scored again unsaid past 8 shards)
    older = [*read_results(tmp_path / "e4")[:1], {**read_results(tmp_path / "e4")[1],
                                                  "data_fingerprint": shard_fingerprint(row["data_shards"])}]
    (tmp_path / "e4" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in older))
    evaluate(cfg)
    assert len(read_results(tmp_path / "e4")) == 2
    # a row names at most 8 shards, the first 7 and a count beyond (one of 20,000 shards took 2.5 MB)
    assert row_shards([f"/d/{i}.tar" for i in range(20000)]) == [*(f"/d/{i}.tar" for i in range(7)),
                                                                 "... and 19993 more (20000 in all)"]
    with pytest.raises(ConfigError, match="resolution=15 is not divisible by the autoencoder's downsampling factor"):
        evaluate(make_cfg(assets, tmp_path / "e2", ckpt_path=str(ckpt), resolution=15, reconstruction_metrics=["psnr"]))
    with pytest.raises(ConfigError, match=r"lpips, which needs images of at least 16 px .* resolution is 8"):
        evaluate(make_cfg(assets, tmp_path / "e2", ckpt_path=str(ckpt), resolution=8, lpips_pretrained_backbone=False,
                          reconstruction_metrics=["psnr", "lpips"]))  # torch's "Output size is too small" before


def test_bad_config_and_missing_weights_fail_before_any_model_is_built(assets, tmp_path: Path):
    with pytest.raises(ConfigError, match="num_sample"):
        evaluate({**make_cfg(assets, tmp_path), "num_sample": 3})
    with pytest.raises(ConfigError, match=r"metrics\[\]='fd'"):
        evaluate(make_cfg(assets, tmp_path, metrics=["fd"]))
    with pytest.raises(ConfigError, match="ckpt_path is required"):
        evaluate(make_cfg(assets, tmp_path, ckpt_path=None))
    with pytest.raises(ConfigError, match=r"seed=9223372036854775807: the seeds .* must lie in \[0, 2\*\*63\)"):
        evaluate(make_cfg(assets, tmp_path, seed=2**63 - 1))
    with pytest.raises(ConfigError, match=r"seed=-1: .* choose a seed >= 0"):  # seeds are taken modulo 2**63
        evaluate(make_cfg(assets, tmp_path, seed=-1))
    with pytest.raises(ConfigError, match="prompts_file=p.txt is read only with prompts_source=file"):
        evaluate(make_cfg(assets, tmp_path, prompts_file="p.txt"))
    with pytest.raises(ConfigError, match="kid_subset_size=1 must be >= 2"):  # (was run as 2, recorded as asked 1)
        evaluate(make_cfg(assets, tmp_path, metrics=["kid"], kid_subset_size=1))
    with pytest.raises(WeightsNotFoundError, match="feature_extractor_weights_path="):
        evaluate(make_cfg(assets, tmp_path, feature_extractor_weights_path=str(tmp_path / "nowhere.pt")))
    with pytest.raises(WeightsNotFoundError, match="clip_model="):
        evaluate(make_cfg(assets, tmp_path, metrics=["clip_score"], clip_model=str(tmp_path / "no_clip")))
    assert not (tmp_path / "results.jsonl").exists()


def test_ldm_eval_cli_prints_shapes_color_accuracy_and_logs_wandb_offline(assets, tmp_path: Path):
    """Two runs' checkpoints of the same file name: each gets its own W&B sample table (they replaced each other)."""
    out = tmp_path / "cli"
    checkpoints = [tmp_path / run / "checkpoints" / "last.ckpt" for run in ("run_a", "run_b")]
    for path in checkpoints:
        path.parent.mkdir(parents=True)
        shutil.copy(assets["ldm"], path)
    args = [f"ckpt_path=[{','.join(map(str, checkpoints))}]", f"output_dir={out}", "num_samples=4", "batch_size=4",
            "num_steps=[2]",
            "metrics=[shapes_color_accuracy]", f"val_shards={assets['shards']}", "device=cpu",
            f"cache_dir={assets['cache']}", "wandb.enabled=true", "wandb.num_images=2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "ldm.cli.eval", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("shapes_color_accuracy: ") for line in proc.stdout.splitlines()), proc.stdout
    assert (out / "results.jsonl").is_file() and (out / "results.csv").is_file()
    (run,) = (out / "wandb").glob("offline-run-*")
    tables = sorted(p.relative_to(run / "files" / "media" / "table" / "samples").parent.as_posix()
                    for p in run.glob("files/media/table/samples/**/*.table.json"))
    assert tables == ["run_a_last", "run_b_last"]


def test_a_class_conditional_model_needs_the_labels_of_val_shards(assets, tmp_path: Path):
    """Prompts of a file carry no class labels: refused up front, naming prompts_source, not a ValueError from the
    pipeline once sampling starts."""
    from ldm.modules.latent_diffusion import LatentDiffusionModule

    autoencoder = tiny_autoencoder_module(16).autoencoder
    export = autoencoder.save_pretrained(tmp_path / "ae", latent_stats={"scale_factor": 1.0})

    def class_model(num_classes: int) -> LatentDiffusionModule:
        return LatentDiffusionModule({
            "autoencoder_path": str(export), "ema_decay": None,
            "unet": {"in_channels": 4, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                     "attention_levels": [], "num_heads": None, "head_dim": 8, "context_dim": None, "norm_groups": 8,
                     "num_classes": num_classes},
            "conditioner": {"kind": "class", "num_classes": num_classes, "class_embed": "unet"}})

    ckpt = save_checkpoint(class_model(7), tmp_path / "class.ckpt", global_step=1)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle in the center on a white background\n")
    with pytest.raises(ConfigError, match="class-conditional.*prompts_source=val_shards"):
        evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), prompts_source="file",
                          prompts_file=str(prompts), metrics=["shapes_shape_accuracy"]))
    # colour and CLIP score rate the caption's words, which a class model never reads (rows were written); said
    # before CLIP is sought (ldm-eval's default metrics asked for CLIP-L, 1.7 GB, to be downloaded, then refused it)
    with pytest.raises(ConfigError, match=r"metrics \['clip_score', 'shapes_color_accuracy'\] score the images "
                                          r"against their captions, but .* reads class labels only: leave them out "
                                          r"of metrics \(metrics=\[shapes_shape_accuracy\]\)"):
        evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), clip_model=str(tmp_path / "no_clip"),
                          metrics=["clip_score", "shapes_color_accuracy", "shapes_shape_accuracy"]))
    row = evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), metrics=["shapes_shape_accuracy"]))[0]
    assert 0 <= row["shapes_shape_accuracy"] <= 1
    # the labels are what the model generated from: a row of other labels (same captions) is not this point's
    labels = generation_labels(class_model(7).pipeline.conditioner, local_shards(str(assets["shards"])), 8, "k")
    assert row["labels_sha256"] == hashlib.sha256("\n".join(map(str, labels)).encode()).hexdigest()[:16]
    results = tmp_path / "eval" / "results.jsonl"
    results.write_text(json.dumps({**row, "labels_sha256": "0" * 16}) + "\n")
    evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), metrics=["shapes_shape_accuracy"]))
    assert [r["labels_sha256"] for r in read_results(tmp_path / "eval")] == ["0" * 16, row["labels_sha256"]]
    # a model of fewer classes than the shards' labels: refused before anything is generated
    few = save_checkpoint(class_model(3), tmp_path / "few.ckpt", global_step=1)
    with pytest.raises(ConfigError, match=r"val_shards=.* holds labels \[.*\] outside the model's classes \[0, 2\]"):
        evaluate(make_cfg(assets, tmp_path / "eval3", ckpt_path=str(few), metrics=["shapes_shape_accuracy"]))
    # a label equal to the model's number of classes is its null class (the unconditional embedding): refused too
    shards = local_shards(str(assets["shards"]))
    top = max(shard_labels(shards, 8))
    with pytest.raises(ConfigError, match=rf"holds labels \[{top}\] outside the model's classes \[0, {top - 1}\]"):
        generation_labels(class_model(top).pipeline.conditioner, shards, 8, "val_shards")


def test_an_unconditional_model_is_scored_once_without_guidance(assets, tmp_path: Path, capsys):
    """Every guidance scale gives an unconditional model's images unchanged: a sweep wrote one identical row per
    scale, labelled with scales that had no effect, and adherence metrics rated captions it never read."""
    from ldm.modules.latent_diffusion import LatentDiffusionModule

    export = tiny_autoencoder_module(16).autoencoder.save_pretrained(tmp_path / "ae", latent_stats={"scale_factor": 1})
    module = LatentDiffusionModule({
        "autoencoder_path": str(export), "ema_decay": None, "conditioner": {"kind": "none"},
        "unet": {"in_channels": 4, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                 "attention_levels": [], "num_heads": None, "head_dim": 8, "context_dim": None, "norm_groups": 8}})
    ckpt = save_checkpoint(module, tmp_path / "unconditional.ckpt", global_step=1)
    with pytest.raises(ConfigError, match=r"metrics \['shapes_shape_accuracy'\] score the images against their "
                                          r"captions, but .* reads no condition"):
        evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), metrics=["shapes_shape_accuracy"]))
    rows = evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), guidance_scales=[1.0, 3.0],
                             metrics=["fid"]))
    assert [row["guidance_scale"] for row in rows] == [1.0] and rows[0]["fid"] > 0
    assert "is unconditional: guidance has nothing to steer by" in capsys.readouterr().out


def test_a_diverged_model_is_scored_with_its_non_finite_images_counted_and_said(assets, tmp_path: Path, capsys):
    """A UNet that outputs NaN: its images quantise to black, which got a finite FID in a row like any other, unsaid
    (ldm-sample warned). Each point is scored once however many times the command names it ([2.0, 2])."""
    from ldm.modules.latent_diffusion import LatentDiffusionModule

    checkpoint = torch.load(assets["ldm"], weights_only=True)
    module = LatentDiffusionModule(checkpoint["hyper_parameters"]["config"])
    module.load_state_dict(checkpoint["state_dict"])
    for name in ("pipeline.unet.conv_out.bias", "ema.module.conv_out.bias"):
        module.state_dict()[name].fill_(float("nan"))
    diverged = save_checkpoint(module, tmp_path / "diverged.ckpt", global_step=9)
    rows = evaluate(make_cfg(assets, tmp_path / "eval", ckpt_path=[str(diverged), str(tmp_path / ".." / tmp_path.name
                                                                                       / "diverged.ckpt")],
                             num_samples=6, guidance_scales=[2.0, 2], samplers=["ddim", "ddim"], num_steps=[2, 2],
                             metrics=["shapes_color_accuracy"]))
    assert len(rows) == 1 and rows[0]["non_finite_samples"] == 6 and len(read_results(tmp_path / "eval")) == 1
    assert "[ldm-eval] warning: 6 of 6 images hold NaN or infinite values" in capsys.readouterr().out


def test_an_interrupted_sweep_keeps_its_scored_rows_and_a_torn_line_is_mended(
        assets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture):
    """Each row reaches results.jsonl as soon as it is scored: a sweep stopped during its third row (Ctrl-C, a time
    limit) keeps the first two. A last line cut short by a kill is left out of the CSV with a warning, and the next
    rows go on lines of their own."""
    from ldm.pipeline import LatentDiffusionPipeline

    out = tmp_path / "eval"
    generate, calls = LatentDiffusionPipeline.generate, []

    def interrupted(self, *args, **kwargs):
        calls.append(kwargs["guidance_scale"])
        if kwargs["guidance_scale"] == 3.0:
            raise KeyboardInterrupt
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "generate", interrupted)
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(KeyboardInterrupt):
        evaluate({**make_cfg(assets, out, guidance_scales=[1.0, 2.0, 3.0], batch_size=8),
                  "wandb": {"enabled": True, "num_images": 0}})
    assert calls == [1.0, 2.0, 3.0]
    assert [row["guidance_scale"] for row in read_results(out)] == [1.0, 2.0]
    # the W&B run holds those two rows too (its table was logged only after a whole checkpoint's sweep)
    (table,) = (out / "wandb").glob("offline-run-*/files/media/table/results_*.table.json")
    columns, data = (json.loads(table.read_text())[k] for k in ("columns", "data"))
    assert [row[columns.index("guidance_scale")] for row in data] == [1.0, 2.0]
    monkeypatch.setattr(LatentDiffusionPipeline, "generate", generate)

    jsonl = out / "results.jsonl"
    jsonl.write_text(jsonl.read_text() + '{"checkpoint": "b.ck')  # a kill in the middle of a write
    with caplog.at_level("WARNING", logger="ldm.eval.results"):
        evaluate(make_cfg(assets, out, guidance_scales=[4.0], batch_size=8))
    assert f"{out / 'results.jsonl'} line 3 is not a results row" in caplog.text
    assert [row["guidance_scale"] for row in read_results(out)] == [1.0, 2.0, 4.0]
    with (out / "results.csv").open() as f:
        assert [row["guidance_scale"] for row in csv.DictReader(f)] == ["1.0", "2.0", "4.0"]


def test_prompts_from_a_file_need_not_the_validation_shards_the_model_was_trained_with(assets, tmp_path: Path,
                                                                                       monkeypatch, capsys):
    """On another machine the training run's validation shards are gone: prompts from a file and reference images
    from reference_shards need nothing of them (the run stopped, asking for val_shards)."""
    checkpoint = torch.load(assets["ldm"], weights_only=False)
    checkpoint["ldm"] = {"config": {"data": {"val_shards": str(tmp_path / "gone" / "val-*.tar")}}}
    torch.save(checkpoint, tmp_path / "elsewhere.ckpt")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red circle in the center on a white background\n")
    monkeypatch.chdir(tmp_path)  # given relative, recorded absolute: the row says where its prompts are
    cfg = make_cfg(assets, tmp_path / "eval", ckpt_path=str(tmp_path / "elsewhere.ckpt"), val_shards=None,
                   prompts_source="file", prompts_file="prompts.txt", reference_shards=assets["shards"],
                   metrics=["fid", "shapes_color_accuracy"])
    row = evaluate(cfg)[0]
    assert row["fid"] > 0 and row["prompts"] == str(prompts.resolve())
    capsys.readouterr()
    assert evaluate(cfg)[0] == row  # kept (skip_done), and its numbers printed as a new row's are
    assert f"fid: {row['fid']:.6g}" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="val_shards is not set and the validation shards the model was trained"):
        evaluate({**cfg, "prompts_source": "val_shards", "prompts_file": None})  # its captions are the prompts
    # prompts of other data name no colour of the shapes vocabulary: the colour accuracy was 0, as if every image
    # had missed its caption
    prompts.write_text("a cat asleep on a sofa\na lighthouse at dusk\n")
    with pytest.raises(ConfigError, match=r"metrics \['shapes_color_accuracy'\] read the images of shapes captions "
                                          r"\(ldm-data source=shapes\), but none of the 8 prompts names a colour of "
                                          r"that vocabulary \(the first: 'a cat asleep on a sofa'\): leave them out"):
        evaluate({**cfg, "output_dir": str(tmp_path / "eval_cats")})


def test_a_glob_counts_last_ckpt_and_the_checkpoint_it_links_once(tmp_path: Path):
    """`ckpt_path='runs/x/checkpoints/*.ckpt'` matched last.ckpt and the periodic file it is a hard link to: the same
    weights sampled and scored twice, in two rows."""
    import os

    from ldm.eval.loading import resolve_checkpoints

    for name in ("step0000001.ckpt", "step0000002.ckpt"):
        (tmp_path / name).write_bytes(name.encode())
    os.link(tmp_path / "step0000002.ckpt", tmp_path / "last.ckpt")
    assert resolve_checkpoints(str(tmp_path / "*.ckpt")) == [str(tmp_path / "step0000001.ckpt"),
                                                             str(tmp_path / "step0000002.ckpt")]
    # `checkpoints/*` of an autoencoder run: its latent_stats.json stopped the sweep after the first checkpoint
    (tmp_path / "latent_stats.json").write_text("{}")
    assert resolve_checkpoints(str(tmp_path / "*")) == [str(tmp_path / "step0000001.ckpt"),
                                                        str(tmp_path / "step0000002.ckpt")]
    with pytest.raises(MissingCheckpointError, match=r"no \.ckpt file or folder among its matches \['latent_stats"):
        resolve_checkpoints(str(tmp_path / "latent_*"))
    (tmp_path / "copy.pt").write_bytes(b"P")  # a suffix the pattern names is kept
    assert resolve_checkpoints(str(tmp_path / "*.pt")) == [str(tmp_path / "copy.pt")]
    assert resolve_checkpoints(str(tmp_path / "last.ckpt")) == [str(tmp_path / "last.ckpt")]  # named: as given
    # the same file named twice is evaluated once (two identical rows, twice the compute)
    assert resolve_checkpoints([str(tmp_path / "*.ckpt"), str(tmp_path / "step0000001.ckpt")]) == \
        [str(tmp_path / "step0000001.ckpt"), str(tmp_path / "step0000002.ckpt")]
    # an export's weights file is its folder ("cannot tell what this checkpoint holds (state dict prefixes [])")
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "config.json").write_text('{"format": "ldm.pipeline"}')
    (export / "model.safetensors").write_bytes(b"W")
    assert resolve_checkpoints([str(export / "model.safetensors"), str(export), f"{export}/"]) == [str(export)]
    # ... and across items: a run directory and its export, last.ckpt and the periodic file it links (each item's
    # matches were merged apart: four rows of one model)
    assert resolve_checkpoints([str(tmp_path / "run"), str(export / "model.safetensors")]) == [str(tmp_path / "run")]
    assert resolve_checkpoints([str(tmp_path / "last.ckpt"), str(tmp_path / "step0000002.ckpt")]) == \
        [str(tmp_path / "step0000002.ckpt")]
    # a diffusers pipeline, one of its parts, or a file of one: named as such ("a directory without an export")
    pipeline = tmp_path / "sd15"
    (pipeline / "unet").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (pipeline / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"W")
    from safetensors.torch import save_file

    from ldm.checkpoints import CheckpointError

    save_file({"model.diffusion_model.out.2.bias": torch.zeros(4)}, tmp_path / "v1-5.safetensors")
    from ldm.checkpoints import checkpoint_kind

    released = {"state_dict": {"model.diffusion_model.out.2.bias": torch.zeros(4),
                               "first_stage_model.decoder.conv_out.bias": torch.zeros(3)}}
    with pytest.raises(CheckpointError, match=r"ckpt_path=v1-5.ckpt is a Stable Diffusion single file \(the original "
                                              r"layout\): .*model.init_from"):  # (.ckpt: read, then told)
        checkpoint_kind(released, "v1-5.ckpt")
    for given, what in ((tmp_path / "v1-5.safetensors", "a Stable Diffusion single file \\(the original layout\\)"),
                        (pipeline, "a diffusers pipeline folder"),
                        (pipeline / "unet", f"a diffusers UNet2DConditionModel folder \\(the unet/ of the diffusers "
                                            f"pipeline {pipeline}\\)"),
                        (pipeline / "unet" / "diffusion_pytorch_model.safetensors",
                         "a file of a diffusers UNet2DConditionModel folder \\(the unet/")):
        with pytest.raises(CheckpointError, match=f"ckpt_path={given} is {what}.*: this reads ldm's own checkpoints "
                                                  f"and exports; a Stable Diffusion model goes in through ldm-train's "
                                                  f"model.init_from"):
            resolve_checkpoints(str(given))
    bracketed = tmp_path / "lr[1e-3]"  # a sweep's folder: a path that exists is not a pattern (it matched nothing)
    bracketed.mkdir()
    (bracketed / "last.ckpt").write_bytes(b"x")
    assert resolve_checkpoints(str(bracketed / "last.ckpt")) == [str(bracketed / "last.ckpt")]
    assert resolve_checkpoints(str(bracketed)) == [str(bracketed)]
    assert resolve_checkpoints(str(bracketed / "*.ckpt")) == [str(bracketed / "last.ckpt")]
    # ".." folded (skip_done compares the path rows record) as the OS follows it: through a link, to its target's parent
    assert resolve_checkpoints(str(bracketed / ".." / "step0000001.ckpt")) == [str(tmp_path / "step0000001.ckpt")]
    assert resolve_checkpoints(str(bracketed / "..")) == [str(tmp_path)]  # a run directory given as ".."
    (tmp_path / "lustre" / "checkpoints").mkdir(parents=True)
    (tmp_path / "lustre" / "best.ckpt").write_bytes(b"B")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "best.ckpt").write_bytes(b"C")
    (tmp_path / "scratch" / "ckpts").symlink_to(tmp_path / "lustre" / "checkpoints")
    assert resolve_checkpoints(str(tmp_path / "scratch" / "ckpts" / ".." / "best.ckpt")) == [
        str(tmp_path / "lustre" / "best.ckpt")]


def test_each_row_is_labelled_with_the_point_it_generated(assets, tmp_path: Path, monkeypatch):
    """2 samplers x 2 step counts x 2 guidance scales: each row names the point its images were generated at."""
    from ldm.pipeline import LatentDiffusionPipeline

    generate, calls = LatentDiffusionPipeline.generate, []

    def recording(self, *args, **kwargs):
        calls.append((kwargs["sampler"], kwargs["num_steps"], kwargs["guidance_scale"]))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LatentDiffusionPipeline, "generate", recording)
    rows = evaluate(make_cfg(assets, tmp_path / "eval", samplers=["ddim", "dpmpp_2m"], num_steps=[2, 3],
                             guidance_scales=[1.0, 3.0], batch_size=8, metrics=["shapes_color_accuracy"]))
    points = [(r["sampler"], r["num_steps"], r["guidance_scale"]) for r in rows]
    assert points == [(s, n, g) for s in ("ddim", "dpmpp_2m") for n in (2, 3) for g in (1.0, 3.0)]
    assert calls == points  # one batch per point: what was generated is what the row says


def test_skip_done_keeps_only_the_same_weights_samples_and_metrics(assets, tmp_path: Path):
    """skip_done takes a row for done only when it scored the same weights (EMA or raw), N and metrics; use_ema=false
    generates with the weights trained (rows said "raw" either way), and sample i from seed + i (`seed_rule`)."""
    ckpt = tiny_ldm_checkpoint(tmp_path / "ldm", perturbed=True)  # (at initialisation the images are the noise's)
    out = tmp_path / "eval"
    cfg = make_cfg(assets, out, ckpt_path=str(ckpt), metrics=["fid"])
    ema = evaluate(cfg)[0]
    raw = evaluate({**cfg, "use_ema": False})[0]          # the raw weights are another model
    assert (ema["weights"], raw["weights"]) == ("ema", "raw") and ema["fid"] != raw["fid"]
    assert len(read_results(out)) == 2
    other = evaluate({**cfg, "seed": 5, "output_dir": str(tmp_path / "seed5")})[0]
    assert other["seed"] == 5 and other["fid"] != ema["fid"]
    six = evaluate({**cfg, "num_samples": 6})[0]            # another N is another point
    assert six["num_samples"] == 6 and len(read_results(out)) == 3
    kid = {"metrics": ["kid"], "kid_subset_size": 4, "kid_subsets": 2}
    evaluate({**cfg, **kid, "output_dir": str(tmp_path / "k")})
    fid = evaluate({**cfg, "output_dir": str(tmp_path / "k")})[0]  # a row scored with kid alone has no fid
    assert "fid" in fid and len(read_results(tmp_path / "k")) == 2


def test_a_checkpoint_rewritten_in_place_is_scored_again(assets, tmp_path: Path):
    """Same path, same step, other weights (its size and mtime tell): another point."""
    ckpt = tiny_ldm_checkpoint(tmp_path / "ldm")
    cfg = make_cfg(assets, tmp_path / "eval", ckpt_path=str(ckpt), metrics=["shapes_color_accuracy"])
    evaluate(cfg)
    tiny_ldm_checkpoint(tmp_path / "ldm", perturbed=True)  # same path, same step, other weights
    os.utime(ckpt, (ckpt.stat().st_atime, ckpt.stat().st_mtime + 5))
    evaluate(cfg)
    assert len(read_results(tmp_path / "eval")) == 2


class _Recorder:
    image_size = 16

    def __init__(self):
        self.calls = []

    def generate(self, prompts, seeds, class_labels=None, **sweep):
        self.calls.append((list(seeds), class_labels))
        return torch.zeros(len(seeds), 3, 16, 16)


class _Scorer:
    def update(self, images, prompts):
        pass

    def compute(self):
        return {}


@pytest.mark.parametrize("rank", [0, 1])
def test_each_sample_gets_its_global_seed_and_label(assets, tmp_path: Path, rank: int):
    """Rank r of 2 generates samples r, r + 2, ...: each from seed + i and labels[i], whatever the batch."""
    cfg = EvalConfig(**make_cfg(assets, tmp_path, num_samples=10, batch_size=2, seed=3))
    evaluator = Evaluator(cfg)
    evaluator.rank, evaluator.world = rank, 2
    labels = list(range(100, 110))
    pipeline = _Recorder()
    evaluator._generate_and_score(pipeline, [str(i) for i in range(10)], labels, _Scorer(),
                                  {"sampler": "ddim", "num_steps": 2, "guidance_scale": 1.0})
    seeds = [s for call in pipeline.calls for s in call[0]]
    given = [label for call in pipeline.calls for label in call[1]]
    assert seeds == [3 + i for i in range(rank, 10, 2)] and given == [100 + i for i in range(rank, 10, 2)]


def test_reconstructions_are_deterministic_clamped_and_scored_at_their_resolution(assets, tmp_path: Path):
    module = tiny_autoencoder_module()
    ckpt = save_checkpoint(module, tmp_path / "vae.ckpt", global_step=3)
    cfg = make_cfg(assets, tmp_path / "a", ckpt_path=str(ckpt), reconstruction_metrics=["rfid", "psnr"],
                   resolution=32)
    first = evaluate(cfg)[0]
    torch.manual_seed(123)  # the posterior's mode, not a draw from it: the global RNG does not matter
    again = evaluate({**cfg, "output_dir": str(tmp_path / "b")})[0]
    assert (again["psnr"], again["rfid"]) == (first["psnr"], first["rfid"])
    evaluator = Evaluator(EvalConfig(**cfg))
    assert first["reference_hash"] == evaluator.reference(local_shards(assets["shards"]), 32, 8).hash
    # a decoder that overshoots [-1, 1] where the image is saturated: clamped, the reconstruction is exact
    model = module.autoencoder

    class Posterior:
        def __init__(self, x):
            self.x = x

        def mode(self):
            return self.x

        sample = mode

    model.encode = lambda x: Posterior(x)
    model.decode = lambda z: z  # the identity: every image back as it was read
    evaluator = Evaluator(EvalConfig(**make_cfg(assets, tmp_path / "identity", ckpt_path=str(ckpt),
                                                reconstruction_metrics=["psnr", "ssim", "rfid"])))
    row = evaluator.evaluate_reconstruction(model, {"checkpoint": "identity"})[0]
    assert row["psnr"] == 100 and row["ssim"] == pytest.approx(1.0, abs=1e-6) and abs(row["rfid"]) < 1e-3, row
    psnr = []
    for decode in (lambda z: torch.ones_like(z), lambda z: z + 4):  # the same images once clamped to [-1, 1]
        model.decode = decode
        evaluator = Evaluator(EvalConfig(**make_cfg(assets, tmp_path / f"c{len(psnr)}", ckpt_path=str(ckpt),
                                                    reconstruction_metrics=["psnr"])))
        psnr.append(evaluator.evaluate_reconstruction(model, {"checkpoint": "fake"})[0]["psnr"])
    assert psnr[0] == psnr[1]


def test_two_process_reconstruction_with_batches_of_one(assets, tmp_path: Path):
    """Images dealt to the ranks over batches of one (each rank gets every other image, not every batch's first)."""
    ckpt = save_checkpoint(tiny_autoencoder_module(), tmp_path / "vae.ckpt", global_step=3)
    cfg = make_cfg(assets, tmp_path / "two", ckpt_path=str(ckpt), batch_size=1, num_samples=4,
                   reconstruction_metrics=["psnr"])
    single = evaluate({**cfg, "output_dir": str(tmp_path / "one")})[0]
    mp.start_processes(_distributed_worker, args=(2, _free_port(), cfg, str(tmp_path / "rows")), nprocs=2,
                       join=True, start_method="fork")
    row = json.loads(Path(f"{tmp_path / 'rows'}.0").read_text())[0]
    assert row["num_samples"] == 4 and row["psnr"] == pytest.approx(single["psnr"], rel=1e-5)


def test_results_lines_end_with_a_newline_and_a_good_last_row_is_read(tmp_path: Path):
    from ldm.eval.results import append_results

    append_results(tmp_path, [{"a": 1}, {"a": 2}])
    assert (tmp_path / "results.jsonl").read_bytes().endswith(b"}\n")
    # results.csv: a list or dict cell is the JSON of the row's value (Python's repr is no JSON: ['/d/a.tar'])
    nested = {"a": 3, "reference_shards": ["/d/a.tar"], "feature_extractor": {"antialias": False, "dim": 64}}
    append_results(tmp_path, [nested])
    with open(tmp_path / "results.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    assert {k: json.loads(last[k]) for k in ("reference_shards", "feature_extractor")} == \
        {k: nested[k] for k in ("reference_shards", "feature_extractor")}
    (tmp_path / "results.jsonl").write_text('{"a": 1}\n{"a": 2}')  # written by another tool, no final newline
    assert read_results(tmp_path) == [{"a": 1}, {"a": 2}]
