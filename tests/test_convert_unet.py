"""UNet conversion against diffusers: tiny SD 1- and SD 2-style UNet2DConditionModels (random weights) imported into
ours give the same output; ours exported as a diffusers folder and as an original single file loads back into
diffusers with the same output."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from convert_helpers import SD1_UNET, SD2_UNET, diffusers_unet, max_diff, unet_inputs

from ldm.convert import (
    unet_config_from_diffusers,
    unet_config_from_original,
    unet_config_to_diffusers,
    unet_from_original,
    unet_to_original,
)
from ldm.convert.common import UnsupportedCheckpointError
from ldm.convert.load import load_components, load_unet_diffusers
from ldm.convert.save import _save_safetensors, _write_json
from ldm.convert.unet import unet_to_diffusers
from ldm.nn.unet import UNet, UNetConfig

STYLES = {"sd1": SD1_UNET, "sd2": SD2_UNET,
          "classes": dict(SD1_UNET, num_class_embeds=11),
          "pooled": dict(SD1_UNET, class_embed_type="projection", projection_class_embeddings_input_dim=24)}


def _extra(style: str, batch: int = 2) -> tuple[dict, dict]:
    """(our extra kwargs, diffusers' extra kwargs) for the class-conditional styles."""
    if style == "classes":
        labels = torch.tensor([3, 10])
        return {"class_labels": labels}, {"class_labels": labels}
    if style == "pooled":
        pooled = torch.randn(batch, 24, generator=torch.Generator().manual_seed(5))
        return {"pooled": pooled}, {"class_labels": pooled}
    return {}, {}


@pytest.mark.parametrize("style", list(STYLES))
def test_diffusers_unet_imports_with_equal_outputs(style, tmp_path, single_torch_thread):
    theirs = diffusers_unet(STYLES[style])
    theirs.save_pretrained(tmp_path / "unet")
    config, state = load_unet_diffusers(tmp_path / "unet")
    ours = UNet(config).eval()
    ours.load_state_dict(state)

    x, t, context = unet_inputs(STYLES[style]["cross_attention_dim"])
    ours_extra, theirs_extra = _extra(style)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, **theirs_extra).sample
        got = ours(x, t, context, **ours_extra)
    max_diff(got, expected, f"UNet {style}: diffusers -> ours")
    assert load_components(tmp_path / "unet").unet_config == config


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_config_translation_round_trips(style):
    config = unet_config_from_diffusers(STYLES[style])
    back = unet_config_to_diffusers(config, sample_size=STYLES[style]["sample_size"])
    for key, value in STYLES[style].items():
        assert back[key] == value, key
    assert unet_config_from_diffusers(back) == config
    if style == "sd1":
        assert (config.num_heads, config.head_dim, config.use_linear_proj) == (4, None, False)
    else:
        assert (config.num_heads, config.head_dim, config.use_linear_proj) == (None, 16, True)
        assert config.use_scale_shift_norm and config.transformer_depth == 2 and config.upcast_attention


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_ours_exports_to_diffusers_and_single_file(style, tmp_path, single_torch_thread):
    from diffusers import UNet2DConditionModel

    theirs = diffusers_unet(STYLES[style], seed=3)
    theirs.save_pretrained(tmp_path / "reference" / "unet")
    config, state = load_unet_diffusers(tmp_path / "reference" / "unet")
    ours = UNet(config).eval()
    ours.load_state_dict(state)
    with torch.no_grad():
        for p in ours.parameters():  # new weights, so the export is not just the import read back
            p.add_(0.01 * torch.randn_like(p))

    # (b) a diffusers folder written by us, loaded by diffusers.
    folder = tmp_path / "pipe"
    _write_json(unet_config_to_diffusers(config, 8), folder / "unet" / "config.json")
    _save_safetensors(unet_to_diffusers(ours.state_dict(), config),
                      folder / "unet" / "diffusion_pytorch_model.safetensors")
    exported = UNet2DConditionModel.from_pretrained(folder / "unet").eval()

    # (a) an original single file written by us, read by diffusers' single-file loader with a local config (the
    # reference folder's, whose weights differ: only the file's may reach the model).
    single = tmp_path / "unet.safetensors"
    _save_safetensors({f"model.diffusion_model.{k}": v for k, v in unet_to_original(ours.state_dict(), config).items()},
                      single)
    from_single = UNet2DConditionModel.from_single_file(str(single), config=str(tmp_path / "reference"),
                                                        subfolder="unet", local_files_only=True).eval()

    x, t, context = unet_inputs(STYLES[style]["cross_attention_dim"], seed=7)
    with torch.no_grad():
        expected = ours(x, t, context)
        max_diff(exported(x, t, encoder_hidden_states=context).sample, expected,
                 f"UNet {style}: ours -> diffusers folder")
        max_diff(from_single(x, t, encoder_hidden_states=context).sample, expected,
                 f"UNet {style}: ours -> single file -> diffusers from_single_file")


def test_original_layout_round_trip_and_shape_inference(single_torch_thread):
    """SD 1 style at context 768 (8 heads) and SD 2 style at 1024 (head width 64): the architecture read off the
    single-file shapes is the one written, and the tensors come back unchanged."""
    sd1 = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=8,
                     context_dim=768)
    sd2 = UNetConfig(model_channels=64, channel_mult=[1, 2, 2], num_res_blocks=2, attention_levels=[0, 1],
                     num_heads=None, head_dim=64, context_dim=1024, use_linear_proj=True, transformer_depth=2,
                     use_scale_shift_norm=True, num_classes=5, upcast_attention=True)
    for config in (sd1, sd2):
        torch.manual_seed(0)
        state = UNet(config).state_dict()
        original = unet_to_original(state, config)
        assert unet_config_from_original(original) == config  # norm_groups: SD's 32, not in the shapes
        back = unet_from_original(original, config)
        assert back.keys() == state.keys()
        assert all(torch.equal(back[k], v) for k, v in state.items())
    # a layout of ours that neither SD version has is refused for what it is (the heads are not in the shapes)
    linear768 = dataclasses.replace(sd1, use_linear_proj=True)
    with pytest.raises(UnsupportedCheckpointError, match="context width 768 with linear projections"):
        unet_config_from_original(unet_to_original(UNet(linear768).state_dict(), linear768))


def test_resblock_matches_diffusers_resnet_in_train_mode():
    """Dropout between the second norm's SiLU and conv2, as in diffusers' ResnetBlock2D (and CompVis'): the same
    seed draws the same masks and gives the same output (the comparisons above run in eval mode)."""
    from diffusers.models.resnet import ResnetBlock2D

    from ldm.convert.unet import _RES_DIFFUSERS
    from ldm.nn.unet import ResBlock

    torch.manual_seed(0)
    ours = ResBlock(32, 64, 128, norm_groups=8, dropout=0.5).train()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    theirs = ResnetBlock2D(in_channels=32, out_channels=64, temb_channels=128, groups=8, dropout=0.5, eps=1e-5).train()
    theirs.load_state_dict({f"{_RES_DIFFUSERS[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
                            for k, v in ours.state_dict().items()})
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 128)
    torch.manual_seed(1)
    got = ours(x, emb)
    torch.manual_seed(1)
    torch.testing.assert_close(got, theirs(x, emb), rtol=0, atol=1e-6)
