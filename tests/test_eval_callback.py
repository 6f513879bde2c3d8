"""The in-training FID callback: logs val/fid_N (and val/clip_score_N) on the EMA weights from cached statistics."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import CSVLogger
from test_eval_helpers import random_inception_weights, tiny_clip, tiny_ldm_checkpoint
from torch.utils.data import DataLoader

from ldm.callbacks.fid import FIDCallback
from ldm.cli.common import CONF_DIR
from ldm.cli.train import instantiate_callbacks
from ldm.config import ConfigError
from ldm.modules.latent_diffusion import LatentDiffusionModule

CAPTIONS = ["a large red circle in the center on a white background",
            "a small blue square in the top left on a black background"]


def test_fid_callback_logs_small_n_fid_and_clip_score(tmp_path: Path, shapes_shards: Path):
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    callback = FIDCallback(val_shards=str(shapes_shards), every_n_steps=2, num_samples=4, batch_size=4,
                           reference_num_samples=8, cache_dir=str(tmp_path / "cache"), feature_dim=64,
                           feature_extractor_weights_path=str(random_inception_weights(tmp_path / "inc.pt")),
                           clip_model=str(tiny_clip(tmp_path / "clip")), num_steps=2)
    g = torch.Generator().manual_seed(0)
    data = [{"image": torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, "caption": CAPTIONS} for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=CSVLogger(tmp_path, name="csv", version=""),
                        log_every_n_steps=1, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[callback])
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    metrics = trainer.callback_metrics
    assert "val/fid_4" in metrics and "val/clip_score_4" in metrics
    assert float(metrics["val/fid_4"]) > 0 and 0 <= float(metrics["val/clip_score_4"]) <= 100
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["val/fid_4"]]
    # once per evaluation, after step 2 and at the end (step 3), at the steps Lightning gives those steps' metrics
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert list((tmp_path / "cache").glob("*.pt"))  # the reference statistics ldm-eval will reuse
    # each evaluation scores its own samples alone: two of the same weights give the same values (none carries the
    # images of the one before into its FID)
    first, second = callback.evaluate(trainer, module), callback.evaluate(trainer, module)
    assert first == second and first["val/fid_4"] > 0


def test_fid_callback_scores_the_ema_weights_or_the_trained_ones_as_use_ema_says(tmp_path: Path,
                                                                                 shapes_shards: Path):
    """A model that keeps an EMA is scored with its EMA UNet by default, with the weights it trains under
    use_ema=false (a run asking for raw-weight FID got the EMA's)."""
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    assert module.ema is not None
    weights = random_inception_weights(tmp_path / "inc.pt")
    data = DataLoader([{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS}], batch_size=None)
    unets = []  # the UNet of each pipeline the module hands out
    eval_pipeline = module.eval_pipeline

    def recorded(use_ema: bool):
        pipeline = eval_pipeline(use_ema)
        unets.append(pipeline.unet)
        return pipeline

    module.eval_pipeline = recorded
    for use_ema, expected in ((True, module.ema.module), (False, module.pipeline.unet)):
        unets.clear()
        callback = FIDCallback(val_shards=str(shapes_shards), every_n_steps=1, num_samples=4, batch_size=4,
                               cache_dir=str(tmp_path / "cache"), feature_dim=64, use_ema=use_ema,
                               feature_extractor_weights_path=str(weights), num_steps=2)
        L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
                  callbacks=[callback]).fit(module, train_dataloaders=data)
        assert unets[0] is expected  # the evaluation at step 1 (then the export, always the EMA's)


def test_sample_i_is_prompt_i_with_seed_plus_i_against_the_reference_of_the_models_size(
        tmp_path: Path, shapes_shards: Path, monkeypatch: pytest.MonkeyPatch):
    """num_samples=6 in batches of 4: every sample generated once, sample i with the i-th validation caption and
    seed + i at the configured guidance; the reference statistics of reference_num_samples images at the model's
    16 px. (Checked as `fid > 0` before: 4 of 6 samples scored as val/fid_6 passed, and so did one seed for all.)"""
    from ldm.callbacks import fid
    from ldm.eval.sources import load_prompts

    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    generated, references = [], []
    eval_pipeline, reference_stats = module.eval_pipeline, fid.load_or_compute_reference_stats

    def recorded(use_ema: bool):
        pipeline = eval_pipeline(use_ema)
        generate = pipeline.generate

        def generate_recorded(prompts, seeds, **options):
            generated.append((list(prompts), list(seeds), options["guidance_scale"], options["num_steps"]))
            return generate(prompts, seeds, **options)

        pipeline.generate = generate_recorded
        return pipeline

    def reference_recorded(shards, resolution, num_samples, *args, **kwargs):
        references.append((resolution, num_samples))
        return reference_stats(shards, resolution, num_samples, *args, **kwargs)

    module.eval_pipeline = recorded
    monkeypatch.setattr(fid, "load_or_compute_reference_stats", reference_recorded)
    callback = FIDCallback(val_shards=str(shapes_shards), every_n_steps=1, num_samples=6, batch_size=4,
                           reference_num_samples=8, cache_dir=str(tmp_path / "cache"), feature_dim=64,
                           guidance_scale=3.0, seed=5, num_steps=2,
                           feature_extractor_weights_path=str(random_inception_weights(tmp_path / "inc.pt")))
    data = DataLoader([{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS}], batch_size=None)
    L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path,
              callbacks=[callback]).fit(module, train_dataloaders=data)
    prompts = load_prompts("val_shards", 6, [str(s) for s in sorted(shapes_shards.glob("val-*.tar"))])
    assert len(set(prompts)) > 1
    assert generated == [(prompts[:4], [5, 6, 7, 8], 3.0, 2), (prompts[4:], [9, 10], 3.0, 2)]
    assert references == [(16, 8)] and "val/fid_6" in module.trainer.callback_metrics


class StopSignal(L.Callback):
    """Stops the run after its first step the way `SlurmRequeue` does on a signal (`stopped`, `should_stop`)."""

    stopped = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.stopped = trainer.should_stop = True


def test_no_final_fid_after_a_stop_signal_and_no_fid_for_a_model_that_does_not_generate(tmp_path: Path,
                                                                                          shapes_shards: Path):
    """A stopped run leaves at once (SLURM's warning leaves no time for 1000 samples), also when an evaluation is due
    at the step it stops at; the resumed run evaluates at its end. A model without `eval_pipeline` is refused at
    setup, not when the first evaluation is due."""
    callback = FIDCallback(val_shards=str(shapes_shards), every_n_steps=1, num_samples=4, batch_size=4,
                           cache_dir=str(tmp_path / "cache"), feature_dim=64,
                           feature_extractor_weights_path=str(random_inception_weights(tmp_path / "inc.pt")),
                           num_steps=2)
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    data = [{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS}] * 3
    options = {"accelerator": "cpu", "max_steps": 3, "logger": False, "enable_progress_bar": False,
               "enable_model_summary": False, "enable_checkpointing": False, "limit_val_batches": 0,
               "default_root_dir": tmp_path}
    trainer = L.Trainer(**options, callbacks=[StopSignal(), callback])  # as ldm.slurm's callback comes before it
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    assert trainer.global_step == 1 and "val/fid_4" not in trainer.callback_metrics

    class NoGeneration(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))

        def training_step(self, batch, batch_idx):
            raise AssertionError("never reached")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ConfigError, match=r"callbacks\.fid: NoGeneration does not generate images"):
        L.Trainer(**options, callbacks=[callback]).fit(NoGeneration(), train_dataloaders=DataLoader(data))


def test_fid_runs_once_per_optimizer_step_under_accumulation_also_after_a_resume(tmp_path: Path,
                                                                               shapes_shards: Path):
    """With 2 accumulated batches per step and an evaluation every step: one per step, at the batch that steps; a run
    resumed from step 2 does not evaluate step 2 again at its first micro-batch."""
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    weights = random_inception_weights(tmp_path / "inc.pt")
    data = DataLoader([{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS}] * 8, batch_size=None)

    def fit(name: str, max_steps: int, ckpt_path: Path | None = None) -> list[int]:
        callback = FIDCallback(val_shards=str(shapes_shards), every_n_steps=1, num_samples=4, batch_size=4,
                               cache_dir=str(tmp_path / "cache"), feature_dim=64,
                               feature_extractor_weights_path=str(weights), num_steps=2)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, accumulate_grad_batches=2, log_every_n_steps=1,
                            logger=CSVLogger(tmp_path, name=name, version=""), enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[callback])
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
        with open(tmp_path / name / "metrics.csv") as f:
            return [int(row["step"]) for row in csv.DictReader(f) if row.get("val/fid_4")]

    assert fit("first", 2) == [0, 1]  # (Lightning's steps for the metrics of steps 1 and 2)
    assert fit("resumed", 3, tmp_path / "first.ckpt") == [2]


def test_an_evaluation_skipped_by_a_stop_signal_runs_when_the_run_resumes(tmp_path: Path, shapes_shards: Path):
    """A stop signal at a step whose FID is due skips it (and the signal's checkpoint is written before the FID's
    turn); the resumed run evaluates that step at its start, so the curve keeps every point."""
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    weights = random_inception_weights(tmp_path / "inc.pt")
    data = DataLoader([{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS}] * 4, batch_size=None)

    def fit(name: str, max_steps: int, stop: bool, ckpt_path: Path | None = None) -> list[int]:
        fid = FIDCallback(val_shards=str(shapes_shards), every_n_steps=1, num_samples=4, batch_size=4,
                          cache_dir=str(tmp_path / "cache"), feature_dim=64,
                          feature_extractor_weights_path=str(weights), num_steps=2)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, log_every_n_steps=1,
                            logger=CSVLogger(tmp_path, name=name, version=""), enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[StopSignal(), fid] if stop else [fid])
        trainer.fit(module, train_dataloaders=data, ckpt_path=ckpt_path)
        trainer.save_checkpoint(tmp_path / f"{name}.ckpt")
        with open(tmp_path / name / "metrics.csv") as f:
            return [int(row["step"]) for row in csv.DictReader(f) if row.get("val/fid_4")]

    assert fit("stopped", 3, stop=True) == []  # stopped at step 1, its evaluation skipped
    assert fit("resumed", 2, stop=False, ckpt_path=tmp_path / "stopped.ckpt") == [0, 1]
    # a checkpoint of older code holds no FID state: whether its step was evaluated is unknown, so not again
    old = torch.load(tmp_path / "stopped.ckpt", weights_only=True)
    old["callbacks"] = {k: v for k, v in old["callbacks"].items() if not k.startswith("FIDCallback")}
    torch.save(old, tmp_path / "old.ckpt")
    assert fit("old", 2, stop=False, ckpt_path=tmp_path / "old.ckpt") == [1]
    # two FID callbacks (a frequent small one, a rare large one) keep their own states, one per curve
    keys = [FIDCallback(val_shards=str(shapes_shards), every_n_steps=n, num_samples=k).state_key
            for n, k in ((1, 4), (10, 1000), (5, 4))]
    assert keys[0] != keys[1] and keys[0] == keys[2]


def test_fid_callback_config_composes_beside_the_defaults():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["callbacks=[default,fid]", "paths.output_dir=/tmp/x"])
    assert cfg.callbacks.fid._target_ == "ldm.callbacks.fid.FIDCallback" and "checkpoint" in cfg.callbacks
    assert cfg.callbacks.fid.every_n_steps == cfg.trainer.val_check_interval


def test_fid_callback_built_from_the_config_takes_a_list_of_shards(tmp_path: Path, shapes_shards: Path):
    """data.val_shards as a list (which the datamodule takes) reached the callback as an OmegaConf ListConfig, which
    it refused: "expected a non-empty string or a list of them, got [...]"."""
    shards = [str(p) for p in sorted(shapes_shards.glob("val-*.tar"))]
    weights = random_inception_weights(tmp_path / "inc.pt")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["callbacks=[default,fid]", "paths.output_dir=/tmp/x",
                                          f"data.val_shards={shards}", "callbacks.fid.feature_dim=64",
                                          f"callbacks.fid.feature_extractor_weights_path={weights}",
                                          f"callbacks.fid.cache_dir={tmp_path / 'cache'}"])
    fid = next(c for c in instantiate_callbacks(cfg.callbacks) if isinstance(c, FIDCallback))
    assert fid.num_samples == cfg.callbacks.fid.num_samples


def test_fid_settings_are_checked_before_training(tmp_path: Path, shapes_shards: Path):
    """Each of the callback's settings fails at construction or at setup, before the first step, naming its key: an
    unknown sampler, a negative guidance scale, more steps than the schedule has, CLIP weights that cannot be had."""
    common = {"val_shards": str(shapes_shards), "every_n_steps": 2, "num_samples": 4, "feature_dim": 64,
              "cache_dir": str(tmp_path / "cache"),
              "feature_extractor_weights_path": str(random_inception_weights(tmp_path / "inc.pt"))}
    with pytest.raises(ConfigError, match=r"callbacks\.fid\.sampler"):
        FIDCallback(**common, sampler="nope")
    with pytest.raises(ConfigError, match=r"callbacks\.fid\.guidance_scale=-1\.0 must be >= 0"):
        FIDCallback(**common, guidance_scale=-1.0)
    for key, value, message in (("batch_size", 0, r"batch_size=0 must be >= 1"),  # failed at the first evaluation
                                # the validation interval's fraction of an epoch: FID at every step
                                ("every_n_steps", 1.0, r"every_n_steps=1\.0 must be a whole number of steps"),
                                ("num_samples", 1, r"num_samples=1 must be >= 2"),
                                ("reference_num_samples", 0, r"reference_num_samples=0 must be >= 2"),
                                ("feature_dim", 100, r"feature_dim=100 is not allowed"),
                                # samples 2**63 - 2 + i: a TypeError at the first evaluation, hours in
                                ("seed", 2**63 - 2, r"seed=9223372036854775806: the seeds .* must lie in \[0, 2")):
        with pytest.raises(ConfigError, match=rf"callbacks\.fid\.{message}"):
            FIDCallback(**{**common, key: value})
    (tmp_path / "no_clip").mkdir()
    module = LatentDiffusionModule.load_from_checkpoint(tiny_ldm_checkpoint(tmp_path / "ldm"))
    data = [{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS}] * 3
    for callback, message in ((FIDCallback(**common, num_steps=5000), r"callbacks\.fid\.num_steps=5000 must lie in "
                                                                      r"\[1, 1000\]"),
                              (FIDCallback(**common, clip_model=str(tmp_path / "no_clip")),
                               r"callbacks\.fid\.clip_model=.*no_clip: the folder holds no CLIP weights")):
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[callback])
        with pytest.raises((ConfigError, FileNotFoundError), match=message):
            trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
        assert trainer.global_step == 0


def test_a_class_conditional_model_is_checked_against_the_fid_shards_labels(tmp_path: Path, shapes_shards: Path):
    """The labels the FID samples are generated from are checked at setup: shapes labels 0-6 for a 3-class model
    (a label of 3, the null class, trained the unconditional embedding; above it, the first evaluation crashed
    after hours), and CLIP score for a model that reads no prompts is refused rather than left out."""
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.nn.unet import unet_config

    module = LatentDiffusionModule({
        "autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "ema_decay": None,
        "unet": asdict(unet_config("tiny", context_dim=None, num_classes=3)),
        "conditioner": {"kind": "class", "num_classes": 3, "class_embed": "unet"}})
    common = {"val_shards": str(shapes_shards), "every_n_steps": 2, "num_samples": 4, "feature_dim": 64,
              "cache_dir": str(tmp_path / "cache"),
              "feature_extractor_weights_path": str(random_inception_weights(tmp_path / "inc.pt"))}
    data = [{"image": torch.zeros(2, 3, 16, 16), "caption": CAPTIONS, "label": torch.tensor([0, 1])}] * 3
    for callback, message in ((FIDCallback(**common), r"callbacks\.fid\.val_shards=.* holds labels \[3, 6\] "
                                                      r"outside the model's classes \[0, 2\]"),
                              (FIDCallback(**common, clip_model=str(tiny_clip(tmp_path / "clip"))),
                               r"callbacks\.fid\.clip_model=.*this model reads none; set callbacks\.fid\.clip_model="
                               r"null")):
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            default_root_dir=tmp_path, callbacks=[callback])
        with pytest.raises(ConfigError, match=message):
            trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
        assert trainer.global_step == 0
