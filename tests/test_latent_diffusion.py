"""LatentDiffusionModule and its pipeline: frozen fp32 autoencoder, latent scale, loss falls, EMA, self-contained
checkpoints and exports, seeds."""

from __future__ import annotations

import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from ldm.config import ConfigError
from ldm.modules.latent_diffusion import LatentDiffusionModule
from ldm.modules.optim import lr_scheduler
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.pipeline import LatentDiffusionPipeline
from ldm.seeding import step_generator

CAPTIONS = ["a large red circle in the center on a white background",
            "a small blue square in the top left on a black background"]


def tiny_autoencoder(directory: Path, stats: bool = True) -> Path:
    """A random 16 px KL-f2 autoencoder export (4 x 8 x 8 latents), with or without latent statistics."""
    torch.manual_seed(0)
    ae = AutoencoderKL(AutoencoderConfig(resolution=16, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8))
    return ae.save_pretrained(directory, latent_stats={"scale_factor": 0.8, "global_std": 1.25} if stats else None)


def tiny_config(autoencoder_path: Path, **overrides) -> dict:
    config = {
        "autoencoder_path": str(autoencoder_path), "lr": 2e-3, "warmup_steps": 0, "ema_decay": 0.9,
        "val_prompts": CAPTIONS, "val_num_steps": 3, "val_guidance_scale": 2.0,
        "unet": {"in_channels": 4, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                 "attention_levels": [1], "num_heads": None, "head_dim": 8, "context_dim": 32, "norm_groups": 8,
                 "use_scale_shift_norm": True},
        "conditioner": {"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 2, "max_length": 64},
        "diffusion": {"prediction": "v", "schedule": {"zero_terminal_snr": True}},
    }
    config.update(overrides)
    return config


def batch(n: int = 4) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "caption": [CAPTIONS[i % 2] for i in range(n)]}


@pytest.fixture
def autoencoder_dir(tmp_path: Path) -> Path:
    return tiny_autoencoder(tmp_path / "ae")


def test_validation_steps_beyond_the_schedule_are_refused_at_start(autoencoder_dir: Path):
    """val_num_steps must fit the (final) schedule, or every validation grid of the run would fail."""
    diffusion = {"prediction": "v", "schedule": {"zero_terminal_snr": True, "num_train_timesteps": 20}}
    with pytest.raises(ConfigError, match=r"model.val_num_steps=50 must lie in \[1, 20\]"):
        LatentDiffusionModule(tiny_config(autoencoder_dir, diffusion=diffusion, val_num_steps=50))
    with pytest.raises(ConfigError, match=r"model\.val_seed=-1: .* choose a seed >= 0"):  # seeds modulo 2**63
        LatentDiffusionModule(tiny_config(autoencoder_dir, val_seed=-1))


def test_training_at_another_resolution_than_the_model_generates_is_refused(shapes_shards: Path,
                                                                            autoencoder_dir: Path, tmp_path: Path):
    """data.resolution 32 with a model that generates at 16 px (its autoencoder's training size): its grids, export
    and ldm-sample would use another size than it trains on. And a training size the networks cannot divide."""
    from ldm.data.datamodule import WebDataModule

    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), resolution=32, batch_size=4, num_workers=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"data.resolution=32 but the model generates at 16 px .*"
                                          r"'model.image_size=\$\{data.resolution\}' \(quoted for the shell\)"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0
    # With model.image_size set apart from it (training on crops), a data.resolution the networks cannot divide
    # failed at the first step with a bare ValueError about latent sizes.
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, image_size=16))
    factor = module.pipeline.autoencoder.downsample_factor * module.pipeline.unet.downsampling_factor
    data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), resolution=16 + factor // 2, batch_size=4,
                         num_workers=0)
    with pytest.raises(ConfigError, match=rf"data.resolution={16 + factor // 2} must be a positive multiple of "
                                          rf"{factor}"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


def test_latent_scale_comes_from_stage_1_or_config_never_a_default(tmp_path: Path, autoencoder_dir: Path):
    assert LatentDiffusionModule(tiny_config(autoencoder_dir)).pipeline.latent_scale == pytest.approx(0.8)
    explicit = LatentDiffusionModule(tiny_config(autoencoder_dir, latent_scale=0.3))
    assert explicit.pipeline.latent_scale == pytest.approx(0.3)
    no_stats = tiny_autoencoder(tmp_path / "ae_no_stats", stats=False)
    with pytest.raises(ConfigError, match="model.latent_scale"):
        LatentDiffusionModule(tiny_config(no_stats))
    with pytest.raises(FileNotFoundError, match="model.autoencoder_path"):
        LatentDiffusionModule(tiny_config(tmp_path / "nowhere"))


@pytest.mark.slow  # (learning end to end: make quickstart; a UNet alone: tests/test_unet.py)
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(autoencoder_dir: Path):
    torch.manual_seed(0)
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, sample_posterior=False))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=3e-3)
    fixed = batch(8)

    def loss() -> torch.Tensor:  # the same timesteps and noise every time
        return module._loss(fixed, step_generator(0, 0, 0), module.pipeline)

    with torch.no_grad():
        before = loss().item()
    for _ in range(25):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.7 * before, (before, after)


def fit(module: LatentDiffusionModule, tmp_path: Path, steps: int = 3, callbacks: list | None = None) -> L.Trainer:
    data = [batch(4) for _ in range(steps)]
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
                        limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=DataLoader(data, batch_size=None))
    return trainer


def test_autoencoder_stays_frozen_and_in_eval_mode_while_training(tmp_path: Path, autoencoder_dir: Path):
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, weight_decay=0.05))
    ae_before = {k: v.clone() for k, v in module.pipeline.autoencoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in module.pipeline.unet.state_dict().items()}
    ema_before = {k: v.clone() for k, v in module.ema.module.state_dict().items()}
    conditioner_ema_before = {k: v.clone() for k, v in module.ema_conditioner.module.state_dict().items()}
    assert not any(p.requires_grad for p in module.pipeline.autoencoder.parameters())
    trainer = fit(module, tmp_path, steps=3)
    # model.weight_decay reaches AdamW (whose own default equals the config's default, 0.01)
    assert [group["weight_decay"] for group in trainer.optimizers[0].param_groups] == [0.05]
    assert all(torch.equal(v, ae_before[k]) for k, v in module.pipeline.autoencoder.state_dict().items())
    assert all(p.grad is None for p in module.pipeline.autoencoder.parameters())
    assert not module.pipeline.autoencoder.training
    module.train()
    assert not module.pipeline.autoencoder.training and module.pipeline.unet.training
    assert any(not torch.equal(v, unet_before[k]) for k, v in module.pipeline.unet.state_dict().items())
    assert any(not torch.equal(v, ema_before[k]) for k, v in module.ema.module.state_dict().items())
    # The trainable byte encoder is optimised and averaged as well, at every step.
    assert int(module.ema.n_averaged) == int(module.ema_conditioner.n_averaged) == 3
    assert any(not torch.equal(v, conditioner_ema_before[k])
               for k, v in module.ema_conditioner.module.state_dict().items())


class LearningRates(L.Callback):
    def __init__(self):
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("schedule, after_warmup", [("constant", [1.0, 1.0, 1.0, 1.0]),
                                                     ("cosine", [1.0, 0.8536, 0.5, 0.1464]),
                                                     ("linear", [1.0, 0.75, 0.5, 0.25])])
def test_lr_schedule_warms_up_then_decays_to_zero_at_max_steps(tmp_path: Path, autoencoder_dir: Path,
                                                                schedule: str, after_warmup: list[float]):
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, warmup_steps=2, lr_schedule=schedule))
    lrs = LearningRates()
    fit(module, tmp_path, steps=6, callbacks=[lrs])
    assert lrs.seen == pytest.approx([2e-3 * f for f in [0.0, 0.5, *after_warmup]], abs=1e-7)
    with pytest.raises(ConfigError, match="lr_schedule"):
        LatentDiffusionModule(tiny_config(autoencoder_dir, lr_schedule="step"))


def test_decaying_lr_schedule_needs_a_known_last_step():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ConfigError, match="model.lr_schedule=cosine .* set trainer.max_steps"):
        lr_scheduler(optimizer, "cosine", 0, float("inf"))
    assert lr_scheduler(optimizer, "constant", 0, float("inf")).get_last_lr() == [1e-3]


def test_a_step_the_nan_guard_skips_leaves_the_ema_alone(tmp_path: Path, autoencoder_dir: Path):
    """The guard drops the gradients, so the optimizer changes nothing; the EMA was still pulled towards the unchanged
    weights and its warmup count advanced."""
    from scale_helpers import NanInjector

    from ldm.callbacks.nan_guard import NanGuard

    class EmaRecorder(L.Callback):
        def __init__(self):
            self.seen = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen.append((int(pl_module.ema.n_averaged), [p.clone() for p in pl_module.ema.module.parameters()]))

    module = LatentDiffusionModule(tiny_config(autoencoder_dir, ema_decay=0.9))
    recorder = EmaRecorder()
    fit(module, tmp_path, steps=3, callbacks=[NanInjector(steps=[1]), NanGuard(), recorder])
    (n0, ema0), (n1, ema1), (n2, ema2) = recorder.seen
    assert (n0, n1, n2) == (1, 1, 2)
    assert all(torch.equal(a, b) for a, b in zip(ema0, ema1))  # the skipped step 1
    assert not all(torch.equal(a, b) for a, b in zip(ema1, ema2))


def test_settings_a_new_model_would_ignore_are_refused_but_a_recorded_config_loads(tmp_path: Path,
                                                                                    autoencoder_dir: Path):
    """logit_mean / logit_std without logit-normal timesteps: refused for a new model, while a checkpoint of older
    code that recorded them (ignored then) still loads, for sampling and export too."""
    recorded = {"timestep_sampling": "uniform", "logit_mean": 0.5}
    with pytest.raises(ConfigError, match=r"model\.diffusion\.logit_mean=0\.5 / logit_std=1\.0 apply to "
                                          r"timestep_sampling=logit_normal"):
        LatentDiffusionModule(tiny_config(autoencoder_dir, diffusion=recorded))
    trainer = fit(LatentDiffusionModule(tiny_config(autoencoder_dir)), tmp_path, steps=1)
    path = tmp_path / "older.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["config"]["diffusion"].update(recorded)  # as older code wrote it
    torch.save(checkpoint, path)
    assert LatentDiffusionModule.load_from_checkpoint(path, weights_only=True).config.diffusion.logit_mean == 0.5
    assert LatentDiffusionPipeline.from_pretrained(path).schedule is not None


def test_wsd_holds_the_lr_then_decays_linearly_over_the_last_steps():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_scheduler(optimizer, "wsd", warmup_steps=2, total_steps=10, decay_steps=4)
    seen = []
    for _ in range(10):
        seen.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ConfigError, match=r"model.lr_decay_steps=0: .* between 1 and 8"):
        lr_scheduler(optimizer, "wsd", warmup_steps=2, total_steps=10, decay_steps=0)
    # warmup beyond the run: wsd has nothing to decay over ("set it between 1 and -48"), the others never leave the
    # warmup (said; debug=fast_dev_run and debug=limit run so)
    with pytest.raises(ConfigError, match=r"model\.warmup_steps=50 outlasts the 2 steps this run trains .* a debug "
                                          r"preset's limit\): lr_schedule=wsd has no step left to decay over"):
        lr_scheduler(optimizer, "wsd", warmup_steps=50, total_steps=2, decay_steps=1)
    for schedule in ("cosine", "linear"):
        with pytest.warns(UserWarning, match=rf"lr_schedule={schedule} never leaves its warmup"):
            lr_scheduler(optimizer, schedule, warmup_steps=50, total_steps=2)
    # lr_decay_steps with another schedule was ignored silently; refused where a run trains, as a recorded config
    # (a checkpoint's) loads as it was
    with pytest.raises(ConfigError, match=r"model\.lr_decay_steps=100 applies to lr_schedule=wsd .* for "
                                          r"lr_schedule=constant"):
        lr_scheduler(optimizer, "constant", warmup_steps=0, total_steps=1000, decay_steps=100)


def test_autoencoder_runs_in_fp32_under_bf16_autocast(autoencoder_dir: Path):
    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = module.pipeline.encode(batch(2)["image"])
        x = module.pipeline.decode(z)
    assert z.dtype == torch.float32 and x.dtype == torch.float32


def restore_without(trainer: L.Trainer, module: LatentDiffusionModule, export_dir: Path,
                    ckpt: Path) -> LatentDiffusionPipeline:
    """Save a checkpoint, delete `export_dir`'s files, restore: the restored module must sample the same images, so
    the checkpoint alone carries what the export held."""
    trainer.save_checkpoint(ckpt)
    module.eval()
    expected = module.eval_pipeline().generate(CAPTIONS, [5, 6], sampler="ddim", num_steps=3, guidance_scale=2.0)
    for f in export_dir.iterdir():
        f.unlink()
    restored = LatentDiffusionPipeline.from_pretrained(ckpt)
    got = restored.generate(CAPTIONS, [5, 6], sampler="ddim", num_steps=3, guidance_scale=2.0)
    assert torch.allclose(got, expected, atol=1e-5)
    return restored


def test_checkpoint_alone_restores_the_model(tmp_path: Path):
    autoencoder_dir = tiny_autoencoder(tmp_path / "ae")
    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    trainer = fit(module, tmp_path, steps=2)
    restored = restore_without(trainer, module, autoencoder_dir, tmp_path / "model.ckpt")
    assert restored.provenance["step"] == 2 and restored.latent_scale == pytest.approx(0.8)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m"])
def test_generate_depends_on_the_seed_only(autoencoder_dir: Path, sampler: str):
    module = LatentDiffusionModule(tiny_config(autoencoder_dir)).eval()
    for p in module.pipeline.unet.conv_out.parameters():  # a non-zero output layer, so the prompts matter
        torch.nn.init.normal_(p, std=0.1)
    module.ema.module.load_state_dict(module.pipeline.unet.state_dict())
    prompts, seeds = [CAPTIONS[0], CAPTIONS[1], CAPTIONS[0], CAPTIONS[1]], [11, 12, 13, 14]
    together = module.eval_pipeline().generate(prompts, seeds, sampler=sampler, num_steps=4, guidance_scale=3.0)
    alone = torch.cat([module.eval_pipeline().generate([p], [s], sampler=sampler, num_steps=4, guidance_scale=3.0)
                       for p, s in zip(prompts, seeds)])
    assert together.shape == (4, 3, 16, 16) and together.min() >= -1 and together.max() <= 1
    assert torch.allclose(together, alone, atol=1e-4)
    assert not torch.allclose(together[0], together[2], atol=1e-3)  # same prompt, different seed


def test_log_images_returns_the_fixed_prompt_grid(autoencoder_dir: Path):
    module = LatentDiffusionModule(tiny_config(autoencoder_dir)).eval()
    images = module.log_images(batch(4))
    assert set(images) == {"samples"} and images["samples"].shape == (2, 3, 16, 16)
    again = module.log_images(batch(2))
    assert torch.equal(images["samples"], again["samples"])
    # the grid and val/loss are the EMA's (model.val_use_ema) and the grid's seeds val_seed + i
    from convert_helpers import perturb

    from ldm.seeding import step_generator

    module = LatentDiffusionModule(tiny_config(autoencoder_dir, val_seed=11)).eval()
    perturb(module.ema.module, seed=1, scale=0.2)  # the EMA apart from the raw UNet
    c = module.config
    expected = module.eval_pipeline(True).generate(CAPTIONS, [11, 12], sampler=c.val_sampler,
                                                   num_steps=c.val_num_steps, guidance_scale=c.val_guidance_scale)
    assert torch.equal(module.log_images(batch(4))["samples"], expected)
    logged = {}
    module.log = lambda name, value, **kwargs: logged.update({name: value})
    with torch.no_grad():
        module.validation_step(batch(4), 0)
        ema, raw = (module._loss(batch(4), step_generator(c.seed, 0, -1), module.eval_pipeline(use_ema))
                    for use_ema in (True, False))
    assert torch.equal(logged["val/loss"], ema) and not torch.equal(ema, raw)
    module.config.val_use_ema = False  # the trained weights' loss then
    with torch.no_grad():
        module.validation_step(batch(4), 0)
    assert torch.equal(logged["val/loss"], raw)


def test_class_and_unconditional_grids_count_their_own_conditions(autoencoder_dir: Path):
    """A class model's grid took its size from val_prompts (the quickstart's 4): 7 labels gave 4 images, 2 labels no
    grid at all; val_class_labels out of range or on a text model only warned at each validation; val_prompts on a
    model that reads no prompts was ignored without a word."""
    unet = {**tiny_config(autoencoder_dir)["unet"], "context_dim": None, "attention_levels": [], "num_classes": 7}
    classes = {"unet": unet, "conditioner": {"kind": "class", "num_classes": 7, "class_embed": "unet"},
               "val_prompts": []}
    with pytest.warns(UserWarning, match=r"model\.val_prompts is ignored: this model \(model\.conditioner\.kind="
                                         r"class\) reads no prompts; its validation grids take model\.val_class_"):
        LatentDiffusionModule(tiny_config(autoencoder_dir, **{**classes, "val_prompts": ["a red circle"]}))
    labelled = {**batch(4), "label": torch.tensor([3, 1, 4, 1])}
    for labels, expected in (([0, 1, 2, 3, 4, 5, 6], 7), ([0, 1], 2), (None, 4)):  # None: the batch's labels
        module = LatentDiffusionModule(tiny_config(autoencoder_dir, val_class_labels=labels, **classes)).eval()
        assert module.log_images(labelled)["samples"].shape == (expected, 3, 16, 16)
    none = {"unet": {**unet, "num_classes": None}, "conditioner": {"kind": "none"}, "val_num_images": 3,
            "val_prompts": []}
    assert LatentDiffusionModule(tiny_config(autoencoder_dir, **none)).eval().log_images(batch(4))["samples"].shape \
        == (3, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"model\.val_class_labels=\[1, 9\]: give at least one label, each in "
                                          r"\[0, 7\] \(model\.conditioner\.num_classes=7"):
        LatentDiffusionModule(tiny_config(autoencoder_dir, val_class_labels=[1, 9], **classes))
    with pytest.raises(ConfigError, match=r"model\.val_class_labels=\[1\] is for class-conditional models; this "
                                          r"one is model\.conditioner\.kind=byte"):
        LatentDiffusionModule(tiny_config(autoencoder_dir, val_class_labels=[1]))


def test_pretrained_byte_encoder_stays_frozen_and_the_checkpoint_carries_it(tmp_path: Path):
    from ldm.conditioning.byte import ByteTextEncoder

    autoencoder_dir = tiny_autoencoder(tmp_path / "ae")
    torch.manual_seed(1)
    encoder_dir = ByteTextEncoder(width=32, num_layers=1, num_heads=2, max_length=64).save_pretrained(tmp_path / "te")
    conditioner = {"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 2, "max_length": 64,
                   "name_or_path": str(encoder_dir)}
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, conditioner=conditioner))
    before = {k: v.clone() for k, v in module.pipeline.conditioner.state_dict().items()}
    assert module.ema_conditioner is None
    trainer = fit(module, tmp_path, steps=2)
    assert all(torch.equal(v, before[k]) for k, v in module.pipeline.conditioner.state_dict().items())
    assert all(p.grad is None for p in module.pipeline.conditioner.parameters())
    restore_without(trainer, module, encoder_dir, tmp_path / "model.ckpt")


@pytest.mark.parametrize("decay", [0.9, 0.99, 0.9999])  # (0.9: at its ceiling after 80 updates)
def test_ema_warms_up_as_diffusers_ema_model(decay: float):
    """The EMA's decay ramps as min(decay, (1 + n) / (10 + n)), diffusers' EMAModel (and CompVis' LitEma): the
    average follows the weights early on. A fixed 0.9999 held 90% of the initial weights after 1000 steps."""
    from diffusers.training_utils import EMAModel

    from ldm.modules.ema import make_ema

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ours, theirs = make_ema(model, decay), EMAModel(model.parameters(), decay=decay)
    for _ in range(300):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ours.update_parameters(model)
        theirs.step(model.parameters())
    for mine, reference in zip(ours.module.parameters(), theirs.shadow_params):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    import pickle  # a module holding the EMA pickles (multiprocessing, torch.save of a whole module)

    again = pickle.loads(pickle.dumps(ours))
    assert all(torch.equal(a, b) for a, b in zip(again.module.parameters(), ours.module.parameters()))
    fixed = make_ema(model, decay, warmup=False)
    initial = [p.clone() for p in fixed.module.parameters()]
    fixed.update_parameters(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    fixed.update_parameters(model)
    moved = next(fixed.module.parameters()) - initial[0]
    assert torch.allclose(moved, torch.full_like(moved, 1 - decay) + (next(model.parameters()) - 1 - initial[0]),
                          atol=1e-5)


def test_ema_warmup_false_is_a_fixed_decay_in_both_stages(autoencoder_dir: Path):
    """model.ema_warmup=false reaches each module's EMA: the update after the first (which copies the weights)
    moves it by 1 - decay (the warm-up's decay, 2 / 11, moved it by 0.82)."""
    from test_autoencoder_module import tiny_module

    ldm = LatentDiffusionModule(tiny_config(autoencoder_dir, ema_decay=0.9999, ema_warmup=False))
    autoencoder = tiny_module(ema_decay=0.9999, ema_warmup=False)
    for ema, network in ((ldm.ema, ldm.pipeline.unet), (autoencoder.ema, autoencoder.autoencoder)):
        ema.update_parameters(network)
        before = next(ema.module.parameters()).clone()
        with torch.no_grad():
            next(network.parameters()).add_(1.0)
        ema.update_parameters(network)
        moved = next(ema.module.parameters()) - before
        torch.testing.assert_close(moved, torch.full_like(moved, 1e-4), rtol=0, atol=1e-6)


def test_resuming_with_another_latent_scale_is_refused(tmp_path: Path, autoencoder_dir: Path):
    """Stage 1's statistics changed between two segments of a run: the resumed UNet would see latents of another
    scale, so the resume stops naming both scales and the key that keeps the trained one."""
    trainer = fit(LatentDiffusionModule(tiny_config(autoencoder_dir)), tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    (autoencoder_dir / "latent_stats.json").write_text(json.dumps({"scale_factor": 0.5, "global_std": 2.0}))

    def resume(**overrides) -> L.Trainer:
        module = LatentDiffusionModule(tiny_config(autoencoder_dir, **overrides))
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
                            limit_val_batches=0)
        trainer.fit(module, train_dataloaders=DataLoader([batch(4)] * 3, batch_size=None),
                    ckpt_path=str(tmp_path / "last.ckpt"))
        return trainer

    with pytest.raises(ConfigError, match=r"trained with latent scale 0.8 \(1 / std .*\), this run's is 0.5 .*"
                                          r"model.latent_scale=0.8"):
        resume()
    assert resume(latent_scale=0.8).global_step == 3
    # the autoencoder itself retrained into the same folder: the scale message advised model.latent_scale, then the
    # latents' hash check named the checkpoint's weights as model.autoencoder_path's (on images: no word at all)
    from safetensors.torch import load_file, save_file

    weights = autoencoder_dir / "model.safetensors"
    state = load_file(weights)
    state["decoder.conv_out.bias"] = state["decoder.conv_out.bias"] + 0.1
    save_file(state, weights)
    with pytest.raises(ConfigError, match=r"the checkpoint's frozen autoencoder \(sha256 [0-9a-f]{64}; its run took "
                                          r"the latent scale from 1 / std .*\) is not the one this run loads from .*ae "
                                          r"\(sha256 [0-9a-f]{64}\): .*model\.autoencoder_path set to the autoencoder"):
        resume(latent_scale=0.8)


def test_a_checkpoint_that_trained_a_now_frozen_text_encoder_block_resumes(tmp_path: Path, autoencoder_dir: Path):
    """Older code kept CLIP's last block in AdamW though the penultimate layer without the pooled vector leaves it
    without gradient; it is frozen now. Such a checkpoint resumes: the block's entries are dropped, every other
    parameter keeps its moments."""
    from convert_helpers import tiny_clip, tiny_tokenizer

    tokenizer = tiny_tokenizer(tmp_path / "clip")
    tiny_clip(tokenizer, 32, layers=2).save_pretrained(tmp_path / "clip")
    conditioner = {"kind": "clip", "name_or_path": str(tmp_path / "clip"), "trainable": True,
                   "layer": "penultimate", "pooled": False, "max_length": 16}
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, conditioner=conditioner))
    trainer = fit(module, tmp_path, steps=2)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    unet, cond = list(module.pipeline.unet.parameters()), list(module.pipeline.conditioner.parameters())
    assert not all(p.requires_grad for p in cond)
    kept = list(range(len(unet))) + [len(unet) + i for i, p in enumerate(cond) if p.requires_grad]
    state = checkpoint["optimizer_states"][0]
    old = {kept[j]: v for j, v in state["state"].items()}
    for i, p in enumerate(cond):  # what older code held for the unused block: moments of zeros, two steps
        if not p.requires_grad:
            old[len(unet) + i] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(p),
                                  "exp_avg_sq": torch.zeros_like(p)}
    state["state"], state["param_groups"][0]["params"] = old, list(range(len(unet) + len(cond)))
    torch.save(checkpoint, tmp_path / "old.ckpt")

    resumed = LatentDiffusionModule(tiny_config(autoencoder_dir, conditioner=conditioner))
    data = [batch(4) for _ in range(3)]
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(resumed, train_dataloaders=DataLoader(data, batch_size=None), ckpt_path=str(tmp_path / "old.ckpt"))
    assert {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {3}


def test_a_checkpoint_of_the_layout_before_the_pipeline_resumes_and_loads(tmp_path: Path, autoencoder_dir: Path):
    """Before LatentDiffusionPipeline, stage 2's networks sat at the top of the state dict (`unet.`, `autoencoder.`,
    `conditioner.`): every command refused such a checkpoint ("not the kind of checkpoint expected here", or a
    config to resume with that no config could satisfy). It resumes and loads as a checkpoint written now does."""
    from ldm.checkpoints import load_checkpoint

    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    fit(module, tmp_path, steps=2)
    module.trainer.save_checkpoint(tmp_path / "new.ckpt")
    checkpoint = torch.load(tmp_path / "new.ckpt", weights_only=False)
    checkpoint["state_dict"] = {k.removeprefix("pipeline."): v for k, v in checkpoint["state_dict"].items()}
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"unet", "autoencoder", "conditioner", "ema",
                                                                   "ema_conditioner"}
    torch.save(checkpoint, tmp_path / "old.ckpt")

    assert load_checkpoint(tmp_path / "old.ckpt")["state_dict"].keys() == module.state_dict().keys()
    for use_ema in (True, False):
        loaded = LatentDiffusionPipeline.from_checkpoint(load_checkpoint(tmp_path / "old.ckpt"), "old.ckpt", use_ema)
        want = module.ema.module if use_ema else module.pipeline.unet
        assert all(torch.equal(a, b) for a, b in zip(loaded.unet.state_dict().values(), want.state_dict().values()))
    resumed = LatentDiffusionModule(tiny_config(autoencoder_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, enable_checkpointing=False,
                        limit_val_batches=0)
    trainer.fit(resumed, train_dataloaders=DataLoader([batch(4)] * 3, batch_size=None),
                ckpt_path=str(tmp_path / "old.ckpt"))
    assert trainer.global_step == 3 and {int(s["step"]) for s in trainer.optimizers[0].state.values()} == {3}


def test_a_latent_scale_far_from_unit_spread_is_warned_at_the_first_step(tmp_path: Path, autoencoder_dir: Path):
    """The first batch's latents times the latent scale should spread about 1: a scale 20x off (SD's 0.18215 on an
    autoencoder of std 3.6, the stand-in of an older export) trained unsaid; it is warned, naming the scale that
    would fit. At the scale that fits, nothing is said."""
    import warnings

    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    pipeline = module.pipeline  # the latents the first step trains on (a posterior sample), unscaled
    std = float(pipeline.encode(batch(4)["image"], step_generator(module.config.seed, 0, 0)).std()) \
        / pipeline.latent_scale
    with pytest.warns(UserWarning, match=r"the first batch's latents, scaled by .* \(from model\.latent_scale\), "
                                         r"have std 20 where diffusion expects about 1: .* set "
                                         + re.escape(f"model.latent_scale={1 / std:.5g} ")):
        fit(LatentDiffusionModule(tiny_config(autoencoder_dir, latent_scale=20 / std)), tmp_path, steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(LatentDiffusionModule(tiny_config(autoencoder_dir, latent_scale=1 / std)), tmp_path, steps=1)
    assert not [w for w in caught if "first batch's latents" in str(w.message)]


def test_the_flops_counted_are_those_of_the_training_step(tmp_path: Path, autoencoder_dir: Path):
    """The throughput callback counts the first step's FLOPs, where the latent-spread check encoded the batch a
    second time: 10% more FLOPs for the quickstart model on images, about 36% more for SD 1.5 at 256 px (its KL-f8
    encoder), and MFU read as much too high."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.callbacks.throughput import Throughput

    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    with FlopCounterMode(display=False) as counter:
        module._loss(batch(4), step_generator(0, 0, 0), module.pipeline).backward()
    callback = Throughput()
    fit(LatentDiffusionModule(tiny_config(autoencoder_dir)), tmp_path, steps=1, callbacks=[callback])
    assert callback.flops_per_sample == {"0": counter.get_total_flops() / 4}


def test_train_loss_under_accumulation_is_the_whole_steps_mean(autoencoder_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """With 2 micro-batches per optimizer step, `train/loss` is their mean (diffusers logs it so), not the last
    micro-batch's, which covers half of the step's batch; each micro-batch draws by (step, its place in the step)."""
    import csv

    from ldm.modules import latent_diffusion
    draws = []

    def recorded(seed, rank, step, device="cpu", micro=0):
        draws.append((step, micro))
        return step_generator(seed, rank, step, device, micro)

    monkeypatch.setattr(latent_diffusion, "step_generator", recorded)

    from lightning.pytorch.loggers import CSVLogger

    from ldm.callbacks.step_boundary import LearningRateMonitor

    micro = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            micro.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)  # Lightning divides it by k

    module = LatentDiffusionModule(tiny_config(autoencoder_dir))
    trainer = L.Trainer(accelerator="cpu", max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1,
                        default_root_dir=tmp_path, logger=CSVLogger(tmp_path, name="csv", version=""),
                        callbacks=[Record(), monitor := LearningRateMonitor(logging_interval="step")],
                        enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, train_dataloaders=DataLoader([batch(4) for _ in range(6)], batch_size=None))
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = [float(row["train/loss"]) for row in rows if row.get("train/loss")]
    assert logged == pytest.approx([(micro[i] + micro[i + 1]) / 2 for i in (0, 2, 4)], rel=1e-6)
    assert [row["step"] for row in rows if row.get("lr")] == ["0", "1", "2"]  # once per step (was per micro-batch)
    assert [len(history) for history in monitor.lrs.values()] == [1]  # the last rate, not every one of the run
    assert len(set(micro)) == 6  # the micro-batches differ, so the last alone would not pass
    assert [d for d in draws if d[0] >= 0] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]


def test_batch_keys_the_batches_lack_are_named_with_the_config_key(autoencoder_dir: Path):
    """model.caption_key=text (as a shard's member might be called): a bare KeyError 'text' at the first step."""
    from ldm.config import ConfigError

    for key, value in (("caption_key", "text"), ("image_key", "png")):
        module = LatentDiffusionModule(tiny_config(autoencoder_dir, **{key: value}))
        with pytest.raises(ConfigError, match=rf"model\.{key}='{value}': the batch has no entry '{value}', only "
                                              r"\['caption', 'image'\] .*leave model\." + key):
            module._loss(batch(2), step_generator(0, 0, 0), module.pipeline)
    from ldm.conditioning.conditioner import ClassConditioner

    labelled = {**batch(2), "label": torch.tensor([1, 2])}
    with pytest.raises(ConfigError, match=r"model\.label_key='cls': the batch has no entry 'cls', only \['caption', "
                                          r"'image', 'label'\]"):  # (it read: every sample needs a 'label')
        ClassConditioner(10, None).batch_conditions(labelled, "caption", "cls")
