"""KL autoencoder conversion against diffusers: a tiny diffusers AutoencoderKL (random weights) imported into ours
encodes and decodes the same; ours exported (diffusers folder, single file) loads back into diffusers; every form
`load_autoencoder_any` accepts gives the same network and the right latent scale."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from convert_helpers import TINY_VAE, diffusers_vae, max_diff

from ldm.config import ConfigError
from ldm.convert import (
    autoencoder_config_from_diffusers,
    autoencoder_config_to_diffusers,
    autoencoder_to_diffusers,
    load_autoencoder_any,
)
from ldm.convert.load import load_autoencoder_diffusers
from ldm.convert.save import _save_safetensors, _write_json
from ldm.nn.autoencoder import AutoencoderKL


def _images(seed: int = 2) -> torch.Tensor:
    return torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _latents(seed: int = 3) -> torch.Tensor:
    return torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _compare(ours: AutoencoderKL, theirs, what: str) -> None:
    """Encoder (posterior mean and log-variance) and decoder outputs of ours against a diffusers AutoencoderKL."""
    x, z = _images(), _latents()
    with torch.no_grad():
        posterior, expected = ours.encode(x), theirs.encode(x).latent_dist
        max_diff(posterior.mean, expected.mean, f"{what}: encoder mean")
        max_diff(posterior.logvar, expected.logvar, f"{what}: encoder logvar")
        max_diff(ours.decode(z), theirs.decode(z).sample, f"{what}: decoder")


def test_diffusers_vae_imports_with_equal_outputs(tmp_path, single_torch_thread):
    theirs = diffusers_vae()
    theirs.save_pretrained(tmp_path / "vae")
    config, state, scale = load_autoencoder_diffusers(tmp_path / "vae")
    ours = AutoencoderKL(config).eval()
    ours.load_state_dict(state)
    assert scale == 0.18215 and config.ch_mult == [1, 2] and config.resolution == 32
    _compare(ours, theirs, "VAE diffusers -> ours")


def test_sdxl_vae_config_translates_with_its_scale():
    """The SDXL VAE (madebyollin/sdxl-vae-fp16-fix and stabilityai/sdxl-vae configs): SD's KL-f8, scale 0.13025."""
    sdxl = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
            "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": False}
    config, scale = autoencoder_config_from_diffusers(sdxl)
    assert scale == 0.13025
    assert (config.ch, config.ch_mult, config.num_res_blocks, config.z_channels, config.resolution) == (
        128, [1, 2, 4, 4], 2, 4, 1024)
    back = autoencoder_config_to_diffusers(config, scale)
    assert {k: back[k] for k in sdxl if k != "_class_name"} == {k: v for k, v in sdxl.items() if k != "_class_name"}


def test_ours_exports_to_diffusers_and_single_file(tmp_path, single_torch_thread):
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    reference = diffusers_vae(seed=4)
    reference.save_pretrained(tmp_path / "reference" / "vae")
    config, _ = autoencoder_config_from_diffusers(TINY_VAE)
    torch.manual_seed(5)
    ours = AutoencoderKL(config).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))

    folder = tmp_path / "exported"
    _write_json(autoencoder_config_to_diffusers(config, 0.2), folder / "vae" / "config.json")
    _save_safetensors(autoencoder_to_diffusers(ours.state_dict(), config),
                      folder / "vae" / "diffusion_pytorch_model.safetensors")
    exported = DiffusersAutoencoderKL.from_pretrained(folder / "vae").eval()
    assert exported.config.scaling_factor == 0.2
    _compare(ours, exported, "VAE ours -> diffusers folder")

    single = tmp_path / "vae.safetensors"
    _save_safetensors({f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}, single)
    from_single = DiffusersAutoencoderKL.from_single_file(str(single), config=str(tmp_path / "reference"),
                                                         subfolder="vae", local_files_only=True).eval()
    _compare(ours, from_single, "VAE ours -> single file -> diffusers from_single_file")


def test_load_autoencoder_any_accepts_every_form(tmp_path, single_torch_thread):
    """A diffusers vae/ folder, a pipeline folder, a stand-alone VAE file (.ckpt with training-only loss entries),
    our own export and our own checkpoint all give the same weights; the scale is diffusers' scaling_factor (as the
    statistics' scale_factor), or None when unknown. GroupNorm groups are not in a file's shapes: SD's 32 is
    assumed, so this VAE uses 32."""
    theirs = diffusers_vae(dict(TINY_VAE, scaling_factor=0.13025, norm_num_groups=32), seed=6)
    theirs.save_pretrained(tmp_path / "pipe" / "vae")
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", '
                                                        '"vae": ["diffusers", "AutoencoderKL"]}')
    from_folder, stats, source = load_autoencoder_any(tmp_path / "pipe" / "vae")
    assert stats == {"scale_factor": 0.13025} and "diffusers VAE" in source
    from_pipe, stats, source = load_autoencoder_any(tmp_path / "pipe")
    assert stats == {"scale_factor": 0.13025} and "pipeline" in source
    reference = from_folder.state_dict()

    stand_alone = dict(reference, **{"loss.logvar": torch.zeros(())})  # as LDM's autoencoder training writes it
    torch.save({"state_dict": stand_alone, "global_step": 840000}, tmp_path / "vae-ft.ckpt")
    from_file, stats, _ = load_autoencoder_any(tmp_path / "vae-ft.ckpt")
    assert stats is None

    from_pipe.save_pretrained(tmp_path / "ours")
    from_export, stats, _ = load_autoencoder_any(tmp_path / "ours")
    assert stats is None
    # Its weights file named instead of the folder: still our export (its config and statistics), not an SD file
    # read by its shapes (GroupNorm 32, no statistics).
    small = AutoencoderKL(dataclasses.replace(from_pipe.config, norm_groups=8))
    small.save_pretrained(tmp_path / "small", latent_stats={"scale_factor": 0.5})
    from_weights, stats, source = load_autoencoder_any(tmp_path / "small" / "model.safetensors")
    assert stats["scale_factor"] == 0.5 and from_weights.config.norm_groups == 8 and source.startswith("export")
    # load_autoencoder (ldm's own exports and checkpoints) takes the weights file of an export too, and names the
    # others with the reader that takes them (it read a diffusers folder as an export without model.safetensors, a
    # single file as "state dict prefixes []")
    from ldm.checkpoints import CheckpointError
    from ldm.nn.autoencoder import load_autoencoder

    assert load_autoencoder(tmp_path / "small" / "model.safetensors")[1] == {"scale_factor": 0.5}
    single = tmp_path / "v1-5.safetensors"
    _save_safetensors({**{f"first_stage_model.{k}": v for k, v in reference.items()},
                       "model.diffusion_model.out.2.bias": torch.zeros(4)}, single)
    for given, what in ((tmp_path / "pipe", "a diffusers pipeline folder"),
                        (tmp_path / "pipe" / "vae", "a diffusers AutoencoderKL folder"),
                        (single, r"a Stable Diffusion single file \(the original layout\)"),
                        (tmp_path / "vae-ft.ckpt", r"a stand-alone VAE file \(the original layout\)")):
        with pytest.raises(CheckpointError, match=f"^path={given} is {what}.*: load_autoencoder reads ldm's own "
                                                  f"checkpoints and exports; .*from Python, "
                                                  f"ldm.convert.load_components / load_autoencoder_any"):
            load_autoencoder(given)
    # An AutoencoderModule checkpoint of ours: the config and the module's state dict (no EMA here).
    torch.save({"autoencoder_config": dataclasses.asdict(from_pipe.config), "latent_stats": None,
                "state_dict": {f"autoencoder.{k}": v for k, v in reference.items()}}, tmp_path / "stage1.ckpt")
    from_ckpt, stats, source = load_autoencoder_any(tmp_path / "stage1.ckpt")
    assert stats is None and source.startswith("checkpoint")
    for model in (from_pipe, from_file, from_export, from_ckpt):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in reference.items())
    _compare(from_file.eval(), theirs, "VAE stand-alone .ckpt -> ours")


def test_a_vae_exported_without_a_measured_scale_gives_stage_2_none(tmp_path, single_torch_thread, caplog):
    """An autoencoder without latent statistics goes to diffusers with SD's 0.18215 (diffusers needs a number), marked
    as a stand-in and said (from Python too): diffusers loads it, ldm's loaders take no scale, so stage 2 asks for
    model.latent_scale (it trained at 0.18215 unsaid, 20x off a measured scale of 3.6). A scale that is no positive
    number (load_autoencoder_any's statistics dict, say) is refused before anything is written."""
    from diffusers import AutoencoderKL as DiffusersAutoencoderKL

    from ldm.convert import save_diffusers_vae
    from ldm.modules.latent_diffusion import resolve_latent_scale

    config, _ = autoencoder_config_from_diffusers(TINY_VAE)
    ours = AutoencoderKL(config).eval()
    with caplog.at_level("WARNING", logger="ldm.convert.save"):
        save_diffusers_vae(tmp_path / "unmeasured", ours, None)
        save_diffusers_vae(tmp_path / "measured", ours, 3.6)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records] == [
        "no latent scale given (latent_scale=None): the VAE states SD's scaling factor 0.18215, which diffusers and "
        "other tools take as its scale; ldm's stage 2 takes it for none and needs model.latent_scale"]
    from ldm.convert import save_single_file_vae

    for scale, error in (({"scale_factor": 3.6}, TypeError), (0.0, ValueError), (float("nan"), ValueError)):
        with pytest.raises(error, match="latent_scale"):
            save_diffusers_vae(tmp_path / "bad", ours, scale)
        with pytest.raises(error, match="latent_scale"):
            save_single_file_vae(tmp_path / "bad.safetensors", ours, scale)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.safetensors").exists()
    assert DiffusersAutoencoderKL.from_pretrained(tmp_path / "unmeasured").config.scaling_factor == 0.18215
    _, stats, source = load_autoencoder_any(tmp_path / "unmeasured")
    assert stats is None
    with pytest.raises(ConfigError, match=r"no latent scale: diffusers VAE .*unmeasured \(exported without a measured "
                                          r"latent scale: its scaling_factor 0\.18215 is a stand-in\) holds no"):
        resolve_latent_scale(None, stats, source)
    assert load_autoencoder_any(tmp_path / "measured")[1] == {"scale_factor": 3.6}
    # a numpy number or a one-element tensor is its value (a numpy float32 was "not a number")
    for scale in (np.float32(0.5), torch.tensor(0.5)):
        save_diffusers_vae(tmp_path / "numpy", ours, scale, overwrite=True)
        assert load_autoencoder_any(tmp_path / "numpy")[1] == {"scale_factor": 0.5}
