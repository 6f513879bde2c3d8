"""What the converters refuse, each with an error naming the problem and never a half-loaded model: inpainting and
SDXL UNets, VQ autoencoders, keys left over or missing, wrong shapes, and pickled code in a .ckpt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import SD1_UNET, TINY_VAE, diffusers_unet
from safetensors.torch import load_file, save_file

from ldm.config import ConfigError
from ldm.convert import (
    UnsupportedCheckpointError,
    autoencoder_config_from_diffusers,
    load_autoencoder_any,
    load_components,
    save_single_file,
)
from ldm.convert.load import load_unet_diffusers
from ldm.convert.unet import unet_config_from_diffusers
from ldm.diffusion.schedule import ScheduleConfig
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.nn.unet import UNet, UNetConfig

TINY = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=8,
                  context_dim=768)


def _single_file(tmp_path: Path, unet_config: UNetConfig = TINY) -> Path:
    """One of our single files with its metadata removed, as a released file would be."""
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1))
    path = save_single_file(tmp_path / "ours.safetensors", UNet(unet_config), vae, 0.18215, ScheduleConfig(), "eps",
                            overwrite=True)
    bare = tmp_path / "model.safetensors"
    save_file(load_file(str(path)), str(bare))
    return bare


def _edit(path: Path, change) -> Path:
    state = load_file(str(path))
    change(state)
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("change, message", [
    ({"in_channels": 9}, "inpainting UNet"),
    ({"addition_embed_type": "text_time", "addition_time_embed_dim": 256}, "addition_embed_type='text_time'"),
    ({"transformer_layers_per_block": [1, 2, 10]}, "transformer_layers_per_block"),
    ({"time_embedding_type": "fourier"}, "time_embedding_type='fourier'"),
    ({"attention_head_dim": [2, 3, 5]}, "attention_head_dim"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]},
     "SimpleCrossAttnDownBlock2D"),
    # values our networks do not implement, each of which changes diffusers' outputs (written out here, not read from
    # the converter's table: an entry deleted there is a model imported wrong, unsaid)
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos=False"), ({"freq_shift": 1}, "freq_shift=1"),
    ({"norm_eps": 1e-3}, "norm_eps=0.001"), ({"downsample_padding": 0}, "downsample_padding=0"),
    ({"mid_block_scale_factor": 2}, "mid_block_scale_factor=2"), ({"act_fn": "gelu"}, "act_fn='gelu'"),
    ({"center_input_sample": True}, "center_input_sample=True"),
    ({"resnet_out_scale_factor": 2.0}, "resnet_out_scale_factor=2.0"),
])
def test_unsupported_diffusers_unet_configs_are_named(change, message):
    with pytest.raises(UnsupportedCheckpointError, match=message):
        unet_config_from_diffusers({**SD1_UNET, **change})


def test_a_diffusers_vae_of_another_activation_is_named():
    with pytest.raises(UnsupportedCheckpointError, match="act_fn='gelu' is not supported"):
        autoencoder_config_from_diffusers({**TINY_VAE, "act_fn": "gelu"})


def test_configs_that_spell_the_supported_value_another_way_are_read():
    """diffusers takes these as the defaults they equal: a per-block list of the one supported value, False for the
    middle block's only_cross_attention, a zero latent shift, a square [h, w] sample_size; other values are refused."""
    base = unet_config_from_diffusers(SD1_UNET)
    assert unet_config_from_diffusers({**SD1_UNET, "only_cross_attention": [False] * 3,
                                       "mid_block_only_cross_attention": False}) == base
    with pytest.raises(UnsupportedCheckpointError, match=r"only_cross_attention=\[False, True, False\] is not "
                                                         r"supported \(only False\)"):
        unet_config_from_diffusers({**SD1_UNET, "only_cross_attention": [False, True, False]})
    with pytest.raises(UnsupportedCheckpointError, match=r"mid_block_only_cross_attention=True .*\(only None or "
                                                         r"False\)"):
        unet_config_from_diffusers({**SD1_UNET, "mid_block_only_cross_attention": True})
    vae = {"_class_name": "AutoencoderKL", **TINY_VAE}
    assert autoencoder_config_from_diffusers({**vae, "shift_factor": 0.0, "sample_size": [32, 32]}) == \
        autoencoder_config_from_diffusers({**vae, "sample_size": 32})
    with pytest.raises(UnsupportedCheckpointError, match=r"shift_factor=0\.1159 is not supported"):
        autoencoder_config_from_diffusers({**vae, "shift_factor": 0.1159})
    with pytest.raises(UnsupportedCheckpointError, match=r"sample_size=\[32, 64\] is not one size or a square"):
        autoencoder_config_from_diffusers({**vae, "sample_size": [32, 64]})


@pytest.mark.parametrize("option", ["clip_sample", "thresholding"])
def test_a_scheduler_that_clips_its_x0_estimates_is_refused_naming_the_option(option):
    """Our samplers never clip the x0 estimate: a config that asks diffusers to (DDIM's and DDPM's default when the key
    is written true) would sample other images than diffusers, so it is refused rather than dropped."""
    from ldm.convert.schedule import schedule_from_diffusers

    config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "clip_sample": False, "thresholding": False}
    assert schedule_from_diffusers(config)[1] == "eps"
    with pytest.raises(UnsupportedCheckpointError, match=rf"{option}=true .* set \"{option}\": false in its "
                                                         r"scheduler_config\.json"):
        schedule_from_diffusers({**config, option: True})


def test_vq_and_non_kl_autoencoders_are_refused(tmp_path):
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "VQModel", "num_vq_embeddings": 256}))
    with pytest.raises(UnsupportedCheckpointError, match="VQ autoencoders are not supported"):
        load_autoencoder_any(tmp_path / "vae")
    bare = _single_file(tmp_path)
    _edit(bare, lambda s: s.update({"first_stage_model.quantize.embedding.weight": torch.zeros(16, 4)}))
    with pytest.raises(UnsupportedCheckpointError, match="VQ autoencoder"):
        load_components(bare)


def test_leftover_missing_and_misshapen_keys_are_named(tmp_path, single_torch_thread):
    diffusers_unet(SD1_UNET).save_pretrained(tmp_path / "unet")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    _edit(weights, lambda s: s.update({"mystery.weight": torch.zeros(3)}))
    with pytest.raises(UnsupportedCheckpointError, match=r"unexpected keys \(1\): mystery.weight"):
        load_unet_diffusers(tmp_path / "unet")
    _edit(weights, lambda s: (s.pop("mystery.weight"), s.pop("mid_block.attentions.0.proj_out.bias")))
    with pytest.raises(UnsupportedCheckpointError, match=r"missing keys \(1\): mid_block\.attentions\.0\.proj_out"):
        load_unet_diffusers(tmp_path / "unet")
    _edit(weights, lambda s: s.update({"mid_block.attentions.0.proj_out.bias": torch.zeros(5)}))
    shape_error = r"wrong shape.*mid_block\.attentions\.0\.proj_out\.bias: \(5,\) instead of \(64,\)"
    with pytest.raises(UnsupportedCheckpointError, match=shape_error):
        load_unet_diffusers(tmp_path / "unet")

    bare = _single_file(tmp_path)
    _edit(bare, lambda s: s.update({"some_adapter.lora_up.weight": torch.zeros(2)}))
    with pytest.raises(UnsupportedCheckpointError, match="some_adapter.lora_up.weight"):
        load_components(bare)


def test_inpainting_and_sdxl_single_files_are_refused(tmp_path):
    bare = _single_file(tmp_path, UNetConfig(**{**TINY.__dict__, "in_channels": 9, "out_channels": 4}))
    with pytest.raises(UnsupportedCheckpointError, match="inpainting UNet"):
        load_components(bare)
    bare = _single_file(tmp_path)
    _edit(bare, lambda s: s.update({"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}))
    with pytest.raises(UnsupportedCheckpointError, match="SDXL checkpoint"):
        load_components(bare)
    _, stats, _ = load_autoencoder_any(bare)  # the VAE of an SDXL file is supported, with SDXL's scale
    assert stats == {"scale_factor": 0.13025}
    # SDXL's UNet alone (its ADM vector input, label_emb.0): read as a pooled-prompt UNet, then refused with advice
    # (model.unet.pooled_dim=null) that init_from overwrites
    bare = _single_file(tmp_path)
    width = 64  # the time embedding's: 4 x model_channels
    _edit(bare, lambda s: s.update({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(width, 2816),
                                    "model.diffusion_model.label_emb.0.0.bias": torch.zeros(width),
                                    "model.diffusion_model.label_emb.0.2.weight": torch.zeros(width, width),
                                    "model.diffusion_model.label_emb.0.2.bias": torch.zeros(width)}))
    with pytest.raises(UnsupportedCheckpointError, match=r"label_emb\.0 feeds a vector of width 2816 into the time "
                                                         r"embedding \(SDXL's size and crop conditioning"):
        load_components(bare)


def test_scheduler_configs_are_read_as_their_classes_sample_or_refused():
    """A DPM-Solver singlestep config without timestep_spacing was read as leading (its class defaults to linspace);
    zero terminal SNR with leading spacing, which diffusers runs, was refused by the schedule's own check with advice
    (timestep_spacing=trailing) that model.init_from overwrites, naming neither key nor file; so was zero terminal
    SNR with eps-prediction (advice: model.diffusion.prediction=v, which init_from overwrites too)."""
    from ldm.convert.schedule import schedule_from_diffusers

    base = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
    schedule, _ = schedule_from_diffusers({"_class_name": "DPMSolverSinglestepScheduler", **base})
    assert schedule.timestep_spacing == "linspace"
    with pytest.raises(UnsupportedCheckpointError, match=r"rescale_betas_zero_snr=true with timestep_spacing=leading "
                                                         r".* set \"timestep_spacing\": \"trailing\" in its "
                                                         r"scheduler_config\.json"):
        schedule_from_diffusers({"_class_name": "DDIMScheduler", **base, "rescale_betas_zero_snr": True,
                                 "timestep_spacing": "leading"})
    zero_snr = {"_class_name": "DDIMScheduler", **base, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    with pytest.raises(UnsupportedCheckpointError, match=r"rescale_betas_zero_snr=true with prediction_type=epsilon"
                                                         r".* \"prediction_type\": \"v_prediction\""):
        schedule_from_diffusers(zero_snr)  # eps is diffusers' default prediction
    schedule, prediction = schedule_from_diffusers({**zero_snr, "prediction_type": "v_prediction"})
    assert schedule.zero_terminal_snr and prediction == "v"


def test_pickled_code_in_a_ckpt_never_runs(tmp_path):
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": Payload()},
               tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="pickled objects other than tensors"):
        load_components(tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="pickled objects other than tensors"):
        load_autoencoder_any(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_damaged_weight_files_are_named(tmp_path, single_torch_thread):
    """A file cut short by a download, or another kind of file under a weights name: one error naming the file, for
    single files of either format and for a diffusers folder's weights."""
    bare = _single_file(tmp_path)
    (tmp_path / "cut.safetensors").write_bytes(bare.read_bytes()[:1000])
    torch.save({"state_dict": {"x": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:300])
    (tmp_path / "text.ckpt").write_text("hello")
    for name in ("cut.safetensors", "cut.ckpt", "text.ckpt"):
        with pytest.raises(ConfigError, match=rf"{name} is not a readable \.\w+ file \(cut short"):
            load_components(tmp_path / name)
    unet = tmp_path / "unet"
    diffusers_unet(SD1_UNET).save_pretrained(unet)
    weights = unet / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=r"unet/diffusion_pytorch_model\.safetensors is not a readable"):
        load_components(unet)


def test_ema_weights_of_an_ldm_checkpoint(tmp_path):
    """LDM training files keep the UNet's EMA as `model_ema.diffusion_modelinput_blocks00weight`: use_ema takes it,
    the default takes the training weights, and a file without it says so."""
    bare = _single_file(tmp_path)
    _edit(bare, lambda s: s.update({"model_ema." + k[len("model."):].replace(".", ""): torch.full_like(v, 0.5)
                                    for k, v in list(s.items()) if k.startswith("model.diffusion_model.")}))
    ema = load_components(bare, use_ema=True).unet_state
    assert all(torch.equal(v, torch.full_like(v, 0.5)) for v in ema.values())
    assert not torch.equal(load_components(bare).unet_state["conv_in.weight"], ema["conv_in.weight"])
    with pytest.raises(ConfigError, match="use_ema=False"):
        load_components(_single_file(tmp_path), use_ema=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("schedule", ["scaled_linear", "linear"])
def test_betas_buffers_in_half_precision_give_the_exact_schedule(tmp_path, dtype, schedule):
    """Pruned fp16 files keep LDM's `betas` buffer rounded to fp16 (SD's 0.00085 reads 0.000850201): the schedule is
    recognised through the rounding, with SD's exact beta range, and linear and scaled-linear stay apart; sampled as
    SD's (leading spacing, offset 1). LDM's `scale_factor` buffer beside it is the latent scale."""
    from ldm.diffusion.schedule import make_betas

    start, end = (0.00085, 0.012) if schedule == "scaled_linear" else (0.0001, 0.02)
    betas = make_betas(schedule, 1000, start, end).to(dtype)
    bare = _edit(_single_file(tmp_path), lambda s: s.update(betas=betas, scale_factor=torch.tensor(0.5, dtype=dtype)))
    parts = load_components(bare)
    assert (parts.schedule.beta_schedule, parts.schedule.beta_start, parts.schedule.beta_end) == (schedule, start, end)
    assert (parts.schedule.timestep_spacing, parts.schedule.steps_offset) == ("leading", 1)
    assert parts.latent_scale == 0.5
    assert parts.autoencoder_config.resolution == 512  # SD 1's size, which the weights do not record


def test_a_vae_file_in_diffusers_layout_is_named(tmp_path):
    from convert_helpers import diffusers_vae

    diffusers_vae().save_pretrained(tmp_path / "vae")
    (tmp_path / "vae" / "diffusion_pytorch_model.safetensors").rename(tmp_path / "vae.safetensors")
    with pytest.raises(UnsupportedCheckpointError, match="diffusers' layout .* give the diffusers vae/ folder"):
        load_autoencoder_any(tmp_path / "vae.safetensors")


@pytest.mark.parametrize("keys, message", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"], "a LoRA"),                          # kohya
    (["unet.down_blocks.0.attentions.0.to_q.lora_A.weight"], "a LoRA"),                           # PEFT
    (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "a UNet's weights in diffusers' layout"),
    (["text_model.embeddings.token_embedding.weight"], "a text encoder's weights alone"),
    (["embeddings.token_embedding.weight", "encoder.layers.0.mlp.fc1.weight"], "a text encoder's weights alone"),
])
def test_a_lora_or_one_component_given_as_a_model_file_is_named(tmp_path, keys, message):
    """Without the prefixes of a whole SD file, a file was taken for a stand-alone VAE: "not an LDM autoencoder"."""
    path = tmp_path / "part.safetensors"
    save_file({k: torch.zeros(2) for k in keys}, str(path))
    for load in (load_components, load_autoencoder_any):
        with pytest.raises(UnsupportedCheckpointError, match=message):
            load(path)


def test_stand_alone_vae_files_released_ones_and_ones_without_quant_convs(tmp_path):
    """A released stand-alone VAE keeps `model_ema.decay` / `num_updates` (it was taken for a whole SD model whose
    other keys were "outside" it); an SD3 / Flux-style VAE has no quant_conv (a bare KeyError)."""
    vae = AutoencoderKL(AutoencoderConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1))
    released = tmp_path / "vae-ft-mse.safetensors"
    save_file({**vae.state_dict(), "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)},
              str(released))
    components = load_components(released)
    assert components.unet_config is None and components.autoencoder_config.ch == 32
    read = load_autoencoder_any(released)[0]
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in read.state_dict().items())
    bare = tmp_path / "flux-vae.safetensors"
    save_file({k: v for k, v in vae.state_dict().items() if "quant_conv" not in k}, str(bare))
    with pytest.raises(UnsupportedCheckpointError, match=r"no quant_conv / post_quant_conv weights \(an SD3 / Flux"):
        load_autoencoder_any(bare)


def test_a_whole_sd_file_gives_its_vae_the_generation_size_whichever_key_reads_it(tmp_path):
    """model.init_from read SD's 512 px, model.autoencoder_path (and ldm-encode) 256: the latents were refused; an
    SDXL file's VAE (which model.autoencoder_path takes) generates at 1024."""
    bare = _single_file(tmp_path)
    assert load_components(bare).autoencoder_config.resolution == 512
    assert load_autoencoder_any(bare)[0].config.resolution == 512
    _edit(bare, lambda s: s.update({"conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 8)}))
    assert load_autoencoder_any(bare)[0].config.resolution == 1024  # an SDXL file's VAE (256 went to ldm-encode)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt", ".pt", ".pth", ".bin"])
def test_every_single_file_suffix_is_a_stable_diffusion_text_encoder_source(tmp_path, suffix):
    """`model.init_from` accepts every suffix `read_state_dict` reads; the conditioner, rebuilt from a checkpoint with
    name_or_path = that file, must read its CLIP from it too (a .pt was taken for a transformers folder)."""
    from ldm.conditioning.conditioner import is_stable_diffusion

    (tmp_path / f"model{suffix}").write_bytes(b"")
    assert is_stable_diffusion(str(tmp_path / f"model{suffix}"))
    assert not is_stable_diffusion(str(tmp_path / "openai/clip-vit-large-patch14"))


def test_a_first_level_multiplier_other_than_one_is_refused_on_export():
    """diffusers sizes conv_in (and the UNet's time embedding) from the first level's width: such an export wrote a
    folder no reader could load."""
    from ldm.convert.autoencoder import autoencoder_config_to_diffusers
    from ldm.convert.unet import unet_config_to_diffusers

    unet = UNetConfig(model_channels=32, channel_mult=[2, 4], num_res_blocks=1, attention_levels=[1], num_heads=None,
                      head_dim=16, context_dim=32)
    with pytest.raises(UnsupportedCheckpointError, match=r"channel_mult\[0\]=2 \(not 1\)"):
        unet_config_to_diffusers(unet)
    with pytest.raises(UnsupportedCheckpointError, match=r"ch_mult\[0\]=2 \(not 1\)"):
        autoencoder_config_to_diffusers(AutoencoderConfig(ch=32, ch_mult=[2, 2], num_res_blocks=1), 0.5)


def test_a_unet_with_more_output_than_latent_channels_is_refused_by_the_pipeline(tmp_path):
    from dataclasses import asdict

    from scale_helpers import tiny_autoencoder_export

    from ldm.modules.latent_diffusion import LatentDiffusionModule
    from ldm.nn.unet import unet_config

    unet = asdict(unet_config("tiny", context_dim=None, out_channels=8))
    with pytest.raises(ConfigError, match=r"model.unet.out_channels=8: .*set model.unet.out_channels=null"):
        LatentDiffusionModule({"autoencoder_path": str(tiny_autoencoder_export(tmp_path / "ae")), "unet": unet,
                               "conditioner": {"kind": "none"}, "ema_decay": None})
