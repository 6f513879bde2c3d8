"""Whole tiny Stable Diffusion pipelines (diffusers UNet + VAE + DDIM scheduler, transformers CLIP + tokenizer):
imported with `load_components`, exported with `save_diffusers` / `save_single_file`, loaded back by
`StableDiffusionPipeline.from_pretrained` / `from_single_file`; SD 1 (CLIP layout) and SD 2 (OpenCLIP layout)."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest
import torch
from convert_helpers import (
    max_diff,
    tiny_clip,
    tiny_sd_pipeline,
    tiny_tokenizer,
    unet_inputs,
)

from ldm.convert import load_components, save_diffusers, save_single_file
from ldm.convert.load import load_single_file
from ldm.diffusion.schedule import NoiseSchedule, ScheduleConfig
from ldm.io import umask
from ldm.modules.latent_diffusion import LatentDiffusionModule

PROMPTS = ["the cat", "a photo of the moon"]
def _encode(text_encoder, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return text_encoder(ids).last_hidden_state                               # (B, 77, D)


def _check_same_model(parts, pipe, what: str) -> None:
    """UNet, decoder and text encoder of our imported parts against a diffusers pipeline's."""
    unet, vae = parts.build_unet().eval(), parts.build_autoencoder().eval()
    context = _encode(pipe.text_encoder, pipe.tokenizer)
    max_diff(_encode(parts.text_encoder, parts.tokenizer or pipe.tokenizer), context, f"{what}: text encoder")
    x, t, _ = unet_inputs(context.shape[-1])
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        max_diff(unet(x, t, context), pipe.unet(x, t, encoder_hidden_states=context).sample, f"{what}: UNet")
        max_diff(vae.decode(z), pipe.vae.decode(z).sample, f"{what}: decoder")


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_pipeline_round_trip_through_ours(style, tmp_path, single_torch_thread):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = tiny_sd_pipeline(tmp_path, style)
    parts = load_components(tmp_path / style)
    assert parts.latent_scale == 0.18215 and parts.clip_layer == "last"
    # the folder as model.autoencoder_path (and ldm-encode's) gives the size model.init_from of it does: the UNet's
    from ldm.convert import load_autoencoder_any

    assert load_autoencoder_any(tmp_path / style)[0].config.resolution == parts.autoencoder_config.resolution == 16
    if style == "sd1":
        assert parts.prediction == "eps"
        assert (parts.schedule.timestep_spacing, parts.schedule.steps_offset) == ("leading", 1)
        # an old SD 1 config's steps_offset=0 is read as diffusers' pipeline reads it: the same sampled timesteps
        # (its scheduler's config as the pipeline rewrote it, in a DDIM scheduler, ours)
        config = tmp_path / style / "scheduler" / "scheduler_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "steps_offset": 0}))
        theirs = DDIMScheduler.from_config(StableDiffusionPipeline.from_pretrained(tmp_path / style).scheduler.config)
        theirs.set_timesteps(50)
        assert NoiseSchedule(load_components(tmp_path / style).schedule).timesteps(50) == theirs.timesteps.tolist()
    else:
        assert parts.prediction == "v" and parts.schedule.zero_terminal_snr
        assert parts.schedule.timestep_spacing == "trailing"
    _check_same_model(parts, pipe, f"pipeline {style}: diffusers -> ours")
    context, _ = parts.build_text_encoder()(PROMPTS)  # our conditioner's CLIPTextEncoder around the import
    max_diff(context, _encode(pipe.text_encoder, pipe.tokenizer), f"pipeline {style}: diffusers -> CLIPTextEncoder")

    # Export ours as a diffusers folder: StableDiffusionPipeline loads it and every part matches.
    unet, vae = parts.build_unet(), parts.build_autoencoder()
    out = save_diffusers(tmp_path / "export", unet, vae, parts.latent_scale, parts.schedule, parts.prediction,
                         parts.build_text_encoder())
    exported = StableDiffusionPipeline.from_pretrained(out)
    assert type(exported.scheduler).__name__ == "DDIMScheduler"
    assert exported.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    assert exported.vae.config.scaling_factor == parts.latent_scale
    _check_same_model(parts, exported, f"pipeline {style}: ours -> diffusers folder")
    assert load_components(out).schedule == parts.schedule

    # Export ours as one single file: diffusers' single-file loader (local config, offline) gives the same model.
    single = save_single_file(tmp_path / "model.safetensors", unet, vae, parts.latent_scale, parts.schedule,
                              parts.prediction, parts.text_encoder)
    from_single = StableDiffusionPipeline.from_single_file(str(single), config=str(tmp_path / style),
                                                           local_files_only=True)
    _check_same_model(parts, from_single, f"pipeline {style}: ours -> single file -> diffusers from_single_file")

    # And back into ours from the single file, configs restored from its metadata.
    again = load_single_file(single, tokenizer_path=tmp_path / style / "tokenizer")
    assert (again.unet_config, again.autoencoder_config, again.schedule, again.prediction, again.latent_scale) == (
        parts.unet_config, parts.autoencoder_config, parts.schedule, parts.prediction, parts.latent_scale)
    _check_same_model(again, pipe, f"pipeline {style}: single file -> ours")


def test_export_refuses_to_overwrite_and_is_atomic(tmp_path, single_torch_thread):
    from diffusers import StableDiffusionPipeline

    tiny_sd_pipeline(tmp_path, "sd1")
    parts = load_components(tmp_path / "sd1")
    unet, vae = parts.build_unet(), parts.build_autoencoder()
    args = (unet, vae, parts.latent_scale, parts.schedule, parts.prediction)
    out = save_diffusers(tmp_path / "export", *args)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == [None, None]  # no CLIP given: not portable, said so in the index
    loaded = StableDiffusionPipeline.from_pretrained(out, text_encoder=None, tokenizer=None)  # the caller brings one
    # the source UNet's own sample_size (8): diffusers' default size (16 px) survives the round trip; it became the
    # VAE's sample_size / its factor (16), and ours generated at 32 px
    assert loaded.text_encoder is None and loaded.unet.config.sample_size == 8
    assert parts.autoencoder_config.resolution == 16 == LatentDiffusionModule(
        {"init_from": str(tmp_path / "sd1"), "ema_decay": None}).pipeline.image_size
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_diffusers(out, *args)
    # what readers would misread later, refused by both writers before anything is written: load_autoencoder_any's
    # statistics dict as the scale, diffusers' name of a prediction, a schedule as a dict
    for save in (save_diffusers, save_single_file):
        other = tmp_path / "other.safetensors"
        with pytest.raises(TypeError, match=r"stats\['scale_factor'\]"):
            save(other, unet, vae, {"scale_factor": 0.18215}, *args[3:])
        with pytest.raises(ValueError, match=r"prediction='epsilon': ldm's predictions are eps, v and x0 \('epsilon' "
                                             r"is diffusers' name of 'eps'\)"):
            save(other, *args[:4], "epsilon")
        with pytest.raises(TypeError, match=r"schedule must be an ldm\.diffusion\.schedule\.ScheduleConfig, got dict "
                                            r"\(ScheduleConfig\(\*\*d\)"):
            save(other, *args[:3], dataclasses.asdict(parts.schedule), parts.prediction)
        assert not other.exists()
    # of exports killed mid-write / after the swap; and the temp folder of another destination, export.v2, at work
    for leftover in (".export.k1ll3d00.tmp", ".export.sw4pp3d0.old", ".export.v2.w0rk1ng0.tmp"):
        (tmp_path / leftover / "unet").mkdir(parents=True)
        (tmp_path / leftover / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"half")
    save_diffusers(out, *args, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, overwrite=True)
    assert (out / "text_encoder").is_dir()
    # the folder has the mode mkdir gives (mkdtemp's 0700 kept other users of a shared machine out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask()
    shared = tmp_path / "group"  # a group's folder (setgid): the export keeps the bit, so its files get the group
    shared.mkdir()
    os.chmod(shared, 0o2775)
    assert save_diffusers(shared / "export", *args).stat().st_mode & stat.S_ISGID
    # no temp dirs of this destination left behind; the other one's kept
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export.")] == [".export.v2.w0rk1ng0.tmp"]
    with pytest.raises(FileExistsError):
        save_single_file(out / "unet" / "diffusion_pytorch_model.safetensors", *args)
    # the temp file of a single-file export that was killed (kill -9): gone with the next export of that file (it
    # stayed, a hidden copy of the model), another file's kept
    for leftover in (".sd.safetensors.k1ll3d00.tmp", ".sd.safetensors.v2.safetensors.w0rk1ng0.tmp"):
        (tmp_path / leftover).write_bytes(b"half")
    save_single_file(tmp_path / "sd.safetensors", *args)
    assert sorted(p.name for p in tmp_path.glob(".sd.*")) == [".sd.safetensors.v2.safetensors.w0rk1ng0.tmp"]
    # a single file named through a link (a models folder's file linked where tools look): the file it names is
    # replaced, the link kept, and that file's leftover temp removed (the link was replaced, the file kept the old)
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".model.safetensors.k1ll3d00.tmp").write_bytes(b"half")
    (tmp_path / "models" / "model.safetensors").write_bytes(b"old")
    (tmp_path / "linked.safetensors").symlink_to(tmp_path / "models" / "model.safetensors")
    save_single_file(tmp_path / "linked.safetensors", *args, overwrite=True)
    assert (tmp_path / "linked.safetensors").is_symlink()
    assert (tmp_path / "models" / "model.safetensors").stat().st_size > 1000
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["model.safetensors"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").write_text("not a pipeline")
    with pytest.raises(FileExistsError, match="no model_index.json"):  # overwrite replaces pipelines only
        save_diffusers(tmp_path / "run", *args, overwrite=True)
    assert (tmp_path / "run" / "train.log").read_text() == "not a pipeline"
    (tmp_path / "notes.txt").write_text("a file")
    with pytest.raises(FileExistsError, match="notes.txt is a file, not a folder"):  # it was replaced
        save_diffusers(tmp_path / "notes.txt", *args, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "a file"
    # through a link to the export: the folder it names is replaced and the link kept (the link was replaced, the
    # folder kept the old export, with the text encoder this one leaves out)
    (tmp_path / "linked").symlink_to(out)
    save_diffusers(tmp_path / "linked", *args, overwrite=True)
    assert (tmp_path / "linked").is_symlink() and not (out / "text_encoder").exists()


def test_penultimate_layer_exports_as_a_shorter_encoder(tmp_path, single_torch_thread):
    """A UNet trained on CLIP's penultimate layer (SD 2's choice) exports a text encoder without its last block,
    whose last_hidden_state is final_layer_norm(hidden_states[-2])."""
    from ldm.convert import export_text_encoder

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    model = tiny_clip(tokenizer, 32, "gelu", layers=3)
    short, _ = export_text_encoder(model, tokenizer, "penultimate")
    assert short.config.num_hidden_layers == 2
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = model.final_layer_norm(out.hidden_states[-2]) if not hasattr(model, "text_model") else \
            model.text_model.final_layer_norm(out.hidden_states[-2])
        max_diff(short(ids).last_hidden_state, expected, "penultimate CLIP layer -> shortened encoder")


def test_an_sd1_single_file_of_a_penultimate_layer_model_keeps_every_block(tmp_path, single_torch_thread):
    """SD 1 layout readers (A1111, ComfyUI, diffusers' from_single_file) build the whole CLIP from the file and take
    "CLIP skip" from their user: a file cut to the blocks the UNet used left the last one unfilled there. The file
    keeps all three blocks; our loader, told by the metadata, cuts the last one again."""
    from ldm.convert import text
    from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.nn.unet import UNet, UNetConfig

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    clip = tiny_clip(tokenizer, 32, "quick_gelu", layers=3)
    unet = UNet(UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                           num_heads=None, head_dim=16, context_dim=32))
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1))
    path = save_single_file(tmp_path / "sd1.safetensors", unet, vae, 0.18215, ScheduleConfig(), "eps", clip,
                            clip_layer="penultimate")
    from safetensors.torch import load_file

    blocks = {k.split("encoder.layers.")[1].split(".")[0] for k in load_file(str(path)) if k.startswith(
        text.SD1_PREFIX) and "encoder.layers." in k}
    assert blocks == {"0", "1", "2"}
    parts = load_components(path)
    assert parts.text_encoder.config.num_hidden_layers == 2
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        norm = clip.text_model.final_layer_norm if hasattr(clip, "text_model") else clip.final_layer_norm
        expected = norm(clip(ids, output_hidden_states=True).hidden_states[-2])
    max_diff(_encode(parts.text_encoder, tokenizer), expected, "SD 1 single file, penultimate layer -> ours")


def test_sd2_single_file_needs_its_prediction_type(tmp_path, single_torch_thread, caplog):
    """An SD 2 file without metadata or .yaml (our export re-saved by another tool) does not say whether it predicts
    v or eps: the loader leaves it None, `model.init_from` stops naming model.init_prediction, and with it the
    generation size follows (768 px for v). Its text tower is imported with all its blocks."""
    from safetensors.torch import load_file, save_file

    from ldm.config import ConfigError
    from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.nn.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                           num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True))
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1))
    tokenizer = tiny_tokenizer(tmp_path / "tok")
    tokenizer.save_pretrained(tmp_path / "tok")
    clip = tiny_clip(tokenizer, 1024, "gelu", layers=2, head_dim=64)
    path = save_single_file(tmp_path / "sd2.safetensors", unet, vae, 0.18215, ScheduleConfig(), "v", clip)
    save_file(load_file(str(path)), str(tmp_path / "bare.safetensors"))  # the same tensors, no metadata
    parts = load_components(tmp_path / "bare.safetensors")
    assert parts.prediction is None and parts.autoencoder_config.resolution == 512
    # its text tower holds only the blocks the UNet was trained on (no text_projection): imported whole
    assert parts.text_encoder.config.num_hidden_layers == 2
    max_diff(_encode(parts.text_encoder, tokenizer), _encode(clip, tokenizer), "bare SD 2 file -> ours")
    conditioner = {"tokenizer": str(tmp_path / "tok")}
    with pytest.raises(ConfigError, match="set model.init_prediction=v .* or eps"):
        LatentDiffusionModule({"init_from": str(tmp_path / "bare.safetensors"), "conditioner": conditioner})
    parts = load_components(tmp_path / "bare.safetensors", prediction="v")
    assert parts.prediction == "v" and parts.schedule.steps_offset == 1  # SD's defaults for a bare file
    assert parts.autoencoder_config.resolution == 768  # SD 2's v models generate at 768 px
    module = LatentDiffusionModule({"init_from": str(tmp_path / "bare.safetensors"), "init_prediction": "v",
                                    "conditioner": conditioner, "ema_decay": None})
    assert module.config.diffusion.prediction == "v" and module.pipeline.image_size == 768
    LatentDiffusionModule(module.hparams["config"], frozen=module.hparams["frozen"])  # as a checkpoint restores it
    (tmp_path / "bare.yaml").write_text("model:\n  params:\n    parameterization: v\n    linear_start: 0.0015\n"
                                        "    linear_end: 0.0195\n    timesteps: 1000\n")
    parts = load_components(tmp_path / "bare.safetensors")
    assert parts.prediction == "v" and (parts.schedule.beta_start, parts.schedule.beta_end) == (0.0015, 0.0195)
    # a prediction asked for against what the file records (the .yaml, our metadata) is taken, and said (it was
    # taken silently: an eps UNet trained as a v model)
    with caplog.at_level("WARNING", logger="ldm.convert.single_file"):
        assert load_components(tmp_path / "bare.safetensors", prediction="eps").prediction == "eps"
        assert load_components(path, prediction="eps").prediction == "eps"
    assert "bare.safetensors predicts v by the .yaml beside it; taken as predicting eps, as asked" in caplog.text
    assert "sd2.safetensors predicts v by its metadata; taken as predicting eps" in caplog.text
    zero_snr = save_single_file(tmp_path / "zero.safetensors", unet, vae, 0.18215,
                                ScheduleConfig(zero_terminal_snr=True, timestep_spacing="trailing"), "v", clip)
    with pytest.raises(ConfigError, match=r"model\.init_prediction=eps: model\.init_from=.*zero\.safetensors has a "
                                          r"zero-terminal-SNR schedule.*set model\.init_prediction=v, or leave it "
                                          r"unset"):
        LatentDiffusionModule({"init_from": str(zero_snr), "init_prediction": "eps", "conditioner": conditioner})


def test_released_sd2_text_tower_keeps_the_penultimate_layer(tmp_path, single_torch_thread):
    """A released SD 2 file holds OpenCLIP's whole text tower (one block more than SD 2 uses, the projection, the
    logit scale) and no metadata: the import drops what SD 2 never uses and matches diffusers' 23-of-24 encoder."""
    from safetensors.torch import save_file

    from ldm.convert import text

    tokenizer = tiny_tokenizer(tmp_path / "tok")
    tokenizer.save_pretrained(tmp_path / "tok")
    used = tiny_clip(tokenizer, 64, "gelu", layers=2, head_dim=64)  # a file has no head count: CLIP's 64 wide
    flat = {k.removeprefix("text_model."): v for k, v in used.state_dict().items() if not k.endswith("position_ids")}
    tower = text.flat_to_openclip(flat)
    extra = {k.replace("resblocks.1.", "resblocks.2."): torch.randn_like(v) for k, v in tower.items()
             if k.startswith("transformer.resblocks.1.")}
    released = {**tower, **extra, "text_projection": torch.randn(64, 64), "logit_scale": torch.tensor(4.6)}
    save_file({f"cond_stage_model.model.{k}": v.contiguous() for k, v in released.items()},
              str(tmp_path / "v2-1.safetensors"))
    parts = load_components(tmp_path / "v2-1.safetensors", tokenizer_path=tmp_path / "tok")
    assert parts.text_encoder.config.num_hidden_layers == 2 and parts.text_encoder.config.hidden_act == "gelu"
    max_diff(_encode(parts.text_encoder, parts.tokenizer), _encode(used, tokenizer), "released SD 2 text tower -> ours")


def test_a_pipeline_folder_saved_as_its_fp16_variant_loads_whole(tmp_path, single_torch_thread):
    """Folders saved as their fp16 variant alone (`save_pretrained(variant="fp16")`, the hub's fp16 files) name every
    weights file *.fp16.safetensors: UNet, VAE and the text encoder load, in fp32, equal to the fp16 weights."""
    pipe = tiny_sd_pipeline(tmp_path, "sd1").to(torch.float16)
    pipe.save_pretrained(tmp_path / "fp16", variant="fp16")
    parts = load_components(tmp_path / "fp16")
    assert parts.text_encoder is not None and parts.text_encoder.dtype == torch.float32
    theirs, ours = pipe.text_encoder.state_dict(), parts.text_encoder.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)
    assert parts.unet_state["conv_in.weight"].dtype == torch.float16 and parts.build_unet() is not None


def test_a_pipeline_as_the_conditioners_encoder_takes_its_layer_and_a_folder_without_vocabulary_is_refused(
        tmp_path, single_torch_thread):
    """`model.conditioner.name_or_path` = a pipeline folder: `layer=penultimate` is the encoder's hidden_states[-2]
    through its final LayerNorm ("CLIP skip"), as on the text_encoder/ folder itself. That folder alone holds no
    tokenizer files: transformers would build a tokenizer of its 2 special tokens (every word one unknown id), which
    is refused naming the key."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm.conditioning import build_conditioner
    from ldm.conditioning.text import CLIPTextEncoder
    from ldm.config import ConfigError

    pipe = tiny_sd_pipeline(tmp_path, "sd1")
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        expected = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm(hidden)
        context = build_conditioner({"kind": "clip", "name_or_path": str(tmp_path / "sd1"),
                                     "layer": "penultimate"})(PROMPTS)["context"]
    max_diff(context, expected, "pipeline folder, layer=penultimate")
    with pytest.raises(ConfigError, match=r"name_or_path=.*cannot load CLIPTokenizer: .*no tokenizer files"):
        build_conditioner({"kind": "clip", "name_or_path": str(tmp_path / "sd1" / "text_encoder")})
    with pytest.raises(ConfigError, match=r"tokenizer=.*sd1 is a pipeline folder, whose tokenizer is its tokenizer/"):
        build_conditioner({"kind": "clip", "name_or_path": str(tmp_path / "sd1" / "text_encoder"),
                           "tokenizer": str(tmp_path / "sd1")})
    smaller = CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                                           num_attention_heads=3))  # the pipeline's tokenizer is not its pair
    with pytest.raises(ConfigError, match=r"tokenizer's 516 tokens exceed the text encoder's vocabulary of 100"):
        CLIPTextEncoder("ours", transformer=smaller, tokenizer=pipe.tokenizer)


def test_a_text_unet_started_from_a_file_without_its_encoder_on_a_new_byte_encoder_is_warned(tmp_path,
                                                                                             single_torch_thread):
    """ldm-export's diffusers / single-file output of a model that trained its byte encoder holds no text encoder;
    `model.init_from` of it with the default (new, random) byte encoder paired the trained UNet with random tokens,
    saying only "replaced model.unet"."""
    from ldm.config import ConfigError
    from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm.nn.unet import UNet, UNetConfig

    unet = UNet(UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                           num_heads=2, context_dim=32, norm_groups=8))
    vae = AutoencoderKL(AutoencoderConfig(resolution=16, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8))
    path = save_single_file(tmp_path / "model.safetensors", unet, vae, 0.8, ScheduleConfig(), "eps")
    conditioner = {"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 2, "max_length": 16}
    with pytest.warns(UserWarning, match=r"model\.init_from=.*model\.safetensors holds the UNet but no conditioner "
                                         r".*model\.conditioner starts as new byte text encoder \(name_or_path null\), "
                                         r"random"):
        LatentDiffusionModule({"init_from": str(path), "conditioner": conditioner, "ema_decay": None})
    with pytest.warns(UserWarning, match=r"starts as new class embeddings, random"):  # (the same for them)
        LatentDiffusionModule({"init_from": str(path), "conditioner": {"kind": "class", "num_classes": 3, "width": 32},
                               "ema_decay": None})
    # UNets without cross-attention: the hint named a CLIP "of hidden size None", or model.unet keys init_from replaces
    # (and a class conditioner for a pooled-prompt UNet was told to set what it had; labels with a context: no kind)
    cases = ((dict(num_classes=3, context_dim=None), r"model\.conditioner\.kind=class model\.conditioner\.class_embed"
                                                     r"=unet model\.conditioner\.num_classes=3$"),
             (dict(context_dim=None), r"\(context_dim=None, num_classes=None, pooled_dim=None\) does not take what "
                                      r"model\.conditioner \(kind=byte\) gives .*: set model\.conditioner\.kind=none$"),
             (dict(context_dim=32, pooled_dim=32, attention_levels=[1], mid_attention=True, num_heads=2),
              r"set a text encoder 32 wide .* with model\.conditioner\.pooled=true$"),
             (dict(context_dim=32, num_classes=3, attention_levels=[1], mid_attention=True, num_heads=2),
              r"no kind of model\.conditioner gives both a context 32 wide and class labels"),
             (dict(context_dim=None, pooled_dim=32), r"no kind of model\.conditioner gives a pooled vector 32 wide "
                                                     r"without a context"))
    for i, (layout, want) in enumerate(cases):
        other = UNet(UNetConfig(**{**dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=8,
                                          attention_levels=[], mid_attention=False), **layout}))
        path = save_single_file(tmp_path / f"other{i}.safetensors", other, vae, 0.8, ScheduleConfig(), "eps")
        with pytest.raises(ConfigError, match=want):
            LatentDiffusionModule({"init_from": str(path), "ema_decay": None,
                                   "conditioner": {"kind": "class", "num_classes": 3, "width": 32} if i >= 2 else
                                   conditioner})
