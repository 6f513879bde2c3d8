"""The conditioner: a batch's raw conditions (prompts or class labels) in, the UNet's keyword arguments out.

    conditioner = build_conditioner(cfg.model.conditioner)            # ConditionerConfig, dict or DictConfig
    conditioner.check_unet(unet.config)                               # context_dim / num_classes / pooled_dim agree
    conds = conditioner.batch_conditions(batch)                      # captions, labels, encoded text or None
    cond = conditioner(conds, generator=step_generator(...))         # {"context": (B, L, D), "class_labels": None,
    #                                                                   "pooled": (B, D) or None}
    pred = unet(x_t, t, **cond)
    conds = conditioner.sampling_conditions(prompts, class_labels, B)  # what generating B images takes
    uncond = conditioner.unconditional(B, device)                    # the empty prompt / null class, for guidance

Each conditioner answers for itself which part of a batch it reads and what it needs to generate; nothing outside
this package switches on `kind`. In training mode a fraction `cond_drop_prob` of the conditions is dropped (see
`ldm.conditioning.dropout`); in eval mode nothing is. Frozen encoders stay in eval mode and run under no_grad either
way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig
from torch import nn

from ldm.conditioning.byte import ByteEncoderConfig, ByteTextEncoder
from ldm.conditioning.dropout import drop_labels, drop_mask, drop_prompts
from ldm.conditioning.labels import ClassEmbedder
from ldm.conditioning.text import DEFAULT_CLIP, CLIPTextEncoder, HFTextEncoder
from ldm.conditioning.text import load_pretrained as load_transformers
from ldm.config import ConfigError, batch_entry, check_choice, check_min, is_int, to_dataclass
from ldm.io import with_default_modes

log = logging.getLogger(__name__)

KINDS = ["clip", "hf", "byte", "class", "none"]
UNetKwargs = dict[str, torch.Tensor | None]
TEXT_ENCODER_DIR = "text_encoder"  # where a pipeline export keeps a transformers text encoder and its tokenizer


class EncodedText(NamedTuple):
    """Prompts already run through the frozen text encoder (precomputed latent shards carry them)."""

    context: torch.Tensor               # (B, L, D)
    pooled: torch.Tensor | None         # (B, D') or None


@dataclass
class ConditionerConfig:
    """What conditions the UNet; the node `model.conditioner` of a latent diffusion config."""

    kind: str = "byte"                  # clip | hf | byte | class | none
    cond_drop_prob: float = 0.1         # training: prompts -> "", labels -> null class (classifier-free guidance)
    # Text (clip, hf, byte).
    max_length: int = 77                # tokens per prompt, padded and truncated
    # Pretrained encoders (clip, hf; byte when name_or_path is set).
    name_or_path: str | None = None     # clip, hf: hub name or local save_pretrained() directory (clip: null =
    #                                     openai/clip-vit-large-patch14); byte: the export of a text-image
    #                                     pretraining run (<run>/export), null = a new encoder trained with the UNet
    layer: str = "last"                 # clip: last | penultimate (SD 2: hidden_states[-2] + final_layer_norm)
    tokenizer: str | None = None        # clip: the tokenizer (directory or hub name) when name_or_path is a Stable
    #                                     Diffusion single file, which holds none (SD 1: openai/clip-vit-large-patch14,
    #                                     SD 2: a diffusers SD 2 pipeline's tokenizer/); null: name_or_path's own
    trainable: bool = False             # pretrained encoders: fine-tune; frozen by default. A byte encoder trained
    #                                     from scratch (name_or_path null) and class embeddings always train
    pooled: bool = False                # text: also give the UNet a pooled prompt vector, added to its time embedding
    #                                     (SDXL, Imagen; needs model.unet.pooled_dim = the encoder's width). clip: the
    #                                     EOS token's state (pooler_output); byte, hf: the mean over the real tokens
    # Byte-level encoder (byte); width is also the class embedding's (class, class_embed=context).
    width: int = 512                    # context width D
    num_layers: int = 4                 # transformer blocks
    num_heads: int = 8                  # attention heads; width must divide by it
    # Class labels (class).
    num_classes: int = 1000             # real classes; index num_classes is the null class
    class_embed: str = "context"        # context: one (B, 1, width) token for cross-attention (LDM);
    #                                     unet: labels go to the UNet's own table, model.unet.num_classes (ADM)

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_choice("layer", self.layer, ["last", "penultimate"])
        if self.layer != "last" and self.kind != "clip":
            raise ConfigError(f"layer={self.layer} applies to kind=clip (SD 2's penultimate layer; for a Stable "
                              f"Diffusion model's in model.init_from, set kind=clip too); kind={self.kind} reads its "
                              f"last layer: leave layer out")
        check_choice("class_embed", self.class_embed, ["context", "unet"])
        if not 0.0 <= self.cond_drop_prob <= 1.0:
            raise ConfigError(f"cond_drop_prob={self.cond_drop_prob} must lie in [0, 1]")
        if self.max_length < 2:
            raise ConfigError(f"max_length={self.max_length} must be >= 2")
        if self.kind == "hf" and not self.name_or_path:
            raise ConfigError("kind=hf needs name_or_path: a hub name (e.g. google/t5-v1_1-base) or a local directory")
        check_min(1, width=self.width, num_layers=self.num_layers, num_heads=self.num_heads)
        if self.kind == "byte" and self.width % self.num_heads:
            raise ConfigError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        if self.pooled and self.kind not in ("clip", "hf", "byte"):
            raise ConfigError(f"pooled=true needs a text encoder (kind clip, hf or byte), not kind={self.kind}")
        if self.kind == "class" and self.num_classes < 1:
            raise ConfigError(f"num_classes={self.num_classes} must be >= 1")


class Conditioner(nn.Module):
    """Base class: `forward(conds, generator)` returns the UNet's keyword arguments, `unconditional` their null
    counterpart. `context_dim`, `num_classes` and `pooled_dim` are what the UNet must be built with; `trainable`
    says whether the conditioner has parameters to optimise, `reads_labels` whether every training sample needs an
    integer class label."""

    context_dim: int | None = None
    num_classes: int | None = None
    pooled_dim: int | None = None
    trainable: bool = False
    reads_labels: bool = False

    def __init__(self, kind: str, cond_drop_prob: float):
        super().__init__()
        self.kind = kind
        self.cond_drop_prob = cond_drop_prob

    def forward(self, conds: Any, generator: torch.Generator | None = None) -> UNetKwargs:
        raise NotImplementedError

    def unconditional(self, batch_size: int, device: torch.device | str = "cpu") -> UNetKwargs:
        raise NotImplementedError

    def batch_conditions(self, batch: Mapping[str, Any], caption_key: str = "caption", label_key: str = "label") -> Any:
        """The raw conditions of a training batch, in the form `forward` takes."""
        raise NotImplementedError

    def sampling_conditions(self, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                            batch_size: int) -> Any:
        """The raw conditions for generating `batch_size` images from prompts or class labels (whichever this
        conditioner reads); raises ValueError naming what is missing."""
        raise NotImplementedError

    @property
    def uses_prompts(self) -> bool:
        """Whether generation reads prompts (text-conditioned), so prompt metrics such as CLIP score apply."""
        return False

    @property
    def conditional(self) -> bool:
        """Whether generation reads a condition (prompts or labels): without one, classifier-free guidance has
        nothing to steer by (its conditional and unconditional outputs are the same)."""
        return self.uses_prompts or self.reads_labels

    @staticmethod
    def refuse_labels(class_labels: Sequence[int] | None) -> None:
        if class_labels is not None:
            raise ValueError(f"class_labels={list(class_labels)} given to a model that is not class-conditional; "
                             f"leave them out")

    def external_weights(self) -> tuple[str, ...]:
        """State-dict prefixes that an export stores outside model.safetensors (see `save_external`)."""
        return ()

    def save_external(self, directory: Path) -> dict[str, Any]:
        """Write what an export keeps beside model.safetensors; returns the config changes that point at it."""
        return {}

    def check_unet(self, unet_config: Any, prefix: str = "model") -> None:
        """Raise ConfigError unless the UNet's context_dim, num_classes and pooled_dim match this conditioner."""
        for key, mine in (("context_dim", self.context_dim), ("num_classes", self.num_classes),
                          ("pooled_dim", self.pooled_dim)):
            theirs = getattr(unet_config, key)
            if theirs != mine:
                other = f", or {prefix}.conditioner.num_classes={theirs}" if key == "num_classes" and None not in (
                    theirs, mine) else ""  # which of the two numbers is the intended one, only the user knows
                raise ConfigError(f"{prefix}.unet.{key}={theirs} does not match {prefix}.conditioner.kind="
                                  f"{self.kind}, which needs {key}={mine}; set {prefix}.unet.{key}="
                                  f"{'null' if mine is None else mine}{other}")


class TextConditioner(Conditioner):
    """Prompts through a text encoder into the cross-attention context, and optionally a pooled prompt vector;
    dropped prompts become "".

    Args:
        encoder: a module mapping a list of prompts to the context (B, L, D) and a pooled vector (B, D'), with
            `context_dim`, `pooled_dim` and `trainable`.
        kind: the config's kind, for messages.
        cond_drop_prob: probability of replacing a prompt by the empty prompt in training.
        pooled: hand the pooled vector to the UNet too (`pooled`); otherwise it is left out.
    """

    def __init__(self, encoder: nn.Module, kind: str, cond_drop_prob: float = 0.1, pooled: bool = False):
        super().__init__(kind, cond_drop_prob)
        self.encoder = encoder
        self.cut_reported = False  # whether generation has said that a prompt is longer than the encoder reads
        self.context_dim = encoder.context_dim
        self.pooled_dim = encoder.pooled_dim if pooled else None
        self.trainable = encoder.trainable
        if hasattr(encoder, "freeze_unused"):  # a trainable encoder's parameters that this conditioning leaves unused
            encoder.freeze_unused(pooled)

    def forward(self, prompts: Sequence[str] | EncodedText, generator: torch.Generator | None = None) -> UNetKwargs:
        """Prompts (B strings), or their precomputed encoding, to {"context": (B, L, D), "class_labels": None,
        "pooled": (B, D') or None}. A dropped precomputed prompt takes the empty prompt's encoding."""
        if isinstance(prompts, str):
            raise TypeError("pass a sequence of prompts, not a single string")
        if isinstance(prompts, EncodedText):
            return self._encoded(prompts, generator)
        if self.training:
            prompts = drop_prompts(prompts, drop_mask(len(prompts), self.cond_drop_prob, generator))
        return self._encode(prompts)

    def _encoded(self, text: EncodedText, generator: torch.Generator | None) -> UNetKwargs:
        context, pooled = text.context, text.pooled                             # (B, L, D), (B, D') or None
        if self.training:
            keep = ~drop_mask(len(context), self.cond_drop_prob, generator).to(context.device)  # (B,)
            if not keep.all():
                empty = self._encode([""])
                context = torch.where(keep[:, None, None], context, empty["context"].to(context.dtype))
                if pooled is not None and empty["pooled"] is not None:
                    pooled = torch.where(keep[:, None], pooled, empty["pooled"].to(pooled.dtype))
        return {"context": context, "class_labels": None, "pooled": pooled if self.pooled_dim is not None else None}

    def batch_conditions(self, batch: Mapping[str, Any], caption_key: str = "caption", label_key: str = "label",
                         ) -> list[str] | EncodedText:
        """The batch's captions, or their precomputed encoding (`text_context`, `text_pooled`) when it has one."""
        if "text_context" in batch:
            if self.trainable:
                raise ConfigError("the batch carries precomputed text encodings (latent shards written with a text "
                                  "encoder) but the model's text encoder trains (model.conditioner.trainable=true, or "
                                  "a byte encoder without model.conditioner.name_or_path): encode the shards without "
                                  "the text encoder, or condition on that frozen encoder")
            return EncodedText(batch["text_context"], batch.get("text_pooled"))
        return list(batch_entry(batch, caption_key, "model.caption_key"))

    def sampling_conditions(self, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                            batch_size: int) -> list[str]:
        self.refuse_labels(class_labels)
        if prompts is None or len(prompts) != batch_size:
            raise ValueError(f"{0 if prompts is None else len(prompts)} prompts for {batch_size} seeds; a text-"
                             f"conditioned model needs one prompt per seed")
        if not self.cut_reported:  # as diffusers' encode_prompt, but once (generate runs batch by batch)
            cut = [(prompt, dropped) for prompt in dict.fromkeys(prompts) if (dropped := self.encoder.cut(prompt))]
            if cut:
                prompt, dropped = cut[0]
                log.warning("%d of the %d prompts of this batch are longer than the text encoder's %d tokens (its "
                            "start and end tokens included) and lose their end, e.g. %r loses %r (said once: later "
                            "batches' prompts are cut alike, unsaid)", len(cut), len(dict.fromkeys(prompts)),
                            self.encoder.max_length, prompt[:80], dropped[:80])
                self.cut_reported = True
        return list(prompts)

    @property
    def uses_prompts(self) -> bool:
        return True

    def external_weights(self) -> tuple[str, ...]:
        return ("encoder.transformer.",) if hasattr(self.encoder, "tokenizer") else ()

    def save_external(self, directory: Path) -> dict[str, Any]:
        """A transformers encoder (CLIP, T5, ...) is saved with its tokenizer into `directory/text_encoder`, where
        `name_or_path` then points (written beside, then moved into place); the export no longer names the
        tokenizer it was built with (`tokenizer`, e.g. for a single file): its copy is in that folder."""
        if not self.external_weights():
            return {}
        target = Path(directory) / TEXT_ENCODER_DIR
        staging = Path(directory) / f".{TEXT_ENCODER_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        transformer = self.encoder.transformer
        if transformer.dtype != torch.float32:  # fp32 on disk, as model.safetensors (a copy: the module stays)
            transformer = copy.deepcopy(transformer).float()
        transformer.save_pretrained(staging)
        self.encoder.tokenizer.save_pretrained(staging)
        with_default_modes(staging)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
        return {"name_or_path": TEXT_ENCODER_DIR, "tokenizer": None}

    def unconditional(self, batch_size: int, device: torch.device | str = "cpu") -> UNetKwargs:
        """The empty prompt's conditioning, repeated (the encoder's own device is used)."""
        return self._encode([""] * batch_size)

    def _encode(self, prompts: Sequence[str]) -> UNetKwargs:
        # A frozen encoder runs in its own precision, outside the trainer's autocast, as ldm-encode runs it: the
        # context of a bf16-mixed step on images then equals the one stored in latent shards.
        device_type = next(self.encoder.parameters()).device.type
        with torch.autocast(device_type, enabled=self.trainable and torch.is_autocast_enabled(device_type)):
            context, pooled = self.encoder(prompts)                             # (B, L, D), (B, D')
        return {"context": context, "class_labels": None, "pooled": pooled if self.pooled_dim is not None else None}


class ClassConditioner(Conditioner):
    """Class labels, either embedded here as one context token (`class_embed=context`) or handed to the UNet's
    label table (`class_embed=unet`); dropped labels become the null class `num_classes`.

    Args:
        num_classes: real classes; labels lie in [0, num_classes], num_classes being the null class.
        width: width of the context token; None hands the labels to the UNet instead.
        cond_drop_prob: probability of replacing a label by the null class in training.
    """

    trainable = True
    reads_labels = True

    def __init__(self, num_classes: int, width: int | None, cond_drop_prob: float = 0.1):
        super().__init__("class", cond_drop_prob)
        self.null_class = num_classes
        self.embedder = ClassEmbedder(num_classes, width) if width is not None else None
        if self.embedder is not None:
            self.context_dim = width
        else:
            self.num_classes = num_classes
            self.trainable = False

    def forward(self, labels: torch.Tensor | Sequence[int], generator: torch.Generator | None = None) -> UNetKwargs:
        """Labels (B,) to {"context": (B, 1, D), "class_labels": None, ...} or {"context": None, "class_labels": (B,),
        ...}; "pooled" is None."""
        device = self.embedder.embedding.weight.device if self.embedder is not None else None
        labels = torch.as_tensor(labels, dtype=torch.long, device=device)
        if labels.ndim != 1:
            raise ValueError(f"class labels must be (B,); got {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class):
            raise ValueError(f"class labels must lie in [0, {self.null_class}] ({self.null_class} = null class); "
                             f"got min {int(labels.min())}, max {int(labels.max())}")
        if self.training:
            if labels.numel() and labels.max() == self.null_class:
                raise ValueError(f"class label {self.null_class} is the null class, which training reaches only by "
                                 f"condition dropout (model.conditioner.cond_drop_prob); a sample's label lies in "
                                 f"[0, {self.null_class - 1}]")
            labels = drop_labels(labels, drop_mask(len(labels), self.cond_drop_prob, generator), self.null_class)
        return self._route(labels)

    def unconditional(self, batch_size: int, device: torch.device | str = "cpu") -> UNetKwargs:
        """The null class for every sample (the embedding table's device when there is one)."""
        if self.embedder is not None:
            device = self.embedder.embedding.weight.device
        return self._route(torch.full((batch_size,), self.null_class, dtype=torch.long, device=device))

    def batch_conditions(self, batch: Mapping[str, Any], caption_key: str = "caption", label_key: str = "label",
                         ) -> torch.Tensor:
        if label_key == "label" and label_key not in batch:
            raise ValueError(f"a class-conditional model reads labels from the batch key 'label' (every sample's "
                             f"metadata needs an integer 'label'); the batch has {sorted(batch)}")
        return batch_entry(batch, label_key, "model.label_key")

    def sampling_conditions(self, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                            batch_size: int) -> torch.Tensor:
        if class_labels is None or len(class_labels) != batch_size:
            raise ValueError(f"a class-conditional model needs {batch_size} class labels, one per seed; got "
                             f"{class_labels}")
        values = class_labels.tolist() if torch.is_tensor(class_labels) else list(class_labels)
        if not all(is_int(v) for v in values):
            raise ValueError(f"class labels are integers; got {values}")  # 1.7 was cut to class 1
        return torch.tensor(values, dtype=torch.long)

    def _route(self, labels: torch.Tensor) -> UNetKwargs:
        if self.embedder is not None:
            return {"context": self.embedder(labels), "class_labels": None, "pooled": None}  # (B, 1, D)
        return {"context": None, "class_labels": labels, "pooled": None}                     # (B,)


class NullConditioner(Conditioner):
    """Unconditional models: no context, no labels."""

    def forward(self, conds: Any = None, generator: torch.Generator | None = None) -> UNetKwargs:
        return {"context": None, "class_labels": None, "pooled": None}

    def unconditional(self, batch_size: int, device: torch.device | str = "cpu") -> UNetKwargs:
        return {"context": None, "class_labels": None, "pooled": None}

    def batch_conditions(self, batch: Mapping[str, Any], caption_key: str = "caption", label_key: str = "label"):
        return None

    def sampling_conditions(self, prompts: Sequence[str] | None, class_labels: Sequence[int] | None,
                            batch_size: int) -> None:
        self.refuse_labels(class_labels)
        return None


def is_stable_diffusion(name_or_path: str | None) -> bool:
    """Whether `name_or_path` is a Stable Diffusion diffusers pipeline folder or single file (whose CLIP text encoder
    `ldm.convert` reads) rather than a transformers model directory or hub name."""
    from ldm.convert.common import SINGLE_FILE_SUFFIXES

    if not name_or_path:
        return False
    path = Path(name_or_path).expanduser()
    return (path / "model_index.json").is_file() or (path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES)


def class_settings(config: ConditionerConfig) -> dict[str, Any]:
    """The class-label keys (num_classes, class_embed) `config` sets to other than their defaults."""
    defaults = ConditionerConfig.__dataclass_fields__
    return {key: getattr(config, key) for key in ("num_classes", "class_embed")
            if getattr(config, key) != defaults[key].default}


def build_conditioner(config: ConditionerConfig | dict | DictConfig | None,
                      prefix: str = "model.conditioner", load_pretrained: bool = True,
                      text_encoder_config: dict[str, Any] | None = None) -> Conditioner:
    """Build the conditioner a config names.

    Args:
        config: a ConditionerConfig, or a dict / DictConfig validated against it.
        prefix: where the node sits in the full config, for error messages.
        load_pretrained: read a pretrained byte encoder from name_or_path; false builds it empty, for a checkpoint's
            state dict to fill (a checkpoint holds its weights and must not need the export).
        text_encoder_config: the transformers config (`config.to_dict()`) of a CLIP or hf text encoder whose weights
            come from a checkpoint's state dict: the encoder is built empty from it and only its tokenizer is read
            (`text_encoder_config`), not the weights, nor a Stable Diffusion model around them.
    """
    c = to_dataclass(ConditionerConfig, config, prefix)
    if c.tokenizer is not None and c.kind != "clip" and load_pretrained:  # checked where model.init_from has set kind
        raise ConfigError(f"{prefix}.tokenizer={c.tokenizer} applies to kind=clip (for a Stable Diffusion single "
                          f"file, which holds none); kind={c.kind} uses name_or_path's own: leave the tokenizer out")
    # a class-conditional model meant, a text one trained silently: refused for a new build (load_pretrained), so
    # that a recorded config (a checkpoint's, an export's) that carries the ignored key still loads
    if load_pretrained and c.kind != "class" and (given := class_settings(c)):
        key, value = next(iter(given.items()))
        instead = f"set {prefix}.kind=class for a class-conditional model, or " if prefix.startswith("model.") else ""
        raise ConfigError(f"{prefix}.{key}={value} applies to kind=class (class labels); {instead}leave {key} out "
                          f"for kind={c.kind}")
    if c.kind == "class":
        width = c.width if c.class_embed == "context" else None
        return ClassConditioner(c.num_classes, width, c.cond_drop_prob)
    if c.kind == "none":
        return NullConditioner(c.kind, c.cond_drop_prob)
    key = f"{prefix}.name_or_path"
    if c.kind in ("clip", "hf") and text_encoder_config is not None:
        encoder = _empty_text_encoder(c, text_encoder_config, prefix)
    elif c.kind == "clip" and is_stable_diffusion(c.name_or_path):
        from ldm.convert import load_components

        encoder = load_components(c.name_or_path, tokenizer_path=c.tokenizer, key=key,
                                  tokenizer_key=f"{prefix}.tokenizer").build_text_encoder(
            c.max_length, c.trainable, c.layer, prefix)
    elif c.kind == "clip":
        tokenizer = None
        if c.tokenizer is not None:
            from transformers import CLIPTokenizer

            from ldm.convert.components import refuse_pipeline_folder

            refuse_pipeline_folder(c.tokenizer, f"{prefix}.tokenizer")
            tokenizer = load_transformers(CLIPTokenizer, c.tokenizer, f"{prefix}.tokenizer")
        encoder = CLIPTextEncoder(c.name_or_path or DEFAULT_CLIP, c.max_length, c.layer, c.trainable, key,
                                  tokenizer=tokenizer)
    elif c.kind == "hf":
        encoder = HFTextEncoder(c.name_or_path, c.max_length, c.trainable, key)
    else:
        architecture = ByteEncoderConfig(c.width, c.num_layers, c.num_heads, c.max_length)
        if c.name_or_path is not None and load_pretrained:
            encoder = ByteTextEncoder.from_pretrained(c.name_or_path, c.trainable, architecture, key)
        else:  # new and trained with the UNet, or empty for a checkpoint's state dict to fill
            encoder = ByteTextEncoder(**asdict(architecture), trainable=c.name_or_path is None or c.trainable)
    return TextConditioner(encoder, c.kind, c.cond_drop_prob, c.pooled)


def text_encoder_config(conditioner: Conditioner) -> dict[str, Any] | None:
    """The transformers config of a conditioner's CLIP or hf text encoder, as plain values (what a checkpoint stores
    to rebuild it with `build_conditioner(..., text_encoder_config=...)`); None for other conditioners."""
    transformer = getattr(getattr(conditioner, "encoder", None), "transformer", None)
    return None if transformer is None else json.loads(transformer.config.to_json_string())


def _empty_text_encoder(c: ConditionerConfig, config: dict[str, Any], prefix: str) -> nn.Module:
    """A CLIP or hf text encoder of `config` with untrained weights and the tokenizer its config node names: a
    Stable Diffusion folder's tokenizer/ (or model.conditioner.tokenizer), else name_or_path's own."""
    key = f"{prefix}.name_or_path"
    if c.kind == "hf":
        return HFTextEncoder(c.name_or_path, c.max_length, c.trainable, key, config=config)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if c.tokenizer is not None:
        from ldm.convert.components import refuse_pipeline_folder

        source, source_key = c.tokenizer, f"{prefix}.tokenizer"
        refuse_pipeline_folder(source, source_key)
    elif is_stable_diffusion(c.name_or_path):
        if not Path(c.name_or_path).expanduser().is_dir():
            raise ConfigError(f"{key}={c.name_or_path} is a single file, which holds no tokenizer: set "
                              f"{prefix}.tokenizer to the CLIP tokenizer folder the model trained with")
        source, source_key = str(Path(c.name_or_path).expanduser() / "tokenizer"), key
    else:
        source, source_key = c.name_or_path or DEFAULT_CLIP, key
    tokenizer = load_transformers(CLIPTokenizer, source, source_key)
    return CLIPTextEncoder(c.name_or_path or DEFAULT_CLIP, c.max_length, c.layer, c.trainable, key,
                           transformer=CLIPTextModel(CLIPTextConfig.from_dict(config)), tokenizer=tokenizer)
