"""Conditioning encoders (CLIP, any transformers encoder, a trainable byte-level encoder, class labels) and
condition dropout for classifier-free guidance; `build_conditioner(config)` is the entry point."""

from ldm.conditioning.byte import ByteTextEncoder
from ldm.conditioning.conditioner import (
    ClassConditioner,
    Conditioner,
    ConditionerConfig,
    EncodedText,
    NullConditioner,
    TextConditioner,
    build_conditioner,
    class_settings,
    text_encoder_config,
)
from ldm.conditioning.dropout import drop_labels, drop_mask, drop_prompts
from ldm.conditioning.labels import ClassEmbedder
from ldm.conditioning.text import CLIPTextEncoder, HFTextEncoder, load_pretrained

__all__ = [
    "ByteTextEncoder", "CLIPTextEncoder", "ClassConditioner", "ClassEmbedder", "Conditioner", "ConditionerConfig",
    "EncodedText", "HFTextEncoder", "NullConditioner", "TextConditioner", "build_conditioner", "class_settings",
    "drop_labels", "drop_mask", "drop_prompts", "load_pretrained", "text_encoder_config",
]
