"""Stage 1 from a pretrained VAE: `model.init_from` (a diffusers vae/ folder here) with `model.train_encoder=false`
fine-tunes the decoder alone, as SD's ft-EMA / ft-MSE VAEs were made, keeps the source's latent scale, and
`ldm-export` hands the result back to diffusers (`AutoencoderKL.from_pretrained`) or as a stand-alone VAE file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from convert_helpers import diffusers_vae
from scale_helpers import compose_train, tiny_overrides

from ldm.cli.export import export
from ldm.cli.train import train
from ldm.config import ConfigError
from ldm.convert import load_autoencoder_any
from ldm.modules.autoencoder import AutoencoderModule

# the tiny diffusers VAE (32 / 64 wide, f = 2), fine-tuned on the 32 px shapes shards
FINETUNE = ["model=autoencoder/kl_tiny", "model.init_posterior_logvar=null", "model.warmup_steps=0",
            "model.train_encoder=false"]


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("sd_vae")
    diffusers_vae(seed=3).save_pretrained(directory)
    return directory


def test_the_decoder_alone_is_fine_tuned_and_goes_back_to_diffusers(shapes_shards, sd_vae, tmp_path,
                                                                     single_torch_thread, caplog):
    from diffusers import AutoencoderKL

    run = tmp_path / "run"
    train(compose_train(tiny_overrides(shapes_shards, run, max_steps=2, every=2) + FINETUNE
                        + [f"model.init_from={sd_vae}"]))
    source, _, _ = load_autoencoder_any(sd_vae)
    tuned, stats = load_autoencoder_any(run / "export")[:2]
    assert tuned.config.ch == 32 and tuned.config.ch_mult == [1, 2]  # the source's architecture, not kl_tiny's
    for name, value in source.state_dict().items():
        same = torch.equal(value, tuned.state_dict()[name])
        assert same == name.startswith(("encoder.", "quant_conv.")), name  # the encoder frozen, the decoder trained
    # the latents are the source's, so its scale stays (UNets trained on them expect it); the measured std is kept
    assert stats["scale_factor"] == 0.18215 and stats["scale_factor_from"] == str(sd_vae) and stats["global_std"] > 0
    from ldm.modules.latent_diffusion import resolve_latent_scale

    assert resolve_latent_scale(None, stats, "run/export") == (0.18215, f"the scaling factor of {sd_vae}")

    folder = export({"ckpt_path": str(run / "export"), "format": "diffusers", "output_dir": str(tmp_path / "hf")})
    theirs = AutoencoderKL.from_pretrained(folder).eval()
    assert theirs.config.scaling_factor == 0.18215
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, tuned.decode(z), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.encode(x).latent_dist.mean, tuned.encode(x).mean, atol=1e-5, rtol=1e-5)

    from ldm.convert import save_diffusers_vae

    with pytest.raises(FileExistsError, match="holds files but no config.json of class AutoencoderKL: overwrite "
                                              "replaces a diffusers VAE"):
        save_diffusers_vae(run, tuned, 0.18215, overwrite=True)  # a run directory, not a VAE folder
    assert (run / "export").is_dir()
    with pytest.raises(FileExistsError, match="of class AutoencoderKL: .*a run directory or another export"):
        save_diffusers_vae(run / "export", tuned, 0.18215, overwrite=True)  # an export of ours: it was replaced
    assert (run / "export" / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match=r"holds another export or model folder \(config\.json\), a single file "
                                              r"beside it would be read as part of it"):
        export({"ckpt_path": str(run / "export"), "format": "single_file", "output_dir": str(folder)})
    save_diffusers_vae(folder, tuned, 0.18215, overwrite=True)  # a diffusers VAE folder: replaced

    with pytest.warns(UserWarning, match=r"use_ema=false: ckpt_path=.* autoencoder export, which holds the weights"):
        export({"ckpt_path": str(run / "export"), "format": "diffusers", "output_dir": str(tmp_path / "hf_raw"),
                "use_ema": False})

    with caplog.at_level("WARNING", logger="ldm.cli.export"):
        file = export({"ckpt_path": str(run / "checkpoints" / "last.ckpt"), "format": "single_file",
                       "output_dir": str(tmp_path / "file")})
    groups = tuned.config.norm_groups  # SD's 32 is what other readers build: another value is named
    assert (f"GroupNorm over {groups} groups (model.net.norm_groups" in caplog.text) == (groups != 32)
    read, stats, _ = load_autoencoder_any(file)
    assert stats == {"scale_factor": 0.18215}
    assert all(torch.equal(v, tuned.state_dict()[k]) for k, v in read.state_dict().items())  # the EMA-less weights
    from safetensors import safe_open

    with safe_open(file, "pt") as f:  # the original layout of a stand-alone VAE file (vae-ft-mse-840000)
        assert {k.split(".")[0] for k in f.keys()} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}
    # its folder is no export's: save_pretrained (whose weights file has the same name) refuses it
    kept = file.read_bytes()
    with pytest.raises(FileExistsError, match=r"file holds a stand-alone VAE file \(the original layout\), which "
                                              r"this would overwrite with an autoencoder export"):
        tuned.save_pretrained(file.parent)
    assert file.read_bytes() == kept
    # an export without statistics: the file records none, and the command says what stage 2 will then need
    with caplog.at_level("WARNING", logger="ldm.cli.export"):
        export({"ckpt_path": str(tuned.save_pretrained(tmp_path / "unmeasured")), "format": "single_file",
                "output_dir": str(tmp_path / "unmeasured_file")})
    assert "unmeasured holds no latent statistics (they are measured at stage 1's validations): the file records " \
           "none, so ldm's stage 2 will need model.latent_scale" in caplog.text


def test_a_decoder_only_fine_tune_keeps_the_source_scale_without_any_validation(shapes_shards, sd_vae, tmp_path,
                                                                                single_torch_thread):
    """Its scale is the frozen encoder's, known at the start: an export before any validation (here none at all)
    lost it (SDXL's 0.13025 went to diffusers as 0.18215, and stage 2 asked for model.latent_scale)."""
    import shutil

    source = tmp_path / "sdxl_vae"
    shutil.copytree(sd_vae, source)
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "scaling_factor": 0.13025}))
    run = tmp_path / "run"
    train(compose_train(tiny_overrides(shapes_shards, run, max_steps=1, every=2) + FINETUNE
                        + [f"model.init_from={source}", "trainer.limit_val_batches=0"]))
    assert load_autoencoder_any(run / "export")[1] == {"scale_factor": 0.13025, "scale_factor_from": str(source)}
    import warnings

    with warnings.catch_warnings():  # the checkpoint too, with no warning of statistics "of older weights"
        warnings.simplefilter("error")
        assert load_autoencoder_any(run / "checkpoints" / "last.ckpt")[1]["scale_factor"] == 0.13025

    # A resume reads model.init_from again: another source's scale replaced the checkpoint's 0.13025 in the export
    # with no word (its latents are still this source's). Refused; the same source moved elsewhere resumes.
    def resume(init_from: Path, steps: int) -> None:
        train(compose_train(tiny_overrides(shapes_shards, run, max_steps=steps, every=2) + FINETUNE
                            + [f"model.init_from={init_from}", "trainer.limit_val_batches=0", "ckpt_path=last"]))

    with pytest.raises(ConfigError, match=rf"the checkpoint keeps the latent scale 0.13025 of {source} \(its "
                                          rf"encoder's latents\), model.init_from={sd_vae} states 0.18215: resume "
                                          rf"with model.init_from naming the autoencoder the run started from"):
        resume(sd_vae, 2)
    # a checkpoint of older ldm saved before its first validation recorded no statistics at all: it resumes
    last = run / "checkpoints" / "last.ckpt"
    torch.save({**torch.load(last, weights_only=True), "latent_stats": None}, last)
    resume(source, 2)
    moved = source.rename(tmp_path / "moved_vae")
    resume(moved, 3)
    assert load_autoencoder_any(run / "export")[1] == {"scale_factor": 0.13025, "scale_factor_from": str(source)}


def test_a_diffusers_vae_folder_with_the_old_attention_names_loads(sd_vae, tmp_path):
    """diffusers before 0.17 saved the mid-block attention as query / key / value / proj_attn (SD 1.x's and the
    sd-vae-ft-* vae/ folders); diffusers renames them on load, and so do we (they were refused as unexpected keys)."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    old = tmp_path / "old"
    shutil.copytree(sd_vae, old)
    weights = old / "diffusion_pytorch_model.safetensors"
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    pattern = r"(mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\."
    state = {re.sub(pattern, lambda m: f"{m[1]}.{names[m[2]]}.", k): v for k, v in load_file(str(weights)).items()}
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in state
    save_file(state, str(weights))
    ours, reference = load_autoencoder_any(old)[0], load_autoencoder_any(sd_vae)[0]
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in ours.state_dict().items())


def test_fine_tuning_settings_are_checked(sd_vae, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.train_encoder=false keeps a pretrained encoder frozen: set "
                                          r"model\.init_from"):
        AutoencoderModule({"train_encoder": False})
    with pytest.raises(ConfigError, match=r"model\.init_posterior_logvar=-6\.0 would overwrite the pretrained"):
        AutoencoderModule({"init_from": str(sd_vae), "init_posterior_logvar": -6.0})
    from ldm.checkpoints import MissingCheckpointError

    with pytest.raises(MissingCheckpointError, match=r"model\.init_from=.*nowhere does not exist"):
        AutoencoderModule.check_files(AutoencoderModule.Config(init_from=str(tmp_path / "nowhere")))

    from ldm.convert import save_single_file_vae

    bare = save_single_file_vae(tmp_path / "bare.safetensors", load_autoencoder_any(sd_vae)[0], None)
    with pytest.warns(UserWarning, match=r"states no latent scale .* set stage 2's model\.latent_scale"):
        AutoencoderModule({"init_from": str(bare), "train_encoder": False, "loss": {"lpips_weight": 0.0}})
    module = AutoencoderModule({"init_from": str(sd_vae), "train_encoder": False,
                                "loss": {"lpips_weight": 0.0}}).train()
    assert not module.autoencoder.encoder.training and module.autoencoder.decoder.training  # no dropout in it
    assert not any(p.requires_grad for p in module.autoencoder.encoder.parameters())
    # the size is checked against the pretrained VAE's f (2), not the placeholder net's (SD's 8)
    fine_tune = {"init_from": str(sd_vae), "train_encoder": False, "loss": {"lpips_weight": 0.0}}
    assert AutoencoderModule(dict(fine_tune, net={"resolution": 34})).config.net.resolution == 34
    with pytest.raises(ConfigError, match=r"model\.net\.resolution=33 .* not divisible by the downsampling factor "
                                          r"f=2 of model\.init_from="):
        AutoencoderModule(dict(fine_tune, net={"resolution": 33}))
    # a resume that would change what the optimizer holds is refused before Lightning's restore fails on it
    checkpoint = {"hyper_parameters": {"config": {"train_encoder": True}}}
    with pytest.raises(ConfigError, match=r"trained with model\.train_encoder=true, this run has false"):
        module.check_resume(checkpoint)
    assert json.loads((sd_vae / "config.json").read_text())["scaling_factor"] == 0.18215
