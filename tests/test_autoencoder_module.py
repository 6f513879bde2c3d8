"""AutoencoderModule under a real Lightning Trainer on CPU: overfitting, step counting, checkpoint and export."""

import csv
import json
import logging

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms.functional import pil_to_tensor

from ldm.config import ConfigError, compose_node, instantiate
from ldm.data.shapes import ShapesDataset
from ldm.modules.autoencoder import AutoencoderModule
from ldm.nn.autoencoder import load_autoencoder

pytestmark = pytest.mark.usefixtures("single_torch_thread")

def tiny_module(**overrides) -> AutoencoderModule:
    """conf/model/autoencoder/kl_tiny.yaml, composed with its schema, with `overrides` (dotted keys)."""
    cfg = compose_node("model/autoencoder/kl_tiny")
    cfg.seed = 0
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return instantiate(cfg, "model")


def shapes_images(n: int, split: str = "train") -> torch.Tensor:
    """n shapes images (n, 3, 32, 32) in [-1, 1]."""
    return torch.stack([pil_to_tensor(s["image"]) for s in ShapesDataset(n, 32, seed=0, split=split)]) / 127.5 - 1


def fit(module: AutoencoderModule, images: torch.Tensor, root, max_steps: int, val_every: int, **kwargs) -> L.Trainer:
    loader = DataLoader(TensorDataset(images), batch_size=8, shuffle=False)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=val_every, limit_val_batches=1,
                        check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), **{"logger": False, **kwargs})
    trainer.fit(module, loader, loader)
    return trainer


@torch.no_grad()
def reconstruction_error(module: AutoencoderModule, x: torch.Tensor) -> tuple[float, float]:
    """(mean L1, PSNR in dB) of posterior-mode reconstructions."""
    model = module.eval_model
    was_training = model.training
    x_rec = model.eval()(x, sample_posterior=False)[0].clamp(-1, 1)
    model.train(was_training)
    mse = ((x_rec - x) / 2).pow(2).mean()
    return float((x_rec - x).abs().mean()), float(10 * torch.log10(1 / mse))


def test_overfit_a_handful_of_images(tmp_path):
    torch.manual_seed(0)
    images = shapes_images(8)
    module = tiny_module()
    l1_before, psnr_before = reconstruction_error(module, images)
    trainer = fit(module, images, tmp_path, max_steps=120, val_every=120, enable_checkpointing=False)
    l1_after, psnr_after = reconstruction_error(module, images)
    print(f"overfit: L1 {l1_before:.4f} -> {l1_after:.4f} ({l1_before / l1_after:.1f}x), "
          f"PSNR {psnr_before:.1f} -> {psnr_after:.1f} dB")
    # measured (2 CPUs): L1 0.668 -> 0.037 (18x), PSNR 8.0 -> 26.3 dB (120 steps; 100 gave 21.9 dB once warmup
    # started at lr 0, as transformers' schedules do)
    assert l1_before / l1_after > 10
    assert psnr_after > psnr_before + 12 and psnr_after > 22
    assert trainer.callback_metrics["val/psnr"] > 22


def test_global_step_counts_batches_with_two_optimizers(tmp_path):
    # GAN on from the first step, and LPIPS with a random backbone (no file needed) for val/lpips.
    module = tiny_module(**{"loss.disc_start": 0, "loss.lpips_weight": 0.1, "loss.lpips_pretrained_backbone": False})
    trainer = fit(module, shapes_images(16), tmp_path, max_steps=3, val_every=3, enable_checkpointing=False)
    assert trainer.global_step == 3  # the discriminator's steps are not counted
    metrics = trainer.callback_metrics
    assert metrics["train/d_loss"] > 0 and metrics["train/p_loss"] > 0 and metrics["val/lpips"] > 0
    assert 0 < metrics["train/disc_weight"] < 1e4


def test_validation_scores_the_ema_posterior_mode_and_each_step_runs_at_its_rate(tmp_path):
    """val/rec_loss, val/lpips and val/psnr are the EMA weights' reconstructions of the posterior mode (LPIPS on
    images in [-1, 1]), as computed here by hand; each step runs at its scheduled learning rate (a linear warm-up from
    0: the scheduler steps after the optimizer); a learned log-variance is trained with the autoencoder."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    torch.manual_seed(0)
    module = tiny_module(**{"ema_decay": 0.9, "lr": 1e-2, "warmup_steps": 4, "loss.lpips_weight": 0.1,
                            "loss.lpips_pretrained_backbone": False, "loss.learn_logvar": True})
    used = []

    class RateRecorder(L.Callback):
        def on_fit_start(self, trainer, pl_module):  # the rate each optimizer step runs at
            trainer.optimizers[0].register_step_pre_hook(lambda opt, *_: used.append(opt.param_groups[0]["lr"]))

    images = shapes_images(8)
    trainer = fit(module, images, tmp_path, max_steps=5, val_every=5, enable_checkpointing=False,
                  callbacks=[RateRecorder()])
    assert used == pytest.approx([0.0, 2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert any(p is module.loss.logvar for p in trainer.optimizers[0].param_groups[0]["params"])
    assert module.loss.logvar.item() != 0.0  # moved from logvar_init

    def scores(model) -> list[float]:
        with torch.no_grad():
            x_rec = model.eval().decode(model.encode(images).mode())
            lpips = module.loss.perceptual(images, x_rec.clamp(-1, 1)).mean()
            psnr = peak_signal_noise_ratio(((x_rec + 1) / 2).clamp(0, 1), (images + 1) / 2, data_range=1.0,
                                           reduction="elementwise_mean", dim=(1, 2, 3))
        return [float((images - x_rec).abs().mean()), float(lpips), float(psnr)]

    logged = [float(trainer.callback_metrics[f"val/{k}"]) for k in ("rec_loss", "lpips", "psnr")]
    assert logged == pytest.approx(scores(module.ema.module), rel=1e-5)
    assert logged != pytest.approx(scores(module.autoencoder), rel=1e-5)  # not the trained weights'


def test_both_learning_rates_are_logged_by_name(tmp_path):
    """The LR monitor logs lr/autoencoder and lr/discriminator (the latter was Lightning's `lr-Adam`)."""
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    module = tiny_module(**{"loss.disc_start": 0, "disc_lr": 3e-4})
    trainer = fit(module, shapes_images(16), tmp_path, max_steps=2, val_every=2, enable_checkpointing=False,
                  callbacks=[LearningRateMonitor()], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {k for k in rows[0] if k.startswith("lr")} == {"lr/autoencoder", "lr/discriminator"}
    assert {float(row["lr/discriminator"]) for row in rows if row["lr/discriminator"]} == {3e-4}


def test_a_discriminator_too_deep_for_the_images_is_refused_at_start(tmp_path, shapes_shards, caplog):
    """Each of the PatchGAN's n_layers stride-2 convolutions halves the image, and its last two 4x4 convolutions need
    3 pixels: 32 px takes at most 3 layers. The discriminator first runs at disc_start, so without this check the
    mistake surfaced there (the default: step 50001)."""
    from ldm.data.datamodule import WebDataModule

    module = tiny_module(**{"loss.disc.n_layers": 4, "loss.disc_start": 4})  # the validation at step 4 runs it
    data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), resolution=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model.loss.disc.n_layers=4 halves the 32 px images to 2 px.*at most 3"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny_module(**{"loss.disc.n_layers": 4, "loss.disc_start": 0, "loss.disc_factor": 0.0}),
                    datamodule=data)  # disc_factor 0: the discriminator never runs
    assert "no GAN (model.loss.disc_factor=0)" in caplog.text and "GAN from step" not in caplog.text
    assert tiny_module(**{"loss.disc.n_layers": 3}).loss.discriminator(torch.zeros(1, 3, 32, 32)).shape[-1] == 2


def test_lpips_on_images_too_small_for_vgg_is_refused_at_start(tmp_path, shapes_shards):
    from ldm.data.datamodule import WebDataModule

    module = tiny_module(**{"net.resolution": 8, "loss.lpips_weight": 0.5, "loss.lpips_pretrained_backbone": False})
    data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), resolution=8, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"model\.loss\.lpips_weight=0\.5: LPIPS-VGG needs images of at least 16 px, "
                                          r"these are 8 px; set model\.loss\.lpips_weight=0"):
        trainer.fit(module, datamodule=data)  # torch's "Output size is too small" at the first step before


def test_checkpoint_and_export_round_trips(tmp_path):
    torch.manual_seed(0)
    images = shapes_images(16)
    module = tiny_module(ema_decay=0.9, **{"loss.disc_start": 1})
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    fit(module, images, tmp_path, max_steps=4, val_every=2, callbacks=[checkpoint])
    x = shapes_images(4, split="val")

    def decode(model):
        with torch.no_grad():
            return model.eval()(x, sample_posterior=False)[0]

    expected = decode(module.ema.module)
    assert not torch.equal(expected, decode(module.autoencoder))  # the EMA is not the raw weights

    stats = json.loads((tmp_path / "checkpoints" / "latent_stats.json").read_text())
    assert stats == module.latent_stats and stats["step"] == 4 and len(stats["std"]) == 4
    assert stats["scale_factor"] == pytest.approx(1 / stats["global_std"])

    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    restored = AutoencoderModule.load_from_checkpoint(ckpt)
    assert torch.equal(decode(restored.ema.module), expected)
    assert restored.latent_stats == stats

    from_ckpt, ckpt_stats = load_autoencoder(ckpt)  # EMA weights
    assert torch.equal(decode(from_ckpt), expected) and ckpt_stats == stats
    from_export, export_stats = load_autoencoder(tmp_path / "export")
    assert torch.equal(decode(from_export), expected) and export_stats == stats

    # resumed with the log-variance learnt: the weights fit (a buffer then, a parameter now), and Lightning's
    # optimizer restore stopped with "a parameter group that doesn't match the size", naming no key
    with pytest.raises(ConfigError, match=r"model\.loss\.learn_logvar=false, this run has true .* resume with "
                                          r"model\.loss\.learn_logvar=false"):
        tiny_module(**{"loss.learn_logvar": True}).on_load_checkpoint(torch.load(ckpt, weights_only=True))


def test_training_decodes_a_posterior_sample_and_the_scale_is_of_samples(tmp_path, monkeypatch):
    """Training decodes z = mean + std * eps (eps of step_generator(seed, rank, step)), not the posterior's mean
    (whose variance then had no reconstruction pressure); the latent statistics, stage 2's scale, are the mean and
    the (centred) spread of the validation batches' posterior samples, each drawn from step -1 - batch."""
    from ldm.seeding import step_generator

    torch.manual_seed(0)
    module = tiny_module()
    with torch.no_grad():
        module.autoencoder.quant_conv.bias[:4] += 0.5  # latents away from 0: a spread not centred would show
    encoded, decoded = [], []
    encode, decode = module.autoencoder.encode, module.autoencoder.decode
    monkeypatch.setattr(module.autoencoder, "encode", lambda x: encoded.append(encode(x)) or encoded[-1])
    monkeypatch.setattr(module.autoencoder, "decode", lambda z: decoded.append(z.detach()) or decode(z))
    images = shapes_images(8)
    fit(module, images, tmp_path, max_steps=1, val_every=1)
    posterior = encoded[0]  # training's, at step 0
    eps = torch.randn(posterior.mean.shape, generator=step_generator(0, 0, 0))
    torch.testing.assert_close(decoded[0], (posterior.mean + posterior.std * eps).detach(), rtol=0, atol=0)

    with torch.no_grad():
        z = module.eval_model.encode(images).sample(step_generator(0, 0, -1)).double()  # the one validation batch
    stats = module.latent_stats
    assert stats["mean"] == pytest.approx(z.mean(dim=(0, 2, 3)).tolist(), rel=1e-9, abs=1e-12)
    assert stats["std"] == pytest.approx(z.std(dim=(0, 2, 3), unbiased=False).tolist(), rel=1e-6)
    assert stats["global_mean"] == pytest.approx(z.mean().item(), rel=1e-9)
    assert stats["global_std"] == pytest.approx(z.std(unbiased=False).item(), rel=1e-6)
    assert abs(stats["global_mean"]) > 0.1 * stats["global_std"]


def test_a_resume_keeps_the_statistics_of_the_checkpoints_validation(tmp_path):
    """A periodic checkpoint of a validation step holds what that validation measured (written before it, it held
    none, and the export of a resumed run took those and removed the good latent_stats.json)."""
    from ldm.callbacks.checkpoint import Checkpoint

    images = shapes_images(16)

    def run(max_steps: int) -> L.Trainer:
        torch.manual_seed(0)
        checkpoint = Checkpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=2)
        loader = DataLoader(TensorDataset(images), batch_size=8, shuffle=False)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=2, limit_val_batches=1,
                            check_val_every_n_epoch=None, num_sanity_val_steps=0, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(tmp_path), logger=False,
                            callbacks=[checkpoint])
        last = tmp_path / "checkpoints" / "last.ckpt"
        trainer.fit(tiny_module(), loader, loader, ckpt_path=str(last) if last.exists() else None)
        return trainer

    run(2)
    measured = json.loads((tmp_path / "export" / "latent_stats.json").read_text())
    assert measured["step"] == 2
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["latent_stats"] == measured
    # stage 2 on the checkpoint takes the statistics of its weights, as on the export (it took the checkpoint's)
    assert load_autoencoder(tmp_path / "checkpoints" / "last.ckpt")[1] == measured
    run(2)  # the same command again: a finished run, resumed, trains nothing
    assert json.loads((tmp_path / "export" / "latent_stats.json").read_text()) == measured
    with pytest.warns(UserWarning, match="weights of step 3 with the latent statistics of step 2"):
        run(3)  # one step more, no validation after it: the statistics of step 2, as the warning says
    assert json.loads((tmp_path / "export" / "latent_stats.json").read_text()) == measured
    with pytest.warns(UserWarning, match=r"last\.ckpt: its latent statistics were measured at step 2, its weights "
                                         r"are of step 3 .* give the run's export, or set model\.latent_scale"):
        assert load_autoencoder(tmp_path / "checkpoints" / "last.ckpt")[1] == measured
    # damaged from outside: the checkpoint's own statistics (none here) stand, with a warning, not a stopped resume
    (tmp_path / "checkpoints" / "latent_stats.json").write_text('{"step": 3, "scale')
    with pytest.warns(UserWarning, match=r"latent_stats\.json is not a readable JSON file .*; ignored"):
        run(3)


def test_compile_networks_compiles_what_training_calls(monkeypatch):
    """`compile=true` compiled the autoencoder's forward, which training never calls (it calls encode and decode):
    the run printed that it compiled and trained eagerly. Graphs captured (dynamo's eager backend, no code generated)
    while a training step's calls run: the encoder, the decoder and the discriminator. With the GAN on, the encoder
    alone: the adaptive weight differentiates the decoder and the discriminator twice (retain_graph), which a compiled
    backward refuses, and the run stopped at disc_start."""
    import torch._dynamo  # noqa: F401 -- the compile counters below

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: compile_(fn, backend="eager"))
    counters = torch._dynamo.utils.counters
    for gan, graphs in ((False, (2, 3)), (True, (1, 1))):
        module = tiny_module(**{"loss.disc_start": 0, "loss.disc_factor": 1.0 if gan else 0.0})
        module.compile_networks()
        torch._dynamo.reset()
        counters.clear()
        x = shapes_images(2)
        x_rec = module.autoencoder.decode(module.autoencoder.encode(x).sample())
        assert counters["stats"]["unique_graphs"] == graphs[0]  # encoder (and decoder)
        module.loss.discriminator(x_rec)
        assert counters["stats"]["unique_graphs"] == graphs[1]
        assert module.state_dict().keys() == tiny_module().state_dict().keys()


def test_log_images_returns_grids_in_range():
    module = tiny_module(num_log_images=3)
    images = module.log_images({"image": shapes_images(5)})
    assert set(images) == {"inputs", "reconstructions", "samples"}
    for value in images.values():
        assert value.shape == (3, 3, 32, 32) and value.min() >= -1 and value.max() <= 1
    with torch.no_grad():  # the reconstructions are of the posterior mode (the same grid every time)
        model = module.eval_model
        expected = model.decode(model.encode(shapes_images(3)).mode()).clamp(-1, 1)
    assert torch.equal(images["reconstructions"], expected)


def test_an_image_key_the_batches_lack_is_named_with_the_config_key():
    from ldm.config import ConfigError

    module = tiny_module(image_key="png")
    with pytest.raises(ConfigError, match=r"model\.image_key='png': the batch has no entry 'png', only \['caption', "
                                          r"'image', 'key'\]"):
        module.get_input({"image": shapes_images(2), "caption": ["a", "b"], "key": ["0", "1"]})
