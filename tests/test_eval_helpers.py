"""Builders for the evaluation tests: random-weight InceptionV3 and CLIP saved locally, tiny checkpoints, fake models.

Nothing here downloads: every network is built from a config with random weights and saved where the evaluator
loads it through its local-path options (`feature_extractor_weights_path`, `clip_model`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ldm.data.shapes import BACKGROUNDS, COLORS, SHAPES, ShapeSpec, render
from ldm.eval.sources import pil_to_uint8


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A state dict for torch-fidelity's InceptionV3 with random (He-normal) convolutions, saved to `path`.

    torch-fidelity's constructor always loads a state dict (downloading the official one when given no path). A
    subclass whose `load_state_dict` keeps the random initialisation, handed an empty file, builds the architecture
    without touching the network. He-normal convolutions keep activations alive through the depth, so the random
    features still tell images apart.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # noqa: ARG002 - keep random weights
            return None

    empty = path.with_suffix(".empty.pt")
    torch.save({}, empty)
    torch.manual_seed(seed)
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(empty))
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    empty.unlink()
    return path


def tiny_clip(directory: Path, image_size: int = 32) -> Path:
    """A random two-layer CLIP with a byte-level BPE tokenizer (no merges) and an image processor, saved locally."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")  # captions are lower-case words; the rest maps to unk
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(specials + chars + [c + "</w>" for c in chars])}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size})
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 128,
                     "bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
                     "pad_token_id": vocab["<|endoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


def render_caption(caption: str, resolution: int) -> torch.Tensor:
    """The `shapes` image a caption describes (uint8 (3, R, R)): what a perfect generator would draw."""
    words = caption.split()
    size, color, shape = words[1], words[2], words[3]
    background = words[-2]
    position = " ".join(words[words.index(shape) + 1: words.index("on")]).removeprefix("in the ").strip()
    from ldm.data.shapes import POSITIONS, SIZES

    assert color in COLORS and shape in SHAPES and background in BACKGROUNDS, caption
    x, y = POSITIONS[position]
    spec = ShapeSpec(shape, color, size, position, background, x, y, SIZES[size])
    return pil_to_uint8(render(spec, resolution))


class OracleGenerator(nn.Module):
    """A stand-in LatentDiffusionPipeline whose `generate` renders the caption exactly (or noise), for metric
    checks."""

    def __init__(self, resolution: int = 32, noise: bool = False):
        super().__init__()
        self.image_size = resolution  # the generation size, as LatentDiffusionPipeline.image_size
        self.noise = noise
        self.provenance = {"source": "oracle", "step": -1, "weights": "raw", "val_shards": None}

    @torch.no_grad()
    def generate(self, prompts, seeds, sampler="ddim", num_steps=50, guidance_scale=1.0, class_labels=None):
        out = []
        for prompt, seed in zip(prompts, seeds):
            if self.noise:
                g = torch.Generator().manual_seed(int(seed))
                out.append(torch.rand(3, self.image_size, self.image_size, generator=g) * 2 - 1)
            else:
                out.append(render_caption(prompt, self.image_size).float() / 127.5 - 1)
        return torch.stack(out)


def save_checkpoint(module: nn.Module, path: Path, global_step: int = 0) -> Path:
    """What Lightning's `trainer.save_checkpoint` writes for evaluation, without a Trainer."""
    import lightning as L

    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "global_step": global_step, "epoch": 0, "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


def tiny_autoencoder_module(resolution: int = 16):
    """A random KL-f2 AutoencoderModule (LPIPS off, so no backbone weights are needed)."""
    from ldm.modules.autoencoder import AutoencoderModule

    torch.manual_seed(0)
    return AutoencoderModule({"net": {"resolution": resolution, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1,
                                      "norm_groups": 8}, "loss": {"lpips_weight": 0.0, "disc_weight": 0.0}})


def tiny_ldm_checkpoint(directory: Path, resolution: int = 16, perturbed: bool = False) -> Path:
    """A random 16 px text-conditioned LatentDiffusionModule (byte-level text encoder) saved as a checkpoint;
    `perturbed`: noise on every weight (the UNet's zero-initialised output layers too), so that its images depend on
    their prompts (as they do not at initialisation)."""
    from ldm.modules.latent_diffusion import LatentDiffusionModule

    directory.mkdir(parents=True, exist_ok=True)
    autoencoder = tiny_autoencoder_module(resolution).autoencoder
    export = autoencoder.save_pretrained(directory / "ae", latent_stats={"scale_factor": 1.0, "global_std": 1.0})
    torch.manual_seed(0)
    module = LatentDiffusionModule({
        "autoencoder_path": str(export), "ema_decay": 0.9,
        "unet": {"in_channels": 4, "model_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1,
                 "attention_levels": [1], "num_heads": None, "head_dim": 8, "context_dim": 32, "norm_groups": 8},
        "conditioner": {"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 2, "max_length": 64},
    })
    if perturbed:
        from convert_helpers import perturb

        perturb(module, seed=1, scale=0.2)
    return save_checkpoint(module, directory / "ldm.ckpt", global_step=7)
