"""Pretrained text encoders from transformers: CLIP's text tower (SD 1 and 2) and any other encoder by name (T5 ...).

Models load by hub name or from a local `save_pretrained()` directory. The cache is tried first; with HF_HUB_OFFLINE
(or TRANSFORMERS_OFFLINE) set nothing is downloaded, and a model that is not on disk raises at once, naming the
config key to point at a local copy. transformers is imported only when one of these encoders is built (it takes
seconds to import).
"""

from __future__ import annotations

import json
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ldm.checkpoints import pickle_refusal
from ldm.conditioning.byte import masked_mean
from ldm.conditioning.frozen import FrozenMixin
from ldm.config import ConfigError, check_choice
from ldm.io import CONFIG_NAME, export_dir, export_kind, is_export
from ldm.seeding import keeps_global_rng

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off by the environment."""
    return any(os.environ.get(key, "").upper() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def tokenizer_cut(tokenizer: Any, prompt: str, max_length: int) -> str:
    """What of `prompt` a transformers tokenizer truncating at `max_length` tokens leaves out (as diffusers'
    `encode_prompt` reports it: the tokens between the kept ones and the end token); "" when it fits."""
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    return tokenizer.decode(ids[max_length - 1:-1]) if len(ids) > max_length else ""


def ldm_export_kind(directory: Path) -> str | None:
    """What an ldm export in `directory` (or in a run directory's `export/`) holds (`export_kind`), or None when it
    holds none."""
    try:
        directory = export_dir(directory, reads_checkpoints=False)
    except ConfigError:  # a run directory without an export
        return None
    if not is_export(directory):
        return None
    try:
        config = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return export_kind(config) if isinstance(config, dict) and "model_type" not in config else None


@keeps_global_rng
def load_pretrained(cls: Any, name_or_path: str, config_key: str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name_or_path)`: from a local directory, then the cache, then (when online) the hub.

    Args:
        cls: a transformers class with `from_pretrained` (a model, tokenizer or config class).
        name_or_path: a hub name ("openai/clip-vit-large-patch14") or a local directory.
        config_key: the config key that set `name_or_path`, named in the error.
        **kwargs: passed to from_pretrained.

    Raises:
        ConfigError: the model is neither on disk nor downloadable; the message says how to point at a local copy.
    """
    path = Path(name_or_path).expanduser()
    is_path = path.exists() or name_or_path.startswith(("/", "./", "../", "~"))
    fix = (f"Set {config_key} to a local directory holding a save_pretrained() copy of the model and its tokenizer "
           f"(e.g. {config_key}=/path/to/clip-vit-large-patch14), or run once with network access to fill the "
           f"Hugging Face cache.")
    if is_path and not path.is_dir():
        raise ConfigError(f"{config_key}={name_or_path!r} is not a directory. {fix}")
    source = str(path) if is_path else name_or_path

    if cls.__name__.startswith("Auto"):  # a folder's own Python (config.json's auto_map) is never run
        kwargs = {**kwargs, "trust_remote_code": False}

    def load(**options: Any) -> Any:
        try:
            loaded = cls.from_pretrained(source, **options, **kwargs)
        except pickle.UnpicklingError as err:  # torch's message would advise weights_only=False
            raise ConfigError(f"{config_key}={name_or_path!r}: the weights' {pickle_refusal(err)}: give safetensors "
                              f"weights") from None
        except (OSError, ValueError):
            raise
        except Exception as err:  # noqa: BLE001 -- damaged files: safetensors headers, tokenizer files
            raise ConfigError(f"{config_key}={name_or_path!r}: cannot load {cls.__name__}, a file there is damaged "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if lacks_vocabulary(loaded):
            raise OSError(NO_VOCABULARY)
        return loaded

    try:
        return load(local_files_only=True)
    except ConfigError:  # said what is wrong with the files found
        raise
    except (OSError, ValueError) as err:
        if is_path and (held := ldm_export_kind(path)) is not None:  # (a pretraining run's export given to kind=clip)
            prefix = config_key.rpartition(".")[0]
            fix = f"; set {prefix}.kind=byte to read it" if "byte" in held and prefix.endswith("conditioner") else ""
            raise ConfigError(f"{config_key}={name_or_path!r} holds {held}, not a transformers model{fix}") from None
        if is_path or hub_offline():
            where = "in that directory" if is_path else "in the Hugging Face cache (HF_HUB_OFFLINE is set)"
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{config_key}={name_or_path!r}: cannot load {cls.__name__}: not found or unreadable "
                              f"{where} ({reason}). {fix}") from err
    try:
        return load()
    except ConfigError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config_key}={name_or_path!r}: cannot load {cls.__name__} from the cache or the hub "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}). {fix}") from err


NO_VOCABULARY = ("no tokenizer files (CLIP's vocab.json and merges.txt, T5's spiece.model, BERT's vocab.txt, or a "
                 "tokenizer.json)")


def lacks_vocabulary(loaded: Any) -> bool:
    """Whether `loaded` is a tokenizer without a vocabulary: what transformers builds, instead of failing, from a
    folder without tokenizer files (a model's own folder, a pipeline's root) or an unknown name: its special tokens
    and at most one other (T5's `▁`, beside its 100 extra ids), so that every word becomes the unknown id."""
    specials = getattr(loaded, "all_special_tokens", None)
    if specials is None:  # not a tokenizer
        return False
    try:
        entries = set(loaded.get_vocab())  # len() can count ids beyond them (DeBERTa-v2's: 7 for 5 entries)
    except (NotImplementedError, AttributeError, TypeError, ValueError):
        entries = set(range(len(loaded)))
    return len(entries - set(specials)) <= 1


class CLIPTextEncoder(FrozenMixin, nn.Module):
    """CLIP's text transformer, as Stable Diffusion conditions on it: 77 tokens, padded, no attention mask.

    Args:
        name_or_path: hub name or local directory holding the model and its tokenizer.
        max_length: tokens per prompt (CLIP: 77, its number of positions).
        layer: "last" (SD 1: last_hidden_state) or "penultimate" (SD 2: hidden_states[-2] through final_layer_norm).
        trainable: fine-tune the encoder; frozen (eval mode, no grads, run under no_grad) by default.
        config_key: the config key of name_or_path, for error messages.
        transformer, tokenizer: an already built CLIPTextModel and CLIPTokenizer to wrap instead of loading
            name_or_path (e.g. converted from a Stable Diffusion single file by `ldm.convert`).
    """

    def __init__(self, name_or_path: str = DEFAULT_CLIP, max_length: int = 77, layer: str = "last",
                 trainable: bool = False, config_key: str = "model.conditioner.name_or_path", *,
                 transformer: Any | None = None, tokenizer: Any | None = None):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer

        check_choice("layer", layer, ["last", "penultimate"])
        if tokenizer is None:
            tokenizer = load_pretrained(CLIPTokenizer, name_or_path, config_key)
        if transformer is None:
            transformer = load_pretrained(CLIPTextModel, name_or_path, config_key, dtype=torch.float32)
        self.tokenizer, self.transformer = tokenizer, transformer
        if len(tokenizer) > transformer.config.vocab_size:
            raise ConfigError(f"{config_key}={name_or_path}: the tokenizer's {len(tokenizer)} tokens exceed the text "
                              f"encoder's vocabulary of {transformer.config.vocab_size}: they are not a pair (give "
                              f"the tokenizer of this text encoder)")
        eos = transformer.config.eos_token_id
        if eos != 2 and eos != tokenizer.eos_token_id:  # 2: transformers' legacy configs, pooled at the largest id
            raise ConfigError(f"{config_key}={name_or_path}: the tokenizer ends prompts with token "
                              f"{tokenizer.eos_token_id}, the text encoder pools at its end token {eos}: they are "
                              f"not a pair (give the tokenizer of this text encoder)")
        check_positions(self.transformer.config, max_length, name_or_path, config_key)
        self.max_length = max_length
        self.layer = layer
        self.trainable = trainable
        self.context_dim = self.pooled_dim = self.transformer.config.hidden_size
        self.freeze()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                                return_tensors="pt")
        return tokens.input_ids                                                 # (B, L)

    def cut(self, prompt: str) -> str:
        """The part of `prompt` beyond `max_length` tokens, which the encoder never sees ("" when it fits)."""
        return tokenizer_cut(self.tokenizer, prompt, self.max_length)

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts to the context (B, max_length, hidden_size) and CLIP's pooled output (B, hidden_size): the
        EOS token's last-layer state, as SDXL conditions on it."""
        ids = self.tokenize(prompts).to(self.transformer.device)               # (B, L)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.transformer(input_ids=ids, output_hidden_states=self.layer == "penultimate")
            if self.layer == "last":
                return out.last_hidden_state, out.pooler_output                 # (B, L, D), (B, D)
            text_model = getattr(self.transformer, "text_model", self.transformer)  # transformers 4 nests it
            return text_model.final_layer_norm(out.hidden_states[-2]), out.pooler_output

    def freeze_unused(self, pooled: bool) -> None:
        """Without the pooled output, the penultimate layer's context leaves the last block without a gradient:
        frozen, so that a trainable encoder neither carries it in AdamW nor stops DDP, which waits for a gradient of
        every parameter that requires one."""
        if self.trainable and self.layer == "penultimate" and not pooled:
            text_model = getattr(self.transformer, "text_model", self.transformer)
            text_model.encoder.layers[-1].requires_grad_(False)


_T5_ENCODERS = {"t5": "T5EncoderModel", "mt5": "MT5EncoderModel", "umt5": "UMT5EncoderModel"}


# transformers models whose position ids start after the padding index (RoBERTa's rule): max_position_embeddings
# minus pad_token_id + 1 of them are usable
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "roberta-prelayernorm", "camembert",
                     "data2vec-text", "longformer", "luke", "mpnet", "ibert", "xmod", "esm")


def check_positions(config: Any, max_length: int, name_or_path: str, config_key: str) -> None:
    """Refuse a prompt length beyond the encoder's learnt positions (none to check for relative ones, as T5's or
    DeBERTa-v3's without absolute positions)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or getattr(config, "position_biased_input", True) is False:
        return
    if config.model_type in _OFFSET_POSITIONS:
        positions -= (config.pad_token_id or 0) + 1
    if max_length > positions:
        key = config_key.rpartition(".")[0] + ".max_length"
        raise ConfigError(f"{key}={max_length} exceeds the {positions} positions of {name_or_path}; set {key} to "
                          f"at most {positions}")


def check_hf_encoder(config: Any, name_or_path: str, config_key: str) -> None:
    """Refuse, naming `config_key`, what kind=hf cannot encode prompts with: a multimodal model (its text tower is
    a config inside), an encoder-decoder other than T5's (its encoder alone saves as a model that transformers
    reloads with new weights)."""
    if getattr(config, "text_config", None) is not None:
        raise ConfigError(f"{config_key}={name_or_path} is a multimodal {config.model_type} model; kind=hf takes a "
                          f"text encoder: for CLIP use kind=clip (it reads the text tower), or point at the text "
                          f"model alone")
    if getattr(config, "is_encoder_decoder", False) and config.model_type not in _T5_ENCODERS:
        raise ConfigError(f"{config_key}={name_or_path} is a {config.model_type} encoder-decoder: kind=hf takes "
                          f"encoder models (BERT, RoBERTa, ...) and the T5 family's encoders ({sorted(_T5_ENCODERS)}), "
                          f"whose encoder alone saves and reloads; {config.model_type}'s would reload with new "
                          f"weights from an export")


def check_padding(tokenizer: Any, name_or_path: str, config_key: str) -> None:
    """Refuse a tokenizer that cannot pad prompts to max_length."""
    if tokenizer.pad_token is None:
        raise ConfigError(f"{config_key}={name_or_path}: its tokenizer has no padding token, which prompts padded "
                          f"to max_length need (a decoder-only language model's, such as GPT-2's, has none): give a "
                          f"text encoder")


class HFTextEncoder(FrozenMixin, nn.Module):
    """Any transformers text encoder by name: AutoTokenizer + AutoModel (T5EncoderModel for the T5 family; other
    encoder-decoders are refused), conditioning on last_hidden_state with padding masked in the encoder.

    Args:
        name_or_path: hub name (e.g. "google/t5-v1_1-base", "bert-base-uncased") or local directory.
        max_length: tokens per prompt, padded and truncated.
        trainable: fine-tune the encoder; frozen by default.
        config_key: the config key of name_or_path, for error messages.
        config: the model's transformers config (`to_dict()`): build it with untrained weights, for a checkpoint's
            state dict to fill; None reads config and weights from name_or_path.
    """

    def __init__(self, name_or_path: str, max_length: int = 77, trainable: bool = False,
                 config_key: str = "model.conditioner.name_or_path", config: dict[str, Any] | None = None):
        super().__init__()
        import transformers
        from transformers import AutoConfig, AutoTokenizer

        pretrained = config is None
        config = load_pretrained(AutoConfig, name_or_path, config_key) if pretrained else \
            AutoConfig.for_model(**config)
        if pretrained:  # a checkpoint's recorded encoder was accepted when it was built
            check_hf_encoder(config, name_or_path, config_key)
            check_positions(config, max_length, name_or_path, config_key)
        model_cls = getattr(transformers, _T5_ENCODERS.get(config.model_type, "AutoModel"))
        self.tokenizer = load_pretrained(AutoTokenizer, name_or_path, config_key)
        if pretrained:
            check_padding(self.tokenizer, name_or_path, config_key)
            model = load_pretrained(model_cls, name_or_path, config_key, dtype=torch.float32)
        else:  # untrained weights of `config`, for a checkpoint's state dict to fill
            model = model_cls(config) if model_cls is not transformers.AutoModel else model_cls.from_config(config)
        if getattr(model.config, "is_encoder_decoder", False) and config.model_type not in _T5_ENCODERS:
            model = model.get_encoder()  # a checkpoint written before check_hf_encoder refused these
        self.transformer = model
        self.max_length = max_length
        self.trainable = trainable
        self.context_dim = self.pooled_dim = getattr(config, "hidden_size", None) or config.d_model
        self.freeze()

    def freeze_unused(self, pooled: bool) -> None:
        """A BERT-style pooler is never used (the pooled vector is the tokens' mean): frozen, so that a trainable
        encoder does not stop DDP, which waits for a gradient of every parameter that requires one."""
        pooler = getattr(self.transformer, "pooler", None)
        if self.trainable and isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)

    def _tokens(self, prompts: Sequence[str]) -> Any:
        return self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                              return_tensors="pt")

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self._tokens(prompts).input_ids                                 # (B, L)

    def cut(self, prompt: str) -> str:
        """The part of `prompt` beyond `max_length` tokens, which the encoder never sees ("" when it fits)."""
        return tokenizer_cut(self.tokenizer, prompt, self.max_length)

    def forward(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts to the context (B, max_length, hidden_size) and its mean over the real tokens
        (B, hidden_size)."""
        device = next(self.transformer.parameters()).device
        tokens = self._tokens(prompts)
        mask = tokens.attention_mask.to(device)                                 # (B, L)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.transformer(input_ids=tokens.input_ids.to(device), attention_mask=mask)
            return out.last_hidden_state, masked_mean(out.last_hidden_state, mask.bool())  # (B, L, D), (B, D)
