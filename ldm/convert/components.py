"""What a Stable Diffusion checkpoint holds, in our layout (`SDComponents`), and the tokenizer loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.config import ConfigError
from ldm.convert.common import StateDict
from ldm.diffusion.schedule import ScheduleConfig
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.nn.unet import UNet, UNetConfig


@dataclass
class SDComponents:
    """What a Stable Diffusion checkpoint holds, in our layout. A field is None when the source lacks the part (a
    vae/ folder has no UNet; a single file has no tokenizer unless one is given).

    Attributes:
        unet_config, unet_state: our UNetConfig and a state dict for `ldm.nn.unet.UNet`.
        autoencoder_config, autoencoder_state: our AutoencoderConfig and a state dict for `AutoencoderKL`.
        latent_scale: diffusers' `scaling_factor` (SD 1/2: 0.18215); None when the source does not say.
        schedule, prediction: the training noise schedule and what the UNet predicts (eps | v | x0); prediction is
            None for an SD 2.x single file that does not say (no metadata, no `.yaml` beside it).
        text_encoder, tokenizer: a transformers CLIPTextModel (fp32, eval mode) and CLIPTokenizer.
        clip_layer: which output of text_encoder the UNet was trained on ("last": last_hidden_state).
        max_length: tokens per prompt the UNet was trained on, when fewer than the text encoder's positions (a
            folder's tokenizer `model_max_length`, our single files' metadata); None: as many as its positions
            (SD: 77).
        source: where each part came from, for the log.
        lost: parts a pipeline folder's model_index.json lists but the folder lacks (say, "text_encoder").
    """

    unet_config: UNetConfig | None = None
    unet_state: StateDict | None = None
    autoencoder_config: AutoencoderConfig | None = None
    autoencoder_state: StateDict | None = None
    latent_scale: float | None = None
    schedule: ScheduleConfig | None = None
    prediction: str | None = None
    text_encoder: Any | None = None
    tokenizer: Any | None = None
    clip_layer: str = "last"
    max_length: int | None = None
    source: str = ""
    lost: list[str] = field(default_factory=list)

    def build_unet(self) -> UNet:
        """Our UNet with the imported weights."""
        if self.unet_config is None or self.unet_state is None:
            raise ConfigError(f"{self.source}: holds no UNet")
        unet = UNet(self.unet_config)
        unet.load_state_dict(self.unet_state)
        return unet

    def build_autoencoder(self) -> AutoencoderKL:
        """Our AutoencoderKL with the imported weights."""
        if self.autoencoder_config is None or self.autoencoder_state is None:
            raise ConfigError(f"{self.source}: holds no autoencoder")
        model = AutoencoderKL(self.autoencoder_config)
        model.load_state_dict(self.autoencoder_state)
        return model

    @property
    def prompt_length(self) -> int | None:
        """Tokens per prompt the UNet was trained on (`max_length`, else the text encoder's positions); None without
        a text encoder."""
        if self.text_encoder is None:
            return None
        return self.max_length or self.text_encoder.config.max_position_embeddings

    def build_text_encoder(self, max_length: int | None = None, trainable: bool = False,
                           layer: str | None = None, prefix: str = "model.conditioner") -> Any:
        """Our `CLIPTextEncoder` around the imported text encoder and tokenizer (frozen unless trainable), on `layer`
        ("last" or "penultimate"; None: the layer the UNet was trained on, `clip_layer`), with prompts of
        `max_length` tokens (None: `prompt_length`); errors name the keys under `prefix`."""
        from ldm.conditioning.text import CLIPTextEncoder

        if self.text_encoder is None:
            raise ConfigError(f"{self.source}: holds no text encoder")
        if self.tokenizer is None:
            raise ConfigError(f"{self.source} holds no tokenizer (a single file never does): set "
                              f"{prefix}.tokenizer (tokenizer_path= in Python) to a CLIP tokenizer folder "
                              f"with vocab.json and merges.txt, e.g. a diffusers pipeline's tokenizer/")
        return CLIPTextEncoder(str(self.source), max_length=max_length or self.prompt_length,
                               layer=layer or self.clip_layer, trainable=trainable,
                               config_key=f"{prefix}.name_or_path", transformer=self.text_encoder,
                               tokenizer=self.tokenizer)


def load_tokenizer(path: str | Path, what: str = "tokenizer_path") -> Any:
    """A CLIPTokenizer from a local directory (vocab.json + merges.txt, as `save_pretrained` writes it), loaded and
    checked as every pretrained part is (`ldm.conditioning.text.load_pretrained`)."""
    from transformers import CLIPTokenizer

    from ldm.conditioning.text import load_pretrained

    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{what}={path} is not a directory; point it at a CLIP tokenizer saved with "
                          f"save_pretrained (vocab.json, merges.txt), e.g. the tokenizer/ folder of a diffusers "
                          f"Stable Diffusion pipeline")
    refuse_pipeline_folder(path, what)
    return load_pretrained(CLIPTokenizer, str(path), what)


def refuse_pipeline_folder(path: str | Path, what: str) -> None:
    """Raise ConfigError naming `what` when the tokenizer folder given is a diffusers pipeline's, which holds its
    tokenizer in tokenizer/ (transformers' error suggested a hub name)."""
    path = Path(path).expanduser()
    if (path / "tokenizer").is_dir() and not (path / "vocab.json").is_file():
        raise ConfigError(f"{what}={path} is a pipeline folder, whose tokenizer is its tokenizer/ folder: set "
                          f"{what}={path / 'tokenizer'}")
