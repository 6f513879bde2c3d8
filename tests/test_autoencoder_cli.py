"""`ldm-train experiment=quickstart_vae` end to end through `train(cfg)`, on shards written by ldm-data."""

import json
import warnings

import pytest
import torch
from hydra import compose, initialize_config_dir

from ldm.cli.common import CONF_DIR
from ldm.cli.train import train
from ldm.config import ConfigError
from ldm.nn.autoencoder import load_autoencoder

pytestmark = pytest.mark.usefixtures("single_torch_thread")

def test_quickstart_vae_leaves_checkpoint_stats_export_and_wandb_run(shapes_shards, tmp_path):
    out = tmp_path / "run"
    overrides = [
        "experiment=quickstart_vae", f"paths.output_dir={out}", "logger=wandb",
        f"data.train_shards={shapes_shards}/train-*.tar", f"data.val_shards={shapes_shards}/val-*.tar",
        "data.batch_size=8", "data.num_workers=0", "trainer.max_steps=4", "trainer.val_check_interval=2",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "callbacks.image_logger.every_n_steps=2",
        "callbacks.progress=null",
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    metrics = train(cfg)

    assert {"train/rec_loss", "train/kl_loss", "train/p_loss", "train/g_loss", "train/disc_weight", "val/psnr",
            "val/ssim"} <= set(metrics)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    stats = json.loads((out / "checkpoints" / "latent_stats.json").read_text())
    assert stats["step"] == 4 and len(stats["mean"]) == 4 and stats["scale_factor"] > 0
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["latent_stats"] == stats
    model, export_stats = load_autoencoder(out / "export")
    assert export_stats == stats and model.downsample_factor == 2  # the quickstart KL-f2
    assert list((out / "images" / "train").glob("reconstructions_step*.png"))
    assert list((out / "wandb").glob("offline-run-*/files")), "no offline W&B run directory"

    # its checkpoint resumed by a run that builds another architecture (the same directory: auto_resume finds it), or
    # given to one that builds another kind of model: refused by name before Lightning's restore would fail on it
    data = [o for o in overrides if o.startswith("data.")]
    for changed, message in (
            (["experiment=quickstart_vae", "model.net.ch=8", f"paths.output_dir={out}"],
             r"last\.ckpt does not fit .*model\.net\.ch: 16 there, 8 here"),
            # the same shapes, another network (GroupNorm over other groups): it trained on silently
            (["experiment=quickstart_vae", "model.net.norm_groups=4", f"paths.output_dir={out}"],
             r"last\.ckpt: its weights fit this model's shapes, but its network differs in \['model\.net\.norm_groups: "
             r"8 there, 4 here'\]"),
            # RGB data: refused at the start, not at the first step or when the GAN starts (step disc_start)
            (["experiment=quickstart_vae", "model.loss.disc.in_channels=1", f"paths.output_dir={tmp_path / 'grey'}"],
             r"model\.loss\.disc\.in_channels=1: the training images are RGB \(3 channels\); set "
             r"model\.loss\.disc\.in_channels=3"),
            (["experiment=quickstart_clip", f"paths.output_dir={tmp_path / 'clip'}",
              f"ckpt_path={out}/checkpoints/last.ckpt"],
             r"of ldm\.modules\.autoencoder\.AutoencoderModule, but this config trains "
             r"ldm\.modules\.contrastive\.ContrastiveModule")):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            other = compose(config_name="train", overrides=[*changed, *data, "logger=csv"])
        with pytest.raises(ConfigError, match=message):
            train(other)


def test_statistics_that_would_not_match_the_export_are_said_at_the_start(shapes_shards, tmp_path):
    """The export's latent statistics (stage 2's scale) come from validations: a max_steps off the validation
    interval is said when the run starts and when it exports; a net.resolution other than the data's is refused
    before any step (the export records it as the size ldm-encode and stage 2 use)."""
    base = ["experiment=quickstart_vae", f"paths.output_dir={tmp_path / 'run'}", "logger=csv",
            f"data.train_shards={shapes_shards}/train-*.tar", f"data.val_shards={shapes_shards}/val-*.tar",
            "data.batch_size=4", "data.num_workers=0", "trainer.limit_val_batches=1", "callbacks.progress=null"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        stale = compose(config_name="train", overrides=[*base, "trainer.max_steps=3", "trainer.val_check_interval=2",
                                                        "model.ema_decay=0.9"])
        sized = compose(config_name="train", overrides=[*base, "model.net.resolution=64",
                                                        f"paths.output_dir={tmp_path / 'sized'}"])
        short = compose(config_name="train", overrides=[*base, "trainer.max_steps=1", "trainer.val_check_interval=2",
                                                        f"paths.output_dir={tmp_path / 'short'}"])
        epoch = compose(config_name="train", overrides=[*base, "trainer.max_steps=3", "trainer.val_check_interval=1.0",
                                                        "trainer.check_val_every_n_epoch=1",
                                                        f"paths.output_dir={tmp_path / 'epoch'}"])
        epoch_off = compose(config_name="train", overrides=[*base, "trainer.max_steps=20",
                                                            "trainer.val_check_interval=1.0",
                                                            "trainer.check_val_every_n_epoch=1",
                                                            f"paths.output_dir={tmp_path / 'epoch_off'}"])
        unvalidated = compose(config_name="train", overrides=[*base, "trainer.max_steps=2", "data.val_shards=null",
                                                              "trainer.val_check_interval=2",
                                                              f"paths.output_dir={tmp_path / 'unvalidated'}"])
    with pytest.warns(UserWarning) as caught:
        train(stale)
    said = " ".join(str(w.message) for w in caught)
    assert "the run's last validation is at step 2, before its last step 3 (trainer.max_steps or max_epochs, " \
           "trainer.val_check_interval, trainer.check_val_every_n_epoch)" in said
    assert "the export holds the weights of step 3 with the latent statistics of step 2" in said
    # resumed into a stretch without validation: the statistics measured before the resume are the export's (it said
    # the export would hold none, or that the last validation was at step 0)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        resumed = compose(config_name="train", overrides=[*base, "trainer.max_steps=5", "trainer.val_check_interval=8",
                                                          "model.ema_decay=0.9", "ckpt_path=last"])
    with pytest.warns(UserWarning) as caught:
        train(resumed)
    said = " ".join(str(w.message) for w in caught)
    assert "no validation runs (steps 4-5 of this resumed run end before its next validation, at step 8 (trainer." \
           "val_check_interval, trainer.check_val_every_n_epoch)): the export will hold the latent statistics of " \
           "step 2 (measured before this resume) with the weights of step 5" in said and "is at step 0" not in said
    # the raw weights of a checkpoint whose statistics are its EMA's (validations evaluate the EMA): their scale was
    # handed out as the raw weights' (ldm-export use_ema=false wrote it as scaling_factor), unsaid
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.warns(UserWarning, match=r"use_ema=false takes the raw weights, but its latent statistics were "
                                         r"measured on the EMA weights .*ldm-export writes it as the export's "):
        load_autoencoder(ckpt, use_ema=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_autoencoder(ckpt)
    assert not any("use_ema=false" in str(w.message) for w in caught)
    # runs that end before their first validation: it said "the last validation is at step 0", which never runs, or
    # (validation once an epoch, of 16 batches) nothing until the export, which said stage 2 would take its scale
    # ... or without validation data (it was told the last validation is at step 2)
    for config, why in ((short, "the run's 1 steps end before its first validation, at step 2 (trainer.val_check"),
                        (epoch, "the run's 3 steps end before its first validation, at step 16 (trainer.val_check"),
                        (unvalidated, "data.val_shards=null")):
        with pytest.warns(UserWarning) as caught:
            train(config)
        said = " ".join(str(w.message) for w in caught)
        assert f"no validation runs ({why}" in said and "is at step" not in said
        assert "the export holds the weights of step" in said and "no latent statistics: stage 2 will need " \
               "model.latent_scale" in said
    # validated once an epoch (16 batches), ending mid-epoch: said at the start as for a step interval (it was said
    # only by the export)
    with pytest.warns(UserWarning, match=r"the run's last validation is at step 16, before its last step 20 "):
        train(epoch_off)
    with pytest.raises(ConfigError, match=r"model\.net\.resolution=64 but data\.resolution=32"):
        train(sized)
    assert not list((tmp_path / "sized").glob("checkpoints/*.ckpt"))
