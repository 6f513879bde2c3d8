"""Tiny Stable Diffusion parts built with diffusers' and transformers' own classes, random weights, for the
conversion tests (tests/test_convert_*.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

# SD 1-style: 1x1-conv projections, a constant head count, 3 levels (attention on the first two), context 48.
SD1_UNET: dict[str, Any] = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=48,
    attention_head_dim=4, norm_num_groups=8)
# SD 2-style: linear projections, 16-wide heads (head counts per level), two transformer blocks, AdaGN, upcast.
SD2_UNET: dict[str, Any] = dict(
    SD1_UNET, block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=40,
    use_linear_projection=True, transformer_layers_per_block=2, resnet_time_scale_shift="scale_shift",
    upcast_attention=True)
TINY_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1, latent_channels=4,
    norm_num_groups=8, sample_size=32, scaling_factor=0.18215)


def perturb(module: nn.Module, seed: int, scale: float = 0.05) -> nn.Module:
    """Add Gaussian noise to every parameter, so zero-initialised layers (conv_out, proj_out) carry signal too."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return module.eval()


def diffusers_unet(config: dict[str, Any], seed: int = 0) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb(UNet2DConditionModel(**config), seed)


def diffusers_vae(config: dict[str, Any] = TINY_VAE, seed: int = 0) -> nn.Module:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb(AutoencoderKL(**config), seed)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which CLIP's BPE vocabulary is written in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    for n, b in enumerate(b for b in range(256) if b not in bs):
        bs.append(b)
        cs.append(256 + n)
    return dict(zip(bs, map(chr, cs), strict=True))


def tiny_tokenizer(directory: Path) -> Any:
    """A tiny CLIP BPE tokenizer: every byte, every byte ending a word, two merges and the special tokens."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["th", "the</w>", "<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)  # CLIP's 77 positions


def tiny_clip(tokenizer: Any, hidden_size: int, hidden_act: str = "quick_gelu", layers: int = 3,
              seed: int = 0, head_dim: int = 16) -> nn.Module:
    """A random CLIPTextModel with SD 1's quick_gelu or SD 2's (OpenCLIP) gelu; heads of `head_dim` (CLIP's: 64)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=layers, num_attention_heads=hidden_size // head_dim,
                            max_position_embeddings=77, hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return perturb(CLIPTextModel(config), seed, scale=0.02)


def max_diff(a: torch.Tensor, b: torch.Tensor, what: str, tol: float = 1e-5) -> float:
    """Max abs difference of two outputs; printed (pytest -s, or shown on failure) and asserted below `tol`."""
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    diff = (a.double() - b.double()).abs().max().item()
    print(f"[max abs diff] {what}: {diff:.3g} (output scale {b.abs().max().item():.3g})")
    assert diff < tol, f"{what}: max abs difference {diff:.3g} >= {tol}"
    assert b.abs().max().item() > 1e-3, f"{what}: trivial output"
    return diff


def unet_inputs(context_dim: int, batch: int = 2, size: int = 8, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """(latents (B, 4, size, size), integer timesteps (B,), context (B, 7, context_dim))."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([17, 803][:batch]),
            torch.randn(batch, 7, context_dim, generator=g))


# The schedulers of SD 1.5 and SD 2.1 (v-prediction with a zero-terminal-SNR rescale, as fine-tunes use it).
SCHEDULERS = {
    "sd1": {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None, "clip_sample": False},
    "sd2": {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "prediction_type": "v_prediction", "timestep_spacing": "trailing",
            "rescale_betas_zero_snr": True, "steps_offset": 0, "clip_sample": False, "set_alpha_to_one": False},
}


def tiny_sd_pipeline(tmp_path: Path, style: str) -> Any:
    """A diffusers StableDiffusionPipeline (SD 1- or SD 2-style) with tiny random parts, saved to tmp_path / style."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

    unet_config = SD1_UNET if style == "sd1" else SD2_UNET
    tokenizer = tiny_tokenizer(tmp_path / "tokenizer_files")
    hidden_act = "quick_gelu" if style == "sd1" else "gelu"
    text_encoder = tiny_clip(tokenizer, unet_config["cross_attention_dim"], hidden_act)
    scheduler_cls = PNDMScheduler if style == "sd1" else DDIMScheduler
    scheduler = scheduler_cls.from_config({k: v for k, v in SCHEDULERS[style].items() if k != "_class_name"})
    pipe = StableDiffusionPipeline(vae=diffusers_vae(TINY_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=diffusers_unet(unet_config), scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path / style)
    return pipe
