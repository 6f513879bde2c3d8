"""Stable Diffusion through the whole stack: `model.init_from` imports a (tiny) diffusers pipeline, our `generate`
equals diffusers' StableDiffusionPipeline on our export, `ldm-train` fine-tunes the import, `ldm-export` hands the
result back to diffusers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import SD1_UNET, diffusers_unet, max_diff, perturb, tiny_sd_pipeline
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ldm.cli.common import CONF_DIR
from ldm.cli.export import export
from ldm.cli.train import train
from ldm.config import ConfigError
from ldm.convert import load_components, save_diffusers, save_single_file
from ldm.diffusion.schedule import NoiseSchedule
from ldm.modules.latent_diffusion import LatentDiffusionModule
from ldm.pipeline import LatentDiffusionPipeline
from ldm.seeding import StackedRandomGenerator

PROMPTS = ["the cat", "a photo of the moon"]


def test_our_generate_equals_diffusers_on_our_export(tmp_path: Path, single_torch_thread):
    """Same initial latents, DDIM 10 steps, guidance 5: the same images from our pipeline and from diffusers'
    StableDiffusionPipeline loading our ldm-export output. The composed config's prompt length (model=ldm/tiny's 72)
    gives way to the encoder's 77 positions; its UNet training switches stay."""
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline(tmp_path, "sd1")
    switches = LatentDiffusionModule({"init_from": str(tmp_path / "sd1"), "ema_decay": None,
                                      "unet": {"gradient_checkpointing": True, "dropout": 0.1}}).pipeline.unet.config
    assert switches.gradient_checkpointing and switches.dropout == 0.1 and switches.context_dim == 48
    module = LatentDiffusionModule({"init_from": str(tmp_path / "sd1"), "ema_decay": None,
                                    "conditioner": {"max_length": 72}})
    c = module.config
    assert c.conditioner.kind == "clip" and c.diffusion.prediction == "eps" and c.unet.context_dim == 48
    assert c.conditioner.max_length == 77
    assert (c.diffusion.schedule.timestep_spacing, c.diffusion.schedule.steps_offset) == ("leading", 1)
    assert module.pipeline.latent_scale == 0.18215
    ours = module.pipeline.save_pretrained(tmp_path / "ours")                  # text_encoder/ travels with it
    hf_dir = export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    pipeline = LatentDiffusionPipeline.from_pretrained(ours)
    hf = StableDiffusionPipeline.from_pretrained(hf_dir)

    seeds = [3, 4]
    # what our generate starts from, at both pipelines' default size: the UNet's sample_size (8) x the VAE's factor
    latents = StackedRandomGenerator(seeds).randn((2, 4, 8, 8))
    with torch.no_grad():
        mine = pipeline.generate(PROMPTS, seeds, sampler="ddim", num_steps=10, guidance_scale=5.0)
        theirs = hf(PROMPTS, latents=latents, num_inference_steps=10, guidance_scale=5.0, output_type="pt").images
    max_diff((mine + 1) / 2, theirs, "DDIM 10 steps, guidance 5: ours vs diffusers, [0, 1] pixels", tol=1e-3)
    negative = ["a photo of the moon", "the cat"]  # guidance away from these instead of from the empty prompt
    with torch.no_grad():
        mine = pipeline.generate(PROMPTS, seeds, sampler="ddim", num_steps=10, guidance_scale=5.0,
                                 negative_prompts=negative)
        theirs = hf(PROMPTS, negative_prompt=negative, latents=latents, num_inference_steps=10, guidance_scale=5.0,
                    output_type="pt").images
    max_diff((mine + 1) / 2, theirs, "negative prompts: ours vs diffusers, [0, 1] pixels", tol=1e-3)


def test_init_from_keeps_the_penultimate_layer_asked_for(tmp_path: Path, single_torch_thread, caplog):
    """`model.conditioner.layer=penultimate` ("CLIP skip", as with the model as name_or_path) was replaced by the
    import's own layer under init_from, and the run recorded and exported `last`. The line saying what init_from
    replaced names the keys of each node (it said "model.conditioner", not which of its keys)."""
    import logging

    from transformers import CLIPTextModel, CLIPTokenizer

    tiny_sd_pipeline(tmp_path, "sd1")
    with caplog.at_level(logging.INFO):
        module = LatentDiffusionModule({"init_from": str(tmp_path / "sd1"), "ema_decay": None,
                                        "conditioner": {"kind": "clip", "layer": "penultimate"}})
    assert module.config.conditioner.layer == "penultimate"
    assert "; replaced model.unet (model_channels, channel_mult, " in caplog.text
    assert "model.conditioner (name_or_path), model.diffusion.schedule (timestep_spacing, steps_offset)" in caplog.text
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "sd1" / "tokenizer")
    reference = CLIPTextModel.from_pretrained(tmp_path / "sd1" / "text_encoder").eval()
    ids = tokenizer(PROMPTS, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = reference(ids, output_hidden_states=True).hidden_states[-2]
        want = reference.final_layer_norm(hidden)
        context, _ = module.pipeline.conditioner.encoder(PROMPTS)
    max_diff(context, want, "init_from with layer=penultimate: CLIP's hidden_states[-2] + final_layer_norm", tol=1e-5)


def test_ldm_train_fine_tunes_an_import_and_diffusers_loads_the_export(tmp_path: Path, shapes_shards: Path):
    """`model=ldm/tiny model.init_from=P` trains the imported model for a few CPU steps; `ldm-export` writes a
    diffusers folder of the fine-tuned weights that StableDiffusionPipeline loads and runs."""
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline(tmp_path, "sd1")
    run = tmp_path / "run"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=ldm/tiny", f"model.init_from={tmp_path / 'sd1'}", "model.lr=1e-3", "model.warmup_steps=0",
            "model.val_num_steps=2", f"data.train_shards={shapes_shards}/train-*.tar",
            f"data.val_shards={shapes_shards}/val-*.tar", "data.resolution=32", "data.batch_size=2",
            "data.num_workers=0", "model.image_size=48", "trainer=cpu", "trainer.max_steps=2",
            "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "logger=csv", f"paths.output_dir={run}", "callbacks.progress=null"])
    train(cfg)
    before = load_components(tmp_path / "sd1")
    saved = OmegaConf.load(run / "config.yaml").model  # what the run built, not model=ldm/tiny's layout it replaced
    assert list(saved.unet.channel_mult) == before.unet_config.channel_mult != list(cfg.model.unet.channel_mult)
    assert saved.conditioner.kind == "clip" and saved.conditioner.name_or_path == str(tmp_path / "sd1")
    # The checkpoint holds every weight: of the SD folder it started from, only the tokenizer is read again.
    for part in ("text_encoder", "unet", "vae", "scheduler"):
        shutil.rmtree(tmp_path / "sd1" / part)
    out = export({"ckpt_path": str(run / "checkpoints" / "last.ckpt"), "format": "diffusers",
                  "output_dir": str(tmp_path / "hf")})
    hf = StableDiffusionPipeline.from_pretrained(out)
    after = load_components(out)
    assert all(torch.equal(v, before.text_encoder.state_dict()[k]) for k, v in after.text_encoder.state_dict().items())
    changed = [k for k, v in after.unet_state.items() if not torch.equal(v, before.unet_state[k])]
    assert changed, "the exported UNet should hold the fine-tuned weights"
    assert all(torch.equal(v, before.autoencoder_state[k]) for k, v in after.autoencoder_state.items())  # frozen
    images = hf(PROMPTS, num_inference_steps=2, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 3, 48, 48) and torch.isfinite(images).all()  # model.image_size: diffusers' default


def vae_without(tmp_path: Path, key: str) -> Path:
    """A copy of the tiny SD pipeline's vae/ lacking one tensor."""

    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "sd1" / "vae", tmp_path / "bad_vae")
    weights = tmp_path / "bad_vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    del state[key]
    save_file(state, str(weights))
    return tmp_path / "bad_vae"


def test_relative_paths_are_recorded_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              single_torch_thread):
    """The README's commands give relative paths (model.init_from=models/stable-diffusion-v1-5): a checkpoint re-reads
    the CLIP tokenizer from the recorded path, so a relative one broke ldm-export and ldm-sample run from another
    directory (or read another folder of that name there)."""
    tiny_sd_pipeline(tmp_path, "sd1")
    monkeypatch.chdir(tmp_path)
    module = LatentDiffusionModule({"init_from": "sd1", "ema_decay": None})
    recorded = module.hparams["config"]
    where = str((tmp_path / "sd1").resolve())
    assert recorded["init_from"] == where and recorded["conditioner"]["name_or_path"] == where
    assert module.config.conditioner.name_or_path == where


def test_init_from_a_damaged_or_misused_folder_is_named(tmp_path: Path, single_torch_thread):
    """A pipeline folder missing its scheduler, tokenizer, text encoder or its weights, or given single-file options:
    one ConfigError naming what is wrong and what to do, before any training (a missing text_encoder/ was passed over
    for the config's hub CLIP, and the error named model.conditioner.name_or_path)."""
    tiny_sd_pipeline(tmp_path, "sd1")

    def folder(name, drop):
        shutil.copytree(tmp_path / "sd1", tmp_path / name)
        target = tmp_path / name / drop
        shutil.rmtree(target) if target.is_dir() else target.unlink()
        return {"init_from": str(tmp_path / name), "ema_decay": None}

    cases = [({"init_from": str(tmp_path / "sd1"), "init_ema": True}, "init_ema are for single files"),
             ({"init_from": str(tmp_path / "sd1"), "init_prediction": "v"}, "init_prediction and model.init_ema"),
             (folder("no_scheduler", "scheduler"), r"no scheduler/scheduler_config\.json, .* restore it"),
             (folder("no_tokenizer", "tokenizer"), r"holds no tokenizer .* set model\.conditioner\.tokenizer"),
             (folder("no_weights", "text_encoder/model.safetensors"), "cannot load the CLIP text encoder"),
             (folder("no_text_encoder", "text_encoder"), r"lists a text encoder, but the folder has no text_encoder/"),
             # with two SD sources in one config, the error names the one at fault
             ({"init_from": str(tmp_path / "sd1"), "autoencoder_path": str(tmp_path / "sd1" / "scheduler")},
              r"^model\.autoencoder_path=.*scheduler is neither"),
             ({"init_from": str(tmp_path / "sd1"),
               "autoencoder_path": str(vae_without(tmp_path, "decoder.conv_out.bias"))},
              r"^model\.autoencoder_path=.*bad_vae: .*missing keys \(1\): decoder\.conv_out\.bias"),
             # class labels beside the text: no conditioner gives both (the hint was to edit the replaced model.unet)
             (with_unet(tmp_path, "classes", num_class_embeds=3),
              r"takes class labels \(a class embedding table\) beside the CLIP"),
             # a projection of another width than CLIP's pooled vector: not a pooled-prompt UNet (the hint was to
             # edit the replaced model.unet)
             (with_unet(tmp_path, "projection16", class_embed_type="projection",
                        projection_class_embeddings_input_dim=16),
              r"projects a vector of width 16 .* pooled prompt vector is 48 wide"),
             # a class-conditional or unconditional model asked for: it became a CLIP text model silently
             ({"init_from": str(tmp_path / "sd1"), "conditioner": {"kind": "class", "num_classes": 10}},
              r"holds a text-to-image model, whose CLIP text encoder becomes model\.conditioner: "
              r"model\.conditioner\.kind=class cannot apply"),
             ({"init_from": str(tmp_path / "sd1"), "conditioner": {"num_classes": 10}},
              r"model\.conditioner\.num_classes=10 cannot apply; leave model\.conditioner\.kind"),
             # the tokenizer's errors named the Python argument tokenizer_path, and a pipeline folder given for its
             # tokenizer/ was told to be a tokenizer like openai/clip-vit-large-patch14
             # one level too deep: told to restore a scheduler/ (unet/) or that it is an export of another kind
             ({"init_from": str(tmp_path / "sd1" / "unet")},
              r"init_from=.*sd1/unet is the unet/ folder of the diffusers pipeline .*sd1: set model\.init_from=.*sd1$"),
             ({"init_from": str(tmp_path / "sd1" / "text_encoder")}, r"is the text_encoder/ folder of the diffusers"),
             ({"init_from": str(tmp_path / "sd1"), "conditioner": {"tokenizer": str(tmp_path / "sd1" / "tokenizr")}},
              r"^model\.conditioner\.tokenizer=.*tokenizr is not a directory"),
             ({"init_from": str(tmp_path / "sd1"), "conditioner": {"tokenizer": str(tmp_path / "sd1")}},
              r"^model\.conditioner\.tokenizer=.*sd1 is a pipeline folder, whose tokenizer is its tokenizer/ folder: "
              r"set model\.conditioner\.tokenizer=.*sd1/tokenizer$"),
             ({"autoencoder_path": str(tmp_path / "sd1" / "vae"),  # the pipeline's CLIP as a transformers folder
               "conditioner": {"kind": "clip", "name_or_path": str(tmp_path / "sd1" / "text_encoder"),
                               "tokenizer": str(tmp_path / "sd1")}},
              r"^model\.conditioner\.tokenizer=.*sd1 is a pipeline folder, whose tokenizer is its tokenizer/ folder"),
             # CLIP skip with model=ldm/tiny's byte conditioner: the refusal names the way
             ({"init_from": str(tmp_path / "sd1"), "conditioner": {"layer": "penultimate"}},
              r"for a Stable Diffusion model's in model\.init_from, set kind=clip too")]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            LatentDiffusionModule(config)


def test_errors_of_an_imported_clip_name_the_caller_s_keys(tmp_path: Path):
    """ldm-encode builds its text encoder under `text_encoder.*`: the errors of a Stable Diffusion source named
    model.conditioner keys, and the default CLIP for the source."""
    tiny_sd_pipeline(tmp_path, "sd1")
    parts = load_components(tmp_path / "sd1")
    with pytest.raises(ConfigError, match=r"text_encoder\.max_length=100 exceeds the 77 positions of diffusers "
                                          r"pipeline .*sd1"):
        parts.build_text_encoder(max_length=100, prefix="text_encoder")
    parts.tokenizer = None  # as a single file holds none
    with pytest.raises(ConfigError, match=r"holds no tokenizer .*: set text_encoder\.tokenizer"):
        parts.build_text_encoder(prefix="text_encoder")


def with_unet(tmp_path: Path, name: str, **changes) -> dict:
    """A copy of the sd1 pipeline whose UNet has these diffusers config `changes` (random weights)."""
    shutil.copytree(tmp_path / "sd1", tmp_path / name)
    shutil.rmtree(tmp_path / name / "unet")
    diffusers_unet({**SD1_UNET, **changes}).save_pretrained(tmp_path / name / "unet")
    return {"init_from": str(tmp_path / name), "ema_decay": None}


def test_leading_spacing_off_sds_offset_is_read_as_diffusers_reads_it(tmp_path: Path, caplog):
    """StableDiffusionPipeline rewrites a scheduler's steps_offset to 1 on load: with leading spacing and offset 0
    every timestep it visited was one past ours (0.03 apart in pixels at 10 steps), without a word. The export says
    so; an import of such a folder takes 1, as diffusers does, and says so."""
    import logging

    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline(tmp_path, "sd1")
    ours = LatentDiffusionModule({"init_from": str(tmp_path / "sd1"), "ema_decay": None}).pipeline.save_pretrained(
        tmp_path / "ours")
    config = json.loads((ours / "config.json").read_text())
    config["diffusion"]["schedule"]["steps_offset"] = 0
    (ours / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="ldm"):
        hf_dir = export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
        assert "leading spacing with steps_offset=0" in caplog.text and "rewrites it to 1" in caplog.text
        parts = load_components(hf_dir)
        assert "steps_offset=0 read as 1" in caplog.text
    hf = StableDiffusionPipeline.from_pretrained(hf_dir)
    hf.scheduler.set_timesteps(10)
    assert LatentDiffusionPipeline.from_pretrained(ours).schedule.timesteps(10)[0] == 900  # ours, offset 0
    assert hf.scheduler.timesteps.tolist() == NoiseSchedule(parts.schedule).timesteps(10) == list(range(901, 0, -100))


def test_the_export_of_a_pooled_prompt_unet_says_what_diffusers_cannot_feed(tmp_path: Path, caplog):
    """The quickstart's UNet adds the pooled prompt vector to its time embedding: diffusers' class_embed_type
    'projection', which StableDiffusionPipeline never feeds; the export says so, beside the byte encoder's notice."""
    import logging
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.nn.unet import unet_config

    unet = asdict(unet_config("tiny", context_dim=32, pooled_dim=32))
    module = LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "unet": unet,
                                    "conditioner": {"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 2,
                                                    "pooled": True}, "ema_decay": None})
    ours = module.pipeline.save_pretrained(tmp_path / "ours")
    with caplog.at_level(logging.WARNING, logger="ldm.cli.export"):
        out = export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    assert json.loads((Path(out) / "unet" / "config.json").read_text())["class_embed_type"] == "projection"
    assert "StableDiffusionPipeline does not pass it" in caplog.text and "class_labels=<pooled vectors (B, 32)>" \
        in caplog.text and "not portable" in caplog.text


def _refused_by_diffusers_and_flagged_in_a_single_file(ours: Path, tmp_path: Path, caplog, reason: str) -> Path:
    """ldm-export of `ours`: format=diffusers refused for `reason`; format=single_file written, warning that diffusers'
    from_single_file cannot load it for that reason. Returns the file."""
    import logging
    import re

    from ldm.convert.common import UnsupportedCheckpointError

    with pytest.raises(UnsupportedCheckpointError, match=re.escape(reason)):
        export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    with caplog.at_level(logging.WARNING, logger="ldm.cli.export"):
        single = export({"ckpt_path": str(ours), "format": "single_file", "output_dir": str(tmp_path / "single")})
    assert "diffusers' from_single_file cannot load the file (ldm's loaders can), for the reason format=diffusers " \
           f"refuses this UNet: export of the UNet to diffusers: {reason}" in caplog.text
    return Path(single)


def test_a_unet_without_cross_attention_is_refused_by_the_diffusers_export_and_flagged_in_a_single_file(
        tmp_path: Path, caplog):
    """A class-conditional UNet with its label table inside (class_embed=unet, no context): diffusers has no such
    UNet2DConditionModel, and the original SD code no transformer without cross-attention, so format=diffusers
    refuses it and format=single_file writes a file that says only ldm reads it."""

    from scale_helpers import tiny_class_model_export


    single = _refused_by_diffusers_and_flagged_in_a_single_file(tiny_class_model_export(tmp_path), tmp_path, caplog,
                                                                "context_dim=None (no cross-attention)")
    assert "no cross-attention (model.unet.context_dim=null), a layout the original Stable Diffusion code does not " \
           "build: A1111 and ComfyUI cannot load the file" in caplog.text
    from ldm.convert.load import load_single_file
    assert load_single_file(single).unet_config.num_classes == 3  # ours reads it


def test_a_unet_whose_first_level_is_wider_than_model_channels_is_flagged_in_a_single_file(tmp_path: Path, caplog):
    """channel_mult[0] != 1 (LDM's own UNet builds it): diffusers sizes conv_in from the first level's width, so
    format=diffusers refuses it and a single file says that diffusers' from_single_file cannot convert it; ldm's
    loaders read the file back."""
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.convert.load import load_single_file
    from ldm.nn.unet import unet_config

    unet = asdict(unet_config("tiny", model_channels=16, channel_mult=[2, 4]))
    module = LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "unet": unet,
                                    "conditioner": {"kind": "byte", "width": 64, "num_layers": 1, "num_heads": 2},
                                    "ema_decay": None})
    single = _refused_by_diffusers_and_flagged_in_a_single_file(module.pipeline.save_pretrained(tmp_path / "ours"),
                                                                tmp_path, caplog, "channel_mult[0]=2 (not 1)")
    assert "a layout the original Stable Diffusion code does not build" not in caplog.text  # LDM's code builds it
    assert load_single_file(single).unet_config.channel_mult == [2, 4]


def test_init_from_reads_back_our_export_of_a_clip_unet_with_the_pooled_prompt(tmp_path: Path, single_torch_thread):
    """A CLIP-conditioned UNet that also takes CLIP's pooled vector (model.conditioner.pooled=true,
    model.unet.pooled_dim=48) goes out as class_embed_type 'projection' and comes back through model.init_from from
    either format with the pooled vector fed again: the same prediction as the model exported."""
    from dataclasses import asdict

    from ldm.nn.unet import unet_config

    tiny_sd_pipeline(tmp_path, "sd1")
    config = {"autoencoder_path": str(tmp_path / "sd1"), "ema_decay": None,
              "unet": asdict(unet_config("tiny", context_dim=48, pooled_dim=48)),
              "conditioner": {"kind": "clip", "name_or_path": str(tmp_path / "sd1"), "pooled": True}}
    module = LatentDiffusionModule(config)
    perturb(module.pipeline.unet, seed=0)  # past the zero-initialised output convolution
    ours = module.pipeline.save_pretrained(tmp_path / "ours")
    x, t = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 600])

    def predict(pipeline: LatentDiffusionPipeline) -> torch.Tensor:
        pipeline.eval()  # no prompt dropping
        with torch.no_grad():
            cond = pipeline.conditioner(PROMPTS)
            assert cond["pooled"] is not None and cond["pooled"].shape == (2, 48)
            return pipeline.unet(x, t, **cond)

    expected = predict(module.pipeline)
    for fmt in ("diffusers", "single_file"):
        out = export({"ckpt_path": str(ours), "format": fmt, "output_dir": str(tmp_path / fmt)})
        imported = LatentDiffusionModule({"init_from": str(out), "ema_decay": None,  # a single file has no tokenizer
                                          "conditioner": {"tokenizer": str(tmp_path / "sd1" / "tokenizer")}})
        assert imported.config.conditioner.pooled and imported.config.unet.pooled_dim == 48
        max_diff(predict(imported.pipeline), expected, f"{fmt} export read back by init_from", tol=1e-5)

    # on CLIP's penultimate layer the exports cut the encoder there, which changes its pooled vector: refused
    config["conditioner"]["layer"] = "penultimate"
    pipeline = LatentDiffusionModule(config).pipeline
    penultimate = pipeline.save_pretrained(tmp_path / "penultimate")
    refused = r"penultimate layer as its context and the whole encoder's pooled vector .* no Stable Diffusion format"
    for fmt in ("diffusers", "single_file"):
        with pytest.raises(ConfigError, match=refused):
            export({"ckpt_path": str(penultimate), "format": fmt, "output_dir": str(tmp_path / f"p_{fmt}")})
    parts = (pipeline.unet, pipeline.autoencoder, pipeline.latent_scale, pipeline.diffusion.schedule, "eps")
    for save, out in ((save_diffusers, tmp_path / "api"), (save_single_file, tmp_path / "api.safetensors")):
        with pytest.raises(ConfigError, match=refused):  # the Python API too
            save(out, *parts, text_encoder=pipeline.conditioner.encoder)


def test_a_shorter_prompt_length_travels_with_the_export(tmp_path: Path, caplog, single_torch_thread):
    """A CLIP-conditioned model trained on 16-token prompts (model.conditioner.max_length=16): the diffusers export's
    tokenizer pads to 16, so StableDiffusionPipeline makes our images; our loaders read 16 back from the folder and
    from the single file, which warns that other tools pad to 77."""
    import logging
    from dataclasses import asdict

    from diffusers import StableDiffusionPipeline

    from ldm.convert.load import load_single_file
    from ldm.nn.unet import unet_config

    tiny_sd_pipeline(tmp_path, "sd1")
    module = LatentDiffusionModule({"autoencoder_path": str(tmp_path / "sd1"), "ema_decay": None,
                                    "unet": asdict(unet_config("tiny", context_dim=48)),
                                    "conditioner": {"kind": "clip", "name_or_path": str(tmp_path / "sd1"),
                                                    "max_length": 16}})
    perturb(module.pipeline.unet, seed=0)  # past the zero-initialised output convolution: images depend on prompts
    ours = module.pipeline.save_pretrained(tmp_path / "ours")
    hf_dir = export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    assert module.pipeline.conditioner.encoder.tokenizer.model_max_length != 16  # the export's copy changed, not it
    hf = StableDiffusionPipeline.from_pretrained(hf_dir)
    assert hf.tokenizer.model_max_length == 16
    pipeline = LatentDiffusionPipeline.from_pretrained(ours)
    size = pipeline.image_size // pipeline.autoencoder.downsample_factor  # the SD folder's (its UNet's sample_size)
    latents = StackedRandomGenerator([3, 4]).randn((2, 4, size, size))
    with torch.no_grad():
        mine = pipeline.generate(PROMPTS, [3, 4], sampler="ddim", num_steps=4, guidance_scale=5.0)
        theirs = hf(PROMPTS, latents=latents, num_inference_steps=4, guidance_scale=5.0, output_type="pt").images
    max_diff((mine + 1) / 2, theirs, "16-token prompts: ours vs diffusers, [0, 1] pixels", tol=1e-3)
    assert load_components(hf_dir).prompt_length == 16
    assert LatentDiffusionModule({"init_from": str(hf_dir), "ema_decay": None}).config.conditioner.max_length == 16

    with caplog.at_level(logging.WARNING, logger="ldm.cli.export"):
        single = export({"ckpt_path": str(ours), "format": "single_file", "output_dir": str(tmp_path / "single")})
    assert "prompts are 16 tokens" in caplog.text and "pad them to 77" in caplog.text
    parts = load_single_file(single, tokenizer_path=tmp_path / "sd1" / "tokenizer")
    assert parts.prompt_length == 16 and parts.build_text_encoder().max_length == 16


def test_a_single_file_export_names_what_other_tools_cannot_read_and_a_pipeline_export_stands_alone(
        tmp_path: Path, caplog, single_torch_thread):
    """v prediction, zero terminal SNR and CLIP's penultimate layer are in our metadata only: ldm-export names each
    for the tools that read SD's single files. The pipeline export of a model built with
    `model.conditioner.tokenizer=DIR` (a single file's route) loads once DIR is gone: its tokenizer is exported."""
    import logging
    from dataclasses import asdict

    from ldm.nn.unet import unet_config

    tiny_sd_pipeline(tmp_path, "sd1")
    shutil.copytree(tmp_path / "sd1" / "tokenizer", tmp_path / "tokenizer")
    module = LatentDiffusionModule({
        "autoencoder_path": str(tmp_path / "sd1"), "ema_decay": None,
        "unet": asdict(unet_config("tiny", context_dim=48)),
        "conditioner": {"kind": "clip", "name_or_path": str(tmp_path / "sd1"),
                        "tokenizer": str(tmp_path / "tokenizer"), "layer": "penultimate"},
        "diffusion": {"prediction": "v", "schedule": {"zero_terminal_snr": True, "timestep_spacing": "trailing"}}})
    ours = module.pipeline.save_pretrained(tmp_path / "ours")
    shutil.rmtree(tmp_path / "tokenizer")
    with caplog.at_level(logging.WARNING, logger="ldm.cli.export"):
        export({"ckpt_path": str(ours), "format": "single_file", "output_dir": str(tmp_path / "single")})
    for caveat in ("the UNet predicts v", "zero terminal SNR", "set CLIP skip 2",
                   # what readers rebuild as SD's and then compute wrong (differences of 0.8-1.2 on outputs of ~2)
                   "GroupNorm over 8 groups (model.unet.norm_groups; SD's: 32)",
                   "attention heads model.unet.num_heads=None, model.unet.head_dim=16 (SD's: num_heads=8)",
                   "this autoencoder has GroupNorm over 8 groups (model.net.norm_groups; SD's: 32)"):
        assert caveat in caplog.text, caveat
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ldm.cli.export"):
        export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    assert "readers" not in caplog.text  # a diffusers folder says all of it
    vae = json.loads((tmp_path / "hf" / "vae" / "config.json").read_text())
    assert vae["force_upcast"] is True  # diffusers' default: nothing here says the VAE is safe in fp16


def test_an_export_keeps_its_size_its_fp32_text_encoder_and_its_weights(tmp_path: Path, single_torch_thread):
    """The generation size survives both export formats; a half-precision pipeline saves its CLIP encoder in fp32 as
    the rest; a single file is never written over a pipeline export's own model.safetensors, even with overwrite."""
    from safetensors.torch import load_file

    tiny_sd_pipeline(tmp_path, "sd1")
    module = LatentDiffusionModule({"init_from": str(tmp_path / "sd1"), "ema_decay": None, "image_size": 48})
    ours = module.pipeline.to(torch.float16).save_pretrained(tmp_path / "ours")
    for name in ("model.safetensors", "text_encoder/model.safetensors"):
        assert {v.dtype for v in load_file(str(ours / name)).values() if v.is_floating_point()} == {torch.float32}
    hf_dir = export({"ckpt_path": str(ours), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    single = export({"ckpt_path": str(ours), "format": "single_file", "output_dir": str(tmp_path / "single")})
    tokenizer = {"conditioner": {"tokenizer": str(hf_dir / "tokenizer")}}
    for source, extra in ((hf_dir, {}), (single, tokenizer)):
        assert LatentDiffusionModule({"init_from": str(source), "ema_decay": None, **extra}).pipeline.image_size == 48
    weights = (ours / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="holds another export or model folder .*, whose weights are model"):
        export({"ckpt_path": str(ours), "format": "single_file", "output_dir": str(ours), "overwrite": True})
    assert (ours / "model.safetensors").read_bytes() == weights
