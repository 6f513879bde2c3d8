"""LatentDiffusionPipeline without Lightning: exports at the end of fit, loading from an export or a checkpoint, the
loss on images and on precomputed posterior moments, and loading that never executes code."""

from __future__ import annotations

import os
import shutil
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_latent_diffusion import CAPTIONS, batch, fit, tiny_autoencoder, tiny_config

from ldm.checkpoints import CheckpointError
from ldm.conditioning.byte import ByteTextEncoder
from ldm.config import ConfigError
from ldm.convert import load_components
from ldm.data.latents import weights_hash
from ldm.eval.evaluator import evaluate
from ldm.modules.latent_diffusion import LatentDiffusionModule
from ldm.nn.autoencoder import AutoencoderKL, load_autoencoder
from ldm.pipeline import LatentDiffusionPipeline
from ldm.seeding import step_generator


@pytest.fixture
def trained(tmp_path: Path) -> tuple[LatentDiffusionModule, Path, Path]:
    """A tiny module after 2 steps: (module, its checkpoint, its export written at the end of fit)."""
    torch.manual_seed(0)
    module = LatentDiffusionModule(tiny_config(tiny_autoencoder(tmp_path / "ae")))
    trainer = fit(module, tmp_path, steps=2)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, ckpt, tmp_path / "export"


def test_export_and_checkpoint_give_the_same_images(trained):
    module, ckpt, export = trained
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    expected = module.eval().eval_pipeline().generate(CAPTIONS, [5, 6], sampler="ddim", num_steps=3,
                                                      guidance_scale=2.0)
    from_export = LatentDiffusionPipeline.from_pretrained(export)
    from_ckpt = LatentDiffusionPipeline.from_pretrained(ckpt)
    assert from_export.provenance["step"] == from_ckpt.provenance["step"] == 2
    assert from_ckpt.provenance["weights"] == "ema" and not from_export.training
    for pipeline in (from_export, from_ckpt):
        got = pipeline.generate(CAPTIONS, [5, 6], sampler="ddim", num_steps=3, guidance_scale=2.0)
        assert torch.equal(got, expected)
    raw = LatentDiffusionPipeline.from_pretrained(ckpt, use_ema=False)
    assert raw.provenance["weights"] == "raw"
    assert any(not torch.equal(a, b) for a, b in zip(raw.unet.state_dict().values(),
                                                     from_ckpt.unet.state_dict().values()))
    # an export holds the EMA weights only: asked for raw ones, the pipeline and ldm-eval's loader name a checkpoint
    from ldm.io import check_export_weights

    assert from_export.provenance["weights"] == "ema"
    for load in (lambda path: LatentDiffusionPipeline.from_pretrained(path, use_ema=False),
                 lambda path: check_export_weights(path, use_ema=False)):  # what ldm-eval checks up front
        for path in (export, export.parent):  # the export, and the run directory it is read through
            with pytest.raises(ConfigError, match=r"use_ema=false .* a checkpoint of the run that wrote it"):
                load(path)
    (export.parent / "checkpoints").mkdir(exist_ok=True)
    shutil.copy(ckpt, export.parent / "checkpoints" / "last.ckpt")  # now there is one to name
    with pytest.raises(ConfigError, match=f"ckpt_path={export.parent}/checkpoints/last.ckpt"):
        LatentDiffusionPipeline.from_pretrained(export, use_ema=False)
    with pytest.warns(UserWarning, match="autoencoder export, which holds the weights it was exported with"):
        check_export_weights(export.parent / "ae", use_ema=False)  # it records no weights: a warning, not an error
    # saved from Python: the EMA pipeline is labelled so, the training one raw
    with pytest.raises(ConfigError, match="use_ema=false"):
        LatentDiffusionPipeline.from_pretrained(module.eval_pipeline().save_pretrained(export.parent / "py_ema"),
                                                use_ema=False)
    from_python = LatentDiffusionPipeline.from_pretrained(module.pipeline.save_pretrained(export.parent / "py_raw"),
                                                          use_ema=False)
    assert from_python.provenance["weights"] == "raw"
    # an export of a run without an EMA holds its raw weights: use_ema=false is what it is
    raw_export = raw.save_pretrained(export.parent / "raw_export")
    assert LatentDiffusionPipeline.from_pretrained(raw_export, use_ema=False).provenance["weights"] == "raw"


def test_save_pretrained_round_trip_is_exact(trained, tmp_path: Path):
    _, ckpt, _ = trained
    pipeline = LatentDiffusionPipeline.from_pretrained(ckpt)
    again = LatentDiffusionPipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "again"))
    assert again.config() == pipeline.config()
    for (k, a), (k2, b) in zip(pipeline.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_a_pipeline_export_gives_its_autoencoder_and_an_export_of_the_wrong_kind_is_named(trained, tmp_path: Path):
    module, ckpt, export = trained
    for path in (export, ckpt):  # the frozen autoencoder it trained on, and its latent scale
        autoencoder, stats = load_autoencoder(path)
        assert stats == {"scale_factor": module.pipeline.latent_scale} == {"scale_factor": 0.8}  # tiny_autoencoder's
        assert weights_hash(autoencoder) == weights_hash(AutoencoderKL.from_pretrained(tmp_path / "ae"))
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match=r"path=.*foreign\.ckpt: cannot tell what this "
                                              r"checkpoint holds \(state dict prefixes \['encoder'\]\)"):
        load_autoencoder(tmp_path / "foreign.ckpt")
    for path, what in ((export, "a latent diffusion pipeline export"), (ckpt, "a checkpoint of ldm-train's latent "
                                                                              "diffusion model")):
        with pytest.raises(ConfigError, match=f"model.init_from=.* is {what}.*, not a Stable Diffusion checkpoint"
                                              rf".*: ldm-export ckpt_path={path} format=diffusers output_dir=DIR, "
                                              r"then model\.init_from=DIR( \(a UNet without cross-attention: "
                                              r"ldm-export .* format=single_file output_dir=DIR, then "
                                              r"model\.init_from=DIR/model\.safetensors\))?$"):  # (what works)
            load_components(path, key="model.init_from")
    from scale_helpers import tiny_class_model_export

    classes = tiny_class_model_export(tmp_path / "classes")  # no cross-attention: format=diffusers refuses it
    with pytest.raises(ConfigError, match=r"in a layout model\.init_from reads first: ldm-export "
                                          r"ckpt_path=.*class_model format=single_file output_dir=DIR, then "
                                          r"model\.init_from=DIR/model\.safetensors$"):
        load_components(classes, key="model.init_from")
    ByteTextEncoder(width=32, num_layers=1, num_heads=2, max_length=16).save_pretrained(tmp_path / "text")
    with pytest.raises(ConfigError, match=r"path=.*text holds a byte text encoder export"):
        load_autoencoder(tmp_path / "text")
    with pytest.raises(ConfigError, match=r"ckpt_path=.*text holds a byte text encoder export"):
        AutoencoderKL.from_pretrained(tmp_path / "text", "ckpt_path")
    with pytest.raises(ConfigError, match=r"name_or_path=.*export holds a latent diffusion pipeline export"):
        ByteTextEncoder.from_pretrained(export)
    with pytest.raises(ConfigError, match=r"name_or_path=.*ae holds an autoencoder export"):
        ByteTextEncoder.from_pretrained(tmp_path / "ae")


def test_loss_on_posterior_moments_equals_loss_on_images(tmp_path: Path):
    """Training on precomputed latents draws the posterior sample from the stored moments with the step's generator:
    with the same generator, the loss is the same bit for bit."""
    module = LatentDiffusionModule(tiny_config(tiny_autoencoder(tmp_path / "ae")))
    pipeline = module.pipeline
    images = batch(4)
    with torch.no_grad():
        moments = pipeline.autoencoder.quant_conv(pipeline.autoencoder.encoder(images["image"]))  # (B, 8, 8, 8)
    latents = {"moments": moments, "caption": images["caption"]}
    module.train()
    on_images = module._loss(images, step_generator(0, 0, 3), pipeline)
    on_latents = module._loss(latents, step_generator(0, 0, 3), pipeline)
    assert torch.equal(on_images, on_latents)
    other = module._loss(latents, step_generator(0, 0, 4), pipeline)
    assert not torch.equal(on_images, other)
    # which is a draw of the posterior (LDM's `sample_posterior`), mean + std * eps, scaled; or its mode when off
    from ldm.nn.autoencoder import DiagonalGaussianDistribution

    posterior = DiagonalGaussianDistribution(moments)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(5))
    drawn = (posterior.mean + torch.exp(0.5 * posterior.logvar) * eps) * pipeline.latent_scale
    assert pipeline.sample_posterior and not torch.allclose(drawn, posterior.mean * pipeline.latent_scale)
    torch.testing.assert_close(pipeline.latents(posterior, torch.Generator().manual_seed(5)), drawn)
    pipeline.sample_posterior = False
    torch.testing.assert_close(pipeline.latents(posterior, torch.Generator().manual_seed(5)),
                               posterior.mean * pipeline.latent_scale)
    # the batch's mean of the per-image objective (a sum grew with the batch size, and the gradients with it)
    from ldm.diffusion.objective import diffusion_loss

    module.eval()  # no condition dropout: the generator draws the timesteps and noise alone
    conditions = pipeline.conditioner.batch_conditions(images)
    cond = pipeline.conditioner(conditions)
    per_image = diffusion_loss(lambda x_t, t: pipeline.unet(x_t, t, **cond), drawn, pipeline.schedule,
                               pipeline.diffusion, torch.Generator().manual_seed(6))
    assert per_image.shape == (4,)
    torch.testing.assert_close(pipeline.latent_loss(drawn, conditions, torch.Generator().manual_seed(6)),
                               per_image.mean())


class _Payload:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_carries_code_is_refused_and_nothing_runs(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match=f"ckpt_path={evil}.*refused"):
        LatentDiffusionPipeline.from_pretrained(evil)
    assert not marker.exists()
    # A corrupt file and a file of another kind are named too.
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=f"ckpt_path={broken} is not a readable checkpoint"):
        LatentDiffusionPipeline.from_pretrained(broken)
    for text in ("task_name: quickstart_ldm\nseed: 0\n", "a: 1\n", "prompts: [a]\n"):  # a run's config.yaml
        broken.write_text(text)  # the first two stopped torch's unpickler with an IndexError
        with pytest.raises(CheckpointError, match=f"ckpt_path={broken} is not a readable checkpoint"):
            LatentDiffusionPipeline.from_pretrained(broken)
    checkpoints = tmp_path / "run" / "checkpoints"  # a run's checkpoints/ given for the run: its last.ckpt named
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=f"holds no pipeline export .*or a checkpoint, e.g. "
                                              f"ckpt_path={checkpoints}/last.ckpt$"):
        LatentDiffusionPipeline.from_pretrained(checkpoints)
    (checkpoints / "last.ckpt").rename(checkpoints / "step0000007.ckpt")  # (save_last=false)
    with pytest.raises(CheckpointError, match=f"e.g. ckpt_path={checkpoints}/step0000007.ckpt$"):
        LatentDiffusionPipeline.from_pretrained(checkpoints)
    plain = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"a.weight": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match="not a latent diffusion checkpoint .*; expected a checkpoint of "
                                              "ldm-train's latent diffusion model"):
        LatentDiffusionPipeline.from_pretrained(plain)
    # a text-image pretraining run's checkpoint and its export are named as such (they were called autoencoders')
    torch.save({"hyper_parameters": {"config": {}}, "state_dict": {"text_encoder.proj.weight": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match=r"a text-image pretraining checkpoint: its run's export \(<run>/export\) "
                                              r"goes to model\.conditioner\.name_or_path"):
        LatentDiffusionPipeline.from_pretrained(plain)
    text = ByteTextEncoder(width=16, num_layers=1, num_heads=2, max_length=8).save_pretrained(tmp_path / "text")
    with pytest.raises(CheckpointError, match=r"is not a latent diffusion pipeline export: its config\.json describes "
                                              r"a byte text encoder export \(model\.conditioner\.name_or_path\)"):
        LatentDiffusionPipeline.from_pretrained(text)
    with pytest.raises(ConfigError, match=r"it is a checkpoint, which this key does not read; point it at the export "
                                          r"of a text-image pretraining run \(.*when it finishes\)$"):
        ByteTextEncoder.from_pretrained(plain, config_key="text_encoder.name_or_path")  # (ldm-encode: no null)


def test_loaded_models_are_frozen_so_dropout_never_acts(tmp_path: Path):
    """A checkpoint read by `from_checkpoint` (ldm-eval's path for .ckpt files) sampled in train mode: with
    model.unet.dropout > 0 the same seed gave other images on each call. `load_autoencoder` (the README's stage-1
    snippet) likewise encoded and decoded with dropout on. And a pipeline saved into a folder that held a stage-1
    export replaced it (kept only its latent_stats.json, which `load_autoencoder` took over the pipeline's scale):
    refused, as is an autoencoder saved over a pipeline export or either over a diffusers model; an export of the same
    kind is replaced."""
    from ldm.checkpoints import load_checkpoint
    from ldm.eval.loading import load_model
    from ldm.nn.autoencoder import AutoencoderConfig

    torch.manual_seed(0)
    module = LatentDiffusionModule(tiny_config(tiny_autoencoder(tmp_path / "ae"),
                                               unet={**tiny_config(tmp_path)["unet"], "dropout": 0.5}))
    fit(module, tmp_path, steps=2).save_checkpoint(tmp_path / "model.ckpt")
    for pipeline in (LatentDiffusionPipeline.from_checkpoint(load_checkpoint(tmp_path / "model.ckpt"), "model.ckpt"),
                     load_model(str(tmp_path / "model.ckpt")).model):
        assert not pipeline.training and not any(p.requires_grad for p in pipeline.parameters())
        images = [pipeline.generate(CAPTIONS, [5, 6], num_steps=2, guidance_scale=2.0) for _ in range(2)]
        assert torch.equal(*images)
    # a pipeline in train mode (a module's, during training or after load_from_checkpoint) samples without dropout
    # too, and is left in its mode (each call gave other images: 1.4 apart)
    training = module.pipeline.train()
    images = [training.generate(CAPTIONS, [5, 6], num_steps=2, guidance_scale=2.0) for _ in range(2)]
    assert torch.equal(*images) and training.unet.training
    assert torch.equal(images[0], module.pipeline.eval().generate(CAPTIONS, [5, 6], num_steps=2, guidance_scale=2.0))

    torch.manual_seed(0)
    AutoencoderKL(AutoencoderConfig(resolution=16, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8,
                                    dropout=0.5)).save_pretrained(tmp_path / "ae_dropout")
    autoencoder, _ = load_autoencoder(tmp_path / "ae_dropout")
    assert not autoencoder.training and not any(p.requires_grad for p in autoencoder.parameters())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(autoencoder.encode(x).mode(), autoencoder.encode(x).mode())

    shutil.copytree(tmp_path / "ae", tmp_path / "reused")  # its latent_stats.json: scale 0.8
    kept = {p.name: p.read_bytes() for p in (tmp_path / "reused").iterdir()}
    pipeline = LatentDiffusionPipeline.from_pretrained(tmp_path / "model.ckpt")
    with pytest.raises(FileExistsError, match=r"reused holds an autoencoder export, which this would overwrite with a "
                                              r"latent diffusion pipeline export: save into another folder"):
        pipeline.save_pretrained(tmp_path / "reused")
    assert {p.name: p.read_bytes() for p in (tmp_path / "reused").iterdir()} == kept
    pipeline.save_pretrained(tmp_path / "pipeline")
    with pytest.raises(FileExistsError, match="pipeline holds a latent diffusion pipeline export, which this would "
                                              "overwrite with an autoencoder export"):
        pipeline.autoencoder.save_pretrained(tmp_path / "pipeline")
    pipeline.latent_scale = 0.5
    pipeline.save_pretrained(tmp_path / "pipeline")  # its own kind: replaced
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "pipeline").latent_scale == 0.5
    pipeline.autoencoder.save_pretrained(tmp_path / "reused")
    assert load_autoencoder(tmp_path / "reused")[1] is None  # (new weights: the old statistics went)
    (tmp_path / "reused" / "config.json").unlink()  # an export killed before its config.json: replaced
    pipeline.autoencoder.save_pretrained(tmp_path / "reused")
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    DiffusersAutoencoderKL(block_out_channels=[8], norm_num_groups=8).save_pretrained(tmp_path / "diffusers_vae")
    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")
    for folder, held in (("diffusers_vae", "a diffusers model"), ("sd", "a diffusers pipeline folder")):
        for save in (pipeline.save_pretrained, pipeline.autoencoder.save_pretrained):
            with pytest.raises(FileExistsError, match=f"{folder} holds {held}, which this would overwrite"):
                save(tmp_path / folder)


def test_loading_leaves_the_global_generator_and_images_in_the_wrong_form_are_named(trained):
    """Loading a pipeline or an autoencoder built its networks with random weights first, drawing from torch's global
    generator: a script's later draws depended on whether (and what) it loaded. uint8 images of 0..255 were encoded
    as if in [-1, 1] (the pipeline cast them); channels-last ones were refused as a wrong size; latents of the wrong
    shape failed deep in a convolution."""
    module, ckpt, export = trained
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    pipeline = LatentDiffusionPipeline.from_pretrained(export)
    LatentDiffusionPipeline.from_pretrained(ckpt)
    load_autoencoder(export)
    AutoencoderKL.from_pretrained(export)
    assert torch.equal(torch.randn(3), expected)

    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for bad, message in [
            (((images + 1) * 127.5).to(torch.uint8),
             r"got torch\.uint8 .* \(images of 0\.\.255: x\.float\(\) / 127\.5 - 1\)"),
            (images.permute(0, 2, 3, 1), r"shape \(2, 16, 16, 3\) \(\(B, H, W, C\) images: x\.permute\(0, 3, 1, 2\)\)"),
            (((images + 1) * 127.5).to(torch.uint8).permute(0, 2, 3, 1),  # both conversions at once
             r"\(\(B, H, W, C\) images: x\.permute\(0, 3, 1, 2\); images of 0\.\.255: x\.float\(\) / 127\.5 - 1\)"),
            (images > 0, r"got torch\.bool .*\(images of 0 and 1: x\.float\(\) \* 2 - 1\)"),
            (images[0], r"must be a floating-point \(B, 3, H, W\) tensor in \[-1, 1\]; got torch\.float32 of shape "
                        r"\(3, 16, 16\)")]:
        for encode in (pipeline.encode, pipeline.autoencoder.encode):
            with pytest.raises(ValueError, match=message):
                encode(bad)
    z = pipeline.encode(images)
    for bad in (z[:, :3], z[0]):
        with pytest.raises(ValueError, match=r"latents must be \(B, embed_dim=4, h, w\); got shape"):
            pipeline.decode(bad)


def test_generate_validates_its_inputs(trained):
    _, ckpt, _ = trained
    pipeline = LatentDiffusionPipeline.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="guidance_scale=-1"):
        pipeline.generate(CAPTIONS, [0, 1], guidance_scale=-1.0)
    with pytest.raises(ValueError, match="eta=-1.0 must be >= 0"):  # ran, with a shrunken eps coefficient
        pipeline.generate(CAPTIONS, [0, 1], eta=-1.0)
    with pytest.raises(ConfigError, match="eta=0.5 is DDIM's noise scale, which sampler=ddpm does not take"):
        pipeline.generate(CAPTIONS, [0, 1], sampler="ddpm", eta=0.5)  # ran as if eta were 0
    with pytest.raises(ValueError, match=r"sampler='dpmpp'; expected one of"):  # (not "it adds no noise")
        pipeline.generate(CAPTIONS, [0, 1], sampler="dpmpp", eta=0.2)
    with pytest.raises(ConfigError, match="num_steps=2.5 must be a whole number of steps"):  # a slicing TypeError
        pipeline.generate(CAPTIONS, [0, 1], num_steps=2.5)
    # each failed deep inside (or ran: seed 0.9 was seed 0, -1 was 2**63 - 1, image_size=0 the default size, NaN
    # guidance NaN images), none naming the argument
    for kwargs, message in [({"seeds": 0}, r"seeds=0 must be a sequence of integers in \[0, 2\*\*63\)"),
                            ({"seeds": [0.9, 1]}, r"seeds=\[0\.9, 1\] must be a sequence of integers"),
                            ({"seeds": [True, False]}, "seeds="), ({"seeds": [2**63, 1]}, "seeds="),  # = seeds 0, 1
                            ({"seeds": [-1, 1]}, "seeds="),  # = seeds 2**63 - 1, 1, as ldm-sample says
                            ({"prompts": CAPTIONS[0]}, "must be a sequence, one per seed"),
                            ({"class_labels": 1}, r"class_labels=1 must be a sequence"),  # len() of an int
                            ({"prompts": [1, 2]}, r"prompts must be strings, got \['int', 'int'\]"),
                            ({"guidance_scale": float("nan")}, "guidance_scale=nan must be a finite number"),
                            ({"guidance_scale": "5"}, "guidance_scale='5' must be a finite number"),
                            ({"image_size": 32.0}, r"image_size=32\.0 must be an integer number of pixels")]:
        with pytest.raises(TypeError, match=message):
            pipeline.generate(**{"prompts": CAPTIONS, "seeds": [0, 1], **kwargs})
    with pytest.raises(ConfigError, match="image_size=0 must be a positive multiple"):
        pipeline.generate(CAPTIONS, [0, 1], image_size=0)
    # integers of any kind are seeds; prompts any iterable, read once (a generator was emptied by the checks)
    expected = pipeline.generate(CAPTIONS, [5, 1], num_steps=2)
    for seeds in (np.array([5, 1]), torch.tensor([5, 1]), (5, 1), iter([5, 1])):
        assert torch.equal(pipeline.generate(CAPTIONS, seeds, num_steps=2), expected)
    assert torch.equal(pipeline.generate((c for c in CAPTIONS), [5, 1], num_steps=2), expected)
    with pytest.raises(TypeError, match="use_ema='false' must be True or False"):  # a string was true: EMA weights
        LatentDiffusionPipeline.from_pretrained(ckpt, use_ema="false")
    with pytest.raises(ValueError, match="1 prompts for 2 seeds"):
        pipeline.generate(CAPTIONS[:1], [0, 1])
    with pytest.raises(ValueError, match="image_size=10 must be a positive multiple of 4"):
        pipeline.generate(CAPTIONS, [0, 1], image_size=10)
    with pytest.raises(TypeError, match="sequence, one per seed"):  # "ab" would have been the prompts "a", "b"
        pipeline.generate("ab", [0, 1])
    with pytest.raises(ValueError, match="seeds is empty"):
        pipeline.generate([], [])
    with pytest.raises(ValueError, match="1 negative_prompts for 2 seeds"):
        pipeline.generate(CAPTIONS, [0, 1], negative_prompts=["blurry"])


def test_guidance_below_one_and_prompts_cut_short_are_named(trained, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """Diffusers takes any guidance scale <= 1 for no guidance (SD-Turbo's documented call is guidance_scale=0), our
    formula's 0 is the unconditional model: said, as is a negative prompt that does nothing at 1, and a prompt the
    text encoder cuts (diffusers logs that; ours cut silently)."""
    from convert_helpers import tiny_tokenizer

    from ldm.conditioning.text import tokenizer_cut

    _, ckpt, _ = trained
    pipeline = LatentDiffusionPipeline.from_pretrained(ckpt)
    with pytest.warns(UserWarning, match=r"guidance_scale=0\.0 < 1 pulls the images away from the prompts toward the "
                                         r"unconditional model .* use 1"):
        unconditional = pipeline.generate(CAPTIONS, [0, 0], num_steps=2, guidance_scale=0.0)
    assert torch.equal(unconditional[0], unconditional[1]), "two prompts, one seed: the same unconditional image"
    with pytest.warns(UserWarning, match="negative_prompts do nothing at guidance_scale=1"):
        pipeline.generate(CAPTIONS, [0, 1], num_steps=1, guidance_scale=1.0, negative_prompts=["blurry"] * 2)
    # one step of leading (SD's) or linspace spacing visits t=1 or 0: the images were the starting noise, decoded
    from ldm.diffusion.schedule import NoiseSchedule, ScheduleConfig

    trailing = pipeline.schedule
    for spacing, offset, visited in (("leading", 1, 1), ("linspace", 0, 0)):
        pipeline.schedule = NoiseSchedule(ScheduleConfig(timestep_spacing=spacing, steps_offset=offset))
        with pytest.warns(UserWarning, match=rf"num_steps=1 with timestep_spacing={spacing} visits t=\[{visited}\]: "
                                             rf"the sampler takes .* or timestep_spacing=trailing \(which starts at "
                                             rf"t=999\)"):
            pipeline.generate(CAPTIONS, [0, 1], num_steps=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            pipeline.generate(CAPTIONS, [0, 1], num_steps=2)  # leading: t=[501, 1]; linspace: [999, 0]
    pipeline.schedule = trailing
    room = pipeline.conditioner.encoder.max_length - 2  # the byte encoder's: BOS and EOS around the bytes
    with caplog.at_level("WARNING", logger="ldm.conditioning.conditioner"):
        pipeline.generate(["x" * room, CAPTIONS[1]], [0, 1], num_steps=1)
        assert "longer than" not in caplog.text
        pipeline.generate(["x" * (room - 1) + "\u00e9 in red", CAPTIONS[1]], [0, 1], num_steps=1)
    assert f"1 of the 2 prompts of this batch are longer than the text encoder's {room + 2} tokens (its start and " \
           "end tokens included)" in caplog.text
    assert "loses '\ufffd in red'" in caplog.text  # the second byte of the cut character, then the rest
    caplog.clear()
    with caplog.at_level("WARNING", logger="ldm.conditioning.conditioner"):  # said once (generate runs per batch)
        pipeline.generate(["y" * (room + 5), CAPTIONS[1]], [0, 1], num_steps=1)
    assert "longer than" not in caplog.text
    tokenizer = tiny_tokenizer(tmp_path / "tok")  # CLIP's: what diffusers' encode_prompt reports as cut
    ids = tokenizer("the red the blue").input_ids
    assert tokenizer_cut(tokenizer, "the red the blue", len(ids)) == ""
    assert tokenizer_cut(tokenizer, "the red the blue", len(ids) - 2) == tokenizer.decode(ids[len(ids) - 3:-1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_pipeline_generates_and_exports_in_fp32(trained, tmp_path: Path, dtype: torch.dtype):
    """`.to(torch.float16)`, diffusers' habit: each network runs in its dtype, latents and images come back fp32, and
    an export of it holds fp32 weights."""
    _, ckpt, _ = trained
    full = LatentDiffusionPipeline.from_pretrained(ckpt)
    half = LatentDiffusionPipeline.from_pretrained(ckpt).to(dtype)
    kwargs = {"sampler": "ddim", "num_steps": 3, "guidance_scale": 3.0}
    with torch.no_grad():
        expected, images = full.generate(CAPTIONS, [0, 1], **kwargs), half.generate(CAPTIONS, [0, 1], **kwargs)
        latents = half.encode(images)
    assert images.dtype == latents.dtype == torch.float32 and (images - expected).abs().max() < 0.05
    export = half.save_pretrained(tmp_path / "export")
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(export / "model.safetensors")).values() if v.is_floating_point()} == \
        {torch.float32}


def test_ldm_eval_runs_on_an_export_with_the_training_val_shards(trained, tmp_path: Path, shapes_shards: Path,
                                                                  monkeypatch: pytest.MonkeyPatch):
    """An export records its validation shards, as absolute paths; ldm-eval without val_shards takes its prompts
    from them, and names val_shards when they are not where the export says. Too many sampling steps for the model's
    schedule stop the evaluation before anything is computed."""
    from ldm.data.shardlist import absolute_spec

    _, ckpt, export = trained
    monkeypatch.chdir(shapes_shards.parent)
    assert absolute_spec(f"{shapes_shards.name}/val-*.tar") == str(shapes_shards / "val-*.tar")
    assert absolute_spec(["a-{0..1}.tar::pipe:cat b.tar"]) == [f"{shapes_shards.parent}/a-{{0..1}}.tar::pipe:cat b.tar"]
    pipeline = LatentDiffusionPipeline.from_pretrained(ckpt)
    pipeline.provenance["val_shards"] = str(shapes_shards / "val-*.tar")
    pipeline.save_pretrained(tmp_path / "with_shards")
    options = {"ckpt_path": str(tmp_path / "with_shards"), "output_dir": str(tmp_path / "eval"), "num_samples": 4,
               "batch_size": 4, "num_steps": [2], "guidance_scales": [1.0], "metrics": ["shapes_color_accuracy"]}
    rows = evaluate(options)
    assert len(rows) == 1 and rows[0]["checkpoint_step"] == 2 and rows[0]["weights"] == "ema"
    assert rows[0]["prompts"] and 0.0 <= rows[0]["shapes_color_accuracy"] <= 1.0
    with pytest.raises(ConfigError, match=r"num_steps=5000 must lie in \[1, 1000\]"):
        evaluate({**options, "num_steps": [5000]})
    with pytest.raises(ConfigError, match="use_ema=false"):  # before the checkpoint listed first is evaluated
        evaluate({**options, "ckpt_path": [str(ckpt), str(tmp_path / "with_shards")], "use_ema": False,
                  "output_dir": str(tmp_path / "eval_raw")})
    assert not (tmp_path / "eval_raw" / "results.jsonl").exists()
    pipeline.provenance["val_shards"] = "runs/elsewhere/val-*.tar"  # relative, as exports before this fix kept it
    pipeline.save_pretrained(tmp_path / "moved")
    with pytest.raises(ConfigError, match="val_shards is not set and the validation shards the model was trained "
                                          "with are not here"):
        evaluate({**options, "ckpt_path": str(tmp_path / "moved")})


def test_class_labels_for_the_unets_own_table_reach_the_unets_device(tmp_path: Path):
    """`class_embed=unet`: the conditioner holds no parameters, so `.to(device)` cannot move it, and the labels it
    returned stayed on the CPU beside a GPU's UNet (sampling stopped at the first guided step). 'meta' stands in for a
    GPU here."""
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.nn.unet import unet_config

    unet = asdict(unet_config("tiny", context_dim=None, num_classes=3))
    module = LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "unet": unet,
                                    "conditioner": {"kind": "class", "num_classes": 3, "class_embed": "unet"},
                                    "ema_decay": None})
    pipeline = module.pipeline.to("meta")
    cond, negative = pipeline.sampling_conditions(None, [0, 2], None, 2)
    assert cond["class_labels"].device.type == "meta" and cond["context"] is None and negative is None
    assert pipeline.conditioner.unconditional(2, pipeline.device)["class_labels"].device.type == "meta"


@pytest.mark.parametrize("conditioner", [{"kind": "none"}, {"kind": "class", "num_classes": 3, "class_embed": "unet"}])
def test_a_checkpoint_of_a_conditioner_without_weights_loads(tmp_path: Path, conditioner: dict):
    """Unconditional models and labels embedded by the UNet's own table keep no conditioner weights: their
    checkpoints load (ldm-sample, ldm-eval, ldm-export of a .ckpt) instead of failing on the missing prefix."""
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export
    from test_eval_helpers import save_checkpoint

    from ldm.nn.unet import unet_config

    unet = asdict(unet_config("tiny", context_dim=None, num_classes=conditioner.get("num_classes")))
    module = LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "unet": unet,
                                    "conditioner": conditioner, "ema_decay": 0.9})
    ckpt = save_checkpoint(module, tmp_path / "model.ckpt", global_step=2)
    pipeline = LatentDiffusionPipeline.from_pretrained(ckpt)
    assert pipeline.provenance["weights"] == "ema"
    for name, value in pipeline.unet.state_dict().items():
        assert torch.equal(value, module.ema.module.state_dict()[name]), name


def test_a_checkpoint_records_its_validation_shards_as_absolute_paths(shapes_shards: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch):
    """Trained with relative shard paths, the checkpoint names the validation shards from anywhere (as the export
    does), so ldm-eval without val_shards finds them from another working directory."""
    from scale_helpers import compose_train, tiny_autoencoder_export, tiny_ldm_overrides, tiny_overrides

    from ldm.cli.train import train

    autoencoder = tiny_autoencoder_export(tmp_path / "ae")
    monkeypatch.chdir(shapes_shards.parent)
    overrides = tiny_overrides(Path(shapes_shards.name), tmp_path / "run", max_steps=1, every=1)
    train(compose_train(overrides + tiny_ldm_overrides(autoencoder)))
    monkeypatch.chdir(tmp_path)
    pipeline = LatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert pipeline.provenance["val_shards"] == str(shapes_shards / "val-*.tar")


def test_a_checkpoint_whose_clip_folder_moved_names_the_way_out(tmp_path: Path):
    """A checkpoint holds its CLIP text encoder's weights but reads the tokenizer where the run found it: with that
    folder gone, the error told the user to set pipeline.conditioner.name_or_path, which no command accepts."""
    from test_eval_helpers import save_checkpoint, tiny_clip

    autoencoder_dir = tiny_autoencoder(tmp_path / "ae")
    clip = tiny_clip(tmp_path / "clip")
    width = 32  # tiny_clip's text width
    module = LatentDiffusionModule(tiny_config(autoencoder_dir, conditioner={"kind": "clip", "name_or_path": str(clip)},
                                               unet={**tiny_config(autoencoder_dir)["unet"], "context_dim": width}))
    ckpt = save_checkpoint(module, tmp_path / "last.ckpt", global_step=1)
    assert LatentDiffusionPipeline.from_pretrained(ckpt).conditioner_config.name_or_path == str(clip)
    # an export's files (ours and diffusers') have the mode open() gives: transformers wrote the text encoder's
    # weights 0600 (safetensors' save_file), unreadable to a colleague's account
    from ldm.convert import save_diffusers
    from ldm.io import umask

    pipeline = module.pipeline
    ours = pipeline.save_pretrained(tmp_path / "export")
    theirs = save_diffusers(tmp_path / "diffusers", pipeline.unet, pipeline.autoencoder, pipeline.latent_scale,
                            pipeline.diffusion.schedule, pipeline.diffusion.prediction,
                            text_encoder=pipeline.conditioner.encoder)
    for folder in (ours, theirs):
        modes = {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")
                 if p.is_file()}
        assert "text_encoder/model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask()}, modes
    clip.rename(tmp_path / "clip_moved")
    with pytest.raises(ConfigError, match=r"ckpt_path=.*last\.ckpt: its text encoder's tokenizer is read from .*clip, "
                                          r"where the run found it, .* give the run's export \(<run>/export"):
        LatentDiffusionPipeline.from_pretrained(ckpt)


def test_a_fine_tuned_text_encoder_trains_with_its_dropout_and_samples_without_it(tmp_path: Path):
    """transformers loads models in eval mode: a trainable encoder fine-tuned without its dropout until the image
    logger's `.train(was_training)` switched it on mid-run (so a resumed run differed). And `generate` encoded the
    prompts in eval mode but the empty prompt of guidance in the pipeline's own mode: two calls differed."""
    from convert_helpers import perturb, tiny_tokenizer
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_tokenizer(tmp_path / "t5")
    tokenizer.save_pretrained(tmp_path / "t5")
    T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4,
                            dropout_rate=0.5)).save_pretrained(tmp_path / "t5")
    conditioner = {"kind": "hf", "name_or_path": str(tmp_path / "t5"), "trainable": True, "max_length": 16}
    module = LatentDiffusionModule(tiny_config(tiny_autoencoder(tmp_path / "ae"), conditioner=conditioner,
                                               ema_decay=None))
    encoder = module.pipeline.conditioner.encoder
    assert all(m.training for m in encoder.modules())
    frozen = LatentDiffusionModule(tiny_config(tiny_autoencoder(tmp_path / "ae"), ema_decay=None,
                                               conditioner={**conditioner, "trainable": False})).train()
    assert not any(m.training for m in frozen.pipeline.conditioner.encoder.modules())

    perturb(module.pipeline.unet, seed=0)  # its zero-initialised output layer would hide the context
    pipeline = module.pipeline.train()
    first, second = (pipeline.generate(CAPTIONS, [0, 1], num_steps=2, guidance_scale=3.0) for _ in range(2))
    assert torch.equal(first, second) and pipeline.conditioner.training
