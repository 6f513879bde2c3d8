"""Full-size Stable Diffusion 1.5 and 2.1 layouts on the meta device (no memory, no weights): diffusers' networks
built from SD's configs and ours from the translated configs map tensor for tensor, both ways, shapes equal, nothing
left over; the original single-file layout agrees with diffusers' own single-file converters."""

from __future__ import annotations

import pytest
import torch

from ldm.convert import autoencoder as ae
from ldm.convert import text
from ldm.convert import unet as un
from ldm.convert.common import invert, meta_state_shapes
from ldm.nn.autoencoder import AutoencoderKL
from ldm.nn.unet import UNET_CONFIGS, UNet, count_parameters

# unet/config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 (the fields that matter).
SD15_UNET = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"],
             "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
             "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
             "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, dual_cross_attention=False,
                 use_linear_projection=True, upcast_attention=True, sample_size=96, num_class_embeds=None,
                 only_cross_attention=False)
SD_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
          "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
          "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
          "up_block_types": ["UpDecoderBlock2D"] * 4}
# text_encoder/config.json of SD 2.1: OpenCLIP ViT-H's text tower less its last block.
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)


def _meta(build):
    with torch.device("meta"):
        return build()


@pytest.mark.parametrize("name, config, params", [("sd15", SD15_UNET, 859_520_964), ("sd21", SD21_UNET, 865_910_724)])
def test_full_size_unet_maps_one_to_one(name, config, params):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    theirs = {k: v.shape for k, v in _meta(lambda: UNet2DConditionModel(**config)).state_dict().items()}
    ours_config = un.unet_config_from_diffusers(config)
    assert ours_config == UNET_CONFIGS[name]  # the named size is exactly that UNet, upcast_attention included
    ours_model = _meta(lambda: UNet(ours_config))
    assert count_parameters(ours_model) == params
    ours = {k: v.shape for k, v in ours_model.state_dict().items()}

    # ours <-> diffusers: a bijection between the two key sets with equal shapes.
    mapping = un.unet_keys_diffusers(list(ours), ours_config)
    assert sorted(mapping.values()) == sorted(theirs)
    assert all(ours[k] == theirs[v] for k, v in mapping.items())
    assert sorted(invert(mapping)) == sorted(theirs)
    assert un.unet_config_from_diffusers(un.unet_config_to_diffusers(ours_config)) == ours_config

    # ours -> original single-file keys -> diffusers' own converter: diffusers' exact key set and shapes.
    meta_state = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    original = un.unet_to_original(meta_state, ours_config)
    assert len(original) == len(ours) == len(theirs)
    # The down- and upsamplers where the released v1-5 and v2-1 files hold them (an upsampler follows the level's
    # transformer where it has one; diffusers' converter finds it wherever it sits, so checks neither).
    assert {f"input_blocks.{i}.0.op.weight" for i in (3, 6, 9)} | {"output_blocks.2.1.conv.weight",
                                                                    "output_blocks.5.2.conv.weight",
                                                                    "output_blocks.8.2.conv.weight"} <= set(original)
    converted = convert_ldm_unet_checkpoint({f"model.diffusion_model.{k}": v for k, v in original.items()},
                                            dict(config))
    assert sorted(converted) == sorted(theirs)
    assert all(converted[k].shape == theirs[k] for k in theirs)
    assert un.unet_config_from_original(original) == ours_config
    assert sorted(un.unet_from_original(original, ours_config)) == sorted(ours)


def test_full_size_vae_maps_one_to_one():
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    theirs = {k: v.shape for k, v in _meta(lambda: DiffusersAutoencoderKL(**SD_VAE)).state_dict().items()}
    config, scale = ae.autoencoder_config_from_diffusers(SD_VAE)
    ours = meta_state_shapes(lambda: AutoencoderKL(config))
    mapping = ae.autoencoder_keys_diffusers(list(ours), config)
    assert sorted(mapping.values()) == sorted(theirs)
    for k, v in mapping.items():  # the mid-block attention: 1x1 convs in ours, linear layers in diffusers
        expected = theirs[v] if not ae.is_mid_attention_projection(k) else (*theirs[v], 1, 1)
        assert tuple(ours[k]) == tuple(expected), k
    meta_state = {k: torch.empty(s, device="meta") for k, s in ours.items()}
    converted = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v for k, v in meta_state.items()}, SD_VAE)
    assert sorted(converted) == sorted(theirs)
    assert all(converted[k].shape == theirs[k] for k in theirs)
    assert ae.autoencoder_config_from_original(meta_state).ch_mult == config.ch_mult
    assert sorted(ae.autoencoder_to_diffusers(meta_state, config)) == sorted(theirs)


def test_full_size_openclip_text_encoder_maps_one_to_one():
    """SD 2.1's text encoder in OpenCLIP layout, through diffusers' own OpenCLIP converter and back through ours."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    model = _meta(lambda: CLIPTextModel(CLIPTextConfig(**SD21_TEXT)))
    hf = {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    flat = {k.removeprefix("text_model."): v for k, v in hf.items()}
    openclip = text.flat_to_openclip(flat)
    assert len(openclip) == 2 + 2 + 23 * 12  # embeddings, ln_final, 23 blocks: 2 norms, fused qkv, out, 2 MLP
    assert openclip["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 1024, 1024)
    converted = convert_open_clip_checkpoint(model, {f"{text.OPENCLIP_PREFIX}{k}": v for k, v in openclip.items()})
    converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    assert sorted(converted) == sorted(flat)
    assert all(converted[k].shape == flat[k].shape for k in flat)

    # A released SD 2 file has all 24 blocks, the projection and logit scale: the import keeps 23 blocks.
    released = dict(openclip, **{k.replace("resblocks.22.", "resblocks.23."): v for k, v in openclip.items()
                                 if ".resblocks.22." in f".{k}"},
                    text_projection=torch.empty(1024, 1024, device="meta"), logit_scale=torch.empty((), device="meta"))
    back, kept = text.openclip_to_flat(released)
    assert kept == 23 and sorted(back) == sorted(flat)
    assert all(back[k].shape == flat[k].shape for k in flat)
