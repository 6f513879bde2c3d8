"""The autoencoder networks: shapes, the SD parameter layout, the posterior's closed forms, export round trips."""

import json

import pytest
import torch

from ldm.config import ConfigError
from ldm.io import is_export
from ldm.nn.autoencoder import (
    AttnBlock,
    AutoencoderConfig,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    load_autoencoder,
)
from ldm.nn.discriminator import DiscriminatorConfig, NLayerDiscriminator


def tiny_config(ch_mult: list[int], resolution: int = 32) -> AutoencoderConfig:
    return AutoencoderConfig(resolution=resolution, ch=16, ch_mult=ch_mult, num_res_blocks=1, norm_groups=8)


@pytest.mark.parametrize("ch_mult, f", [([1, 2, 2], 4), ([1, 2, 2, 2], 8)])
def test_encode_decode_shapes(ch_mult, f):
    model = AutoencoderKL(tiny_config(ch_mult)).eval()
    assert model.downsample_factor == f
    x = torch.randn(2, 3, 32, 48)  # non-square inputs work too
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4, 32 // f, 48 // f)
    assert posterior.sample().shape == posterior.mode().shape == (2, 4, 32 // f, 48 // f)
    assert model.decode(posterior.mode()).shape == x.shape
    with pytest.raises(ValueError, match=rf"image size \(33, 48\) is not divisible by .* f={f}"):
        model.encode(torch.randn(1, 3, 33, 48))  # was encoded without its last row: a 32 x 48 reconstruction


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_attention_runs_on_the_fused_kernel_in_either_layout(memory_format):
    # Without stride 1 along the channels, SDPA has no fused kernel ("No available kernel" when only flash is
    # allowed) and, by default, falls back to building the full (HW x HW) attention matrix.
    torch.manual_seed(0)
    block = AttnBlock(32, 8)
    x = torch.randn(2, 32, 8, 8).to(memory_format=memory_format)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        fused = block(x)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        reference = block(x)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


def test_cross_field_checks_print_both_values():
    with pytest.raises(ConfigError, match=r"channel count 24 .* norm_groups=32"):
        AutoencoderConfig(resolution=32, ch=24, ch_mult=[1, 2])


def test_parameter_layout_matches_stable_diffusion_kl_f8():
    model = AutoencoderKL(AutoencoderConfig())  # the defaults are SD's KL-f8
    keys = set(model.state_dict())
    expected = [
        "encoder.conv_in.weight", "encoder.down.0.block.0.norm1.weight", "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight", "encoder.mid.block_1.conv1.weight", "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.weight", "encoder.mid.block_2.norm2.bias", "encoder.norm_out.weight",
        "encoder.conv_out.weight", "decoder.conv_in.weight", "decoder.up.3.block.2.conv2.weight",
        "decoder.up.1.upsample.conv.weight", "decoder.up.0.block.0.nin_shortcut.weight", "decoder.mid.attn_1.k.bias",
        "decoder.conv_out.weight", "quant_conv.weight", "post_quant_conv.bias",
    ]
    assert not [k for k in expected if k not in keys]
    assert "encoder.down.3.downsample.conv.weight" not in keys and "decoder.up.0.upsample.conv.weight" not in keys
    # SD's first-stage model has 248 tensors and 83,653,863 parameters.
    assert len(keys) == 248
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    assert model.encoder.mid.attn_1.q.weight.shape == (512, 512, 1, 1)


def test_posterior_kl_and_nll_match_closed_forms():
    moments = torch.randn(3, 8, 4, 4)
    posterior = DiagonalGaussianDistribution(moments)
    q = torch.distributions.Normal(posterior.mean, posterior.std)
    p = torch.distributions.Normal(torch.zeros_like(posterior.mean), torch.ones_like(posterior.std))
    expected_kl = torch.distributions.kl_divergence(q, p).sum(dim=[1, 2, 3])
    torch.testing.assert_close(posterior.kl(), expected_kl, rtol=1e-5, atol=1e-5)
    z = posterior.sample()
    torch.testing.assert_close(posterior.nll(z), -q.log_prob(z).sum(dim=[1, 2, 3]), rtol=1e-5, atol=1e-4)


def test_posterior_kl_and_nll_of_bf16_moments_are_fp32():
    """Under bf16 autocast the moments are bf16: the KL summed in bf16 (spacing 4 at 656) stood still in the logs."""
    moments = (torch.randn(2, 8, 16, 16) * 3).bfloat16()
    posterior = DiagonalGaussianDistribution(moments)
    exact = DiagonalGaussianDistribution(moments.float())  # the same values
    z = posterior.sample(torch.Generator().manual_seed(0))
    assert posterior.kl().dtype == posterior.nll(z).dtype == torch.float32
    torch.testing.assert_close(posterior.kl(), exact.kl(), rtol=0, atol=0)
    torch.testing.assert_close(posterior.nll(z), exact.nll(z.float()), rtol=0, atol=0)


def test_posterior_sampling_is_seeded_by_the_generator():
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    a = posterior.sample(torch.Generator().manual_seed(7))
    b = posterior.sample(torch.Generator().manual_seed(7))
    c = posterior.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(posterior.mode(), posterior.mean)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_patch_discriminator(norm, n_layers):
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=n_layers, norm=norm))
    logits = disc(torch.randn(2, 3, 64, 64))
    assert logits.shape[:2] == (2, 1) and logits.shape[-1] > 1  # one logit per patch
    with pytest.raises(ConfigError, match="norm='layer'"):
        DiscriminatorConfig(norm="layer")


def test_export_round_trip_reproduces_outputs(tmp_path, monkeypatch):
    model = AutoencoderKL(tiny_config([1, 2, 2])).eval()
    stats = {"mean": [0.0] * 4, "std": [1.0] * 4, "scale_factor": 0.5}
    model.save_pretrained(tmp_path / "export", latent_stats=stats)
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"config.json", "model.safetensors",
                                                                  "latent_stats.json"}
    assert json.loads((tmp_path / "export" / "config.json").read_text())["ch_mult"] == [1, 2, 2]

    loaded, loaded_stats = load_autoencoder(tmp_path / "export")
    assert loaded_stats == stats
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x, sample_posterior=False)[0], loaded.eval()(x, sample_posterior=False)[0])
    assert load_autoencoder(tmp_path)[1] == stats  # a run directory with export/ inside works too

    # exported again without statistics (a run that never validated): the earlier weights' statistics are removed,
    # not handed to stage 2 with the new weights
    AutoencoderKL(tiny_config([1, 2, 2])).save_pretrained(tmp_path / "export")
    assert load_autoencoder(tmp_path / "export")[1] is None
    assert not (tmp_path / "export" / "latent_stats.json").exists()
    # a write that fails at the statistics (a full disk) leaves no config.json, so the folder is no export that a run
    # takes for written (the statistics came after config.json: a whole-looking export without them)
    import ldm.nn.autoencoder as nn_autoencoder

    def full(text, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(nn_autoencoder, "atomic_write_text", full)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "export", latent_stats=stats)
    assert not is_export(tmp_path / "export")


def test_missing_autoencoder_path_names_the_config_key(tmp_path):
    """The key that named the path (stage 2's through load_autoencoder_any); from Python, `path`."""
    from ldm.convert import load_autoencoder_any

    with pytest.raises(FileNotFoundError, match=r"^path=.*nowhere does not exist"):
        load_autoencoder(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"^model\.autoencoder_path=.*nowhere does not exist"):
        load_autoencoder_any(tmp_path / "nowhere")


def test_posterior_matches_diffusers_beyond_the_logvar_clamp():
    """Moments past both of LDM's log-variance bounds (-30, 20): clamped there, as diffusers' posterior is."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution as Theirs

    moments = torch.randn(2, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    moments[:, 4:, 0] = torch.linspace(-60, 60, 4)
    ours, theirs = DiagonalGaussianDistribution(moments), Theirs(moments)
    assert ours.logvar.min() == -30.0 and ours.logvar.max() == 20.0
    torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=0, atol=0)
    torch.testing.assert_close(ours.std, theirs.std)
    torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(0)),
                               theirs.sample(torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("norm", ["batch", "none"])
def test_discriminator_is_tamings_n_layer_discriminator(norm):
    """The layout written out (taming-transformers' NLayerDiscriminator: 4x4 convolutions, LeakyReLU(0.2), no bias
    before a BatchNorm, a last stride-1 pair), our weights loaded into it: the same output, exactly."""
    from torch import nn

    torch.manual_seed(0)
    ours = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=3, norm=norm)).eval()
    norm_layer = (lambda c: nn.BatchNorm2d(c)) if norm == "batch" else (lambda c: nn.Identity())
    bias = norm != "batch"
    reference = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2),
                              nn.Conv2d(8, 16, 4, 2, 1, bias=bias), norm_layer(16), nn.LeakyReLU(0.2),
                              nn.Conv2d(16, 32, 4, 2, 1, bias=bias), norm_layer(32), nn.LeakyReLU(0.2),
                              nn.Conv2d(32, 64, 4, 1, 1, bias=bias), norm_layer(64), nn.LeakyReLU(0.2),
                              nn.Conv2d(64, 1, 4, 1, 1)).eval()
    reference.load_state_dict({k.removeprefix("main."): v for k, v in ours.state_dict().items()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 1, 6, 6)
        torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
