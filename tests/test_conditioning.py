"""Conditioning: a tiny CLIP and T5 written locally and loaded by path, the missing-model error, the byte-level
encoder, class labels, and condition dropout for guidance."""

from __future__ import annotations

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch
from convert_helpers import tiny_tokenizer

from ldm.conditioning import ByteTextEncoder, ConditionerConfig, build_conditioner, drop_mask, text_encoder_config
from ldm.conditioning.byte import BOS, EOS, PAD, byte_tokenize
from ldm.config import ConfigError
from ldm.nn.unet import UNET_CONFIGS, UNet, unet_config


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIP text model (hidden 32, 3 layers) and tokenizer saved with save_pretrained."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("clip_files"))
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    target = tmp_path_factory.mktemp("tiny_clip")
    CLIPTextModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


PROMPTS = ["the cat", "", "a photo of the moon 🌙"]


def test_clip_by_local_path(tiny_clip):
    conditioner = build_conditioner({"kind": "clip", "name_or_path": str(tiny_clip)}).train()
    assert conditioner.context_dim == 32 and not conditioner.trainable
    encoder = conditioner.encoder
    assert not encoder.training and not encoder.transformer.training  # frozen: stays in eval mode
    assert all(not p.requires_grad for p in conditioner.parameters())
    conditioner.cond_drop_prob = 0.0
    cond = conditioner(PROMPTS)
    assert cond["context"].shape == (3, 77, 32) and not cond["context"].requires_grad
    assert cond["pooled"] is None  # pooled=false (the default): the UNet gets no vector
    # a prompt over 77 tokens is cut to them, as diffusers' encode_prompt cuts it (whole, it overran the positions)
    long = " ".join(["circle"] * 100)
    ids = encoder.tokenizer([long], max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    with torch.no_grad():
        expected = encoder.transformer(input_ids=ids.input_ids).last_hidden_state    # (1, 77, 32)
    torch.testing.assert_close(conditioner([long])["context"], expected)


def test_a_half_precision_clip_runs_in_fp32_and_a_checkpoint_rebuilds_it_alike(tiny_clip, tmp_path):
    """A CLIP saved in fp16 (the hub's fp16 copies) loads in fp32, as the README promises for frozen encoders, and
    a checkpoint's rebuild from the recorded config (`text_encoder_config`) gives the same contexts to the bit."""
    import shutil

    from transformers import CLIPTextModel

    shutil.copytree(tiny_clip, tmp_path / "clip16")
    CLIPTextModel.from_pretrained(str(tiny_clip)).half().save_pretrained(tmp_path / "clip16")
    node = {"kind": "clip", "name_or_path": str(tmp_path / "clip16"), "cond_drop_prob": 0.0}
    loaded = build_conditioner(node).eval()
    assert loaded.encoder.transformer.dtype == torch.float32
    rebuilt = build_conditioner(node, load_pretrained=False, text_encoder_config=text_encoder_config(loaded)).eval()
    rebuilt.load_state_dict(loaded.state_dict())
    assert torch.equal(rebuilt(PROMPTS)["context"], loaded(PROMPTS)["context"])


def test_clip_pooled_is_the_eos_state(tiny_clip):
    conditioner = build_conditioner({"kind": "clip", "name_or_path": str(tiny_clip), "pooled": True}).eval()
    assert conditioner.pooled_dim == 32
    cond = conditioner(PROMPTS)
    ids = conditioner.encoder.tokenize(PROMPTS)
    eos = (ids == conditioner.encoder.tokenizer.eos_token_id).int().argmax(1)  # the first EOS of each prompt
    torch.testing.assert_close(cond["pooled"], cond["context"][torch.arange(3), eos])


def test_clip_last_and_penultimate_differ(tiny_clip):
    last = build_conditioner({"kind": "clip", "name_or_path": str(tiny_clip)}).eval()
    penultimate = build_conditioner({"kind": "clip", "name_or_path": str(tiny_clip), "layer": "penultimate"}).eval()
    a, b = last(PROMPTS)["context"], penultimate(PROMPTS)["context"]
    assert a.shape == b.shape == (3, 77, 32)
    assert not torch.allclose(a, b)
    # penultimate = final_layer_norm(hidden_states[-2]): unit variance per token, as the last layer's output.
    torch.testing.assert_close(b.var(-1, unbiased=False).mean(), torch.tensor(1.0), atol=0.05, rtol=0)
    # a checkpoint rebuilds the encoder with its layer (text_encoder_config): the same contexts
    node = {"kind": "clip", "name_or_path": str(tiny_clip), "layer": "penultimate"}
    rebuilt = build_conditioner(node, load_pretrained=False, text_encoder_config=text_encoder_config(penultimate))
    rebuilt.load_state_dict(penultimate.state_dict())
    assert torch.equal(rebuilt.eval()(PROMPTS)["context"], b)
    # model.conditioner.max_length is the context's length
    short = build_conditioner({"kind": "clip", "name_or_path": str(tiny_clip), "max_length": 16}).eval()
    assert short(PROMPTS)["context"].shape == (3, 16, 32)


def test_missing_model_names_the_config_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"model\.conditioner\.name_or_path='ldm-tests/no-such-clip'") as err:
        build_conditioner({"kind": "clip", "name_or_path": "ldm-tests/no-such-clip"})
    assert "local directory" in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.conditioner\.name_or_path='/no/such/clip' is not a directory"):
        build_conditioner({"kind": "clip", "name_or_path": "/no/such/clip"})


def test_a_byte_encoder_export_given_to_a_transformers_kind_is_named(tmp_path, monkeypatch):
    """experiment=quickstart_clip's export (a "small CLIP") given to kind=clip or kind=hf: "cannot load
    CLIPTokenizer ... run once with network access to fill the Hugging Face cache", as if it were a missing model."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export = ByteTextEncoder(width=32, num_layers=1, num_heads=2, max_length=16).save_pretrained(tmp_path / "export")
    for kind in ("clip", "hf"):
        with pytest.raises(ConfigError, match=r"^model\.conditioner\.name_or_path='.*export' holds a byte text "
                                              r"encoder export \(model\.conditioner\.name_or_path\), not a "
                                              r"transformers model; set model\.conditioner\.kind=byte to read it$"):
            build_conditioner({"kind": kind, "name_or_path": str(export)})
    with pytest.raises(ConfigError, match=r"holds a byte text encoder export .* set model\.conditioner\.kind=byte"):
        build_conditioner({"kind": "clip", "name_or_path": str(tmp_path)})  # the run directory, as kind=byte takes it
    assert build_conditioner({"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 2, "max_length": 16,
                              "name_or_path": str(export)}).encoder.config.width == 32


def test_hf_encoder_loads_t5_encoder_by_path(tiny_clip, tmp_path):
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_clip))
    config = T5Config(vocab_size=len(tokenizer), d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3)
    T5EncoderModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    conditioner = build_conditioner({"kind": "hf", "name_or_path": str(tmp_path), "max_length": 16}).eval()
    assert type(conditioner.encoder.transformer).__name__ == "T5EncoderModel"
    assert conditioner.context_dim == 24 and not conditioner.trainable
    assert conditioner(PROMPTS)["context"].shape == (3, 16, 24)
    pooled = build_conditioner({"kind": "hf", "name_or_path": str(tmp_path), "max_length": 16, "pooled": True}).eval()
    cond = pooled(["a red square"])
    real = len(pooled.encoder.tokenizer("a red square").input_ids)
    torch.testing.assert_close(cond["pooled"][0], cond["context"][0, :real].mean(0))  # mean over the real tokens
    # the padding is masked out: the real tokens are transformers' encoding of the prompt alone (no padding)
    alone = T5EncoderModel.from_pretrained(tmp_path).eval()(
        input_ids=torch.tensor([pooled.encoder.tokenizer("a red square").input_ids])).last_hidden_state
    torch.testing.assert_close(cond["context"][:, :real], alone, rtol=1e-5, atol=1e-5)

    trainable = build_conditioner({"kind": "hf", "name_or_path": str(tmp_path), "trainable": True}).train()
    assert trainable.trainable and trainable.encoder.training
    trainable(PROMPTS)["context"].square().mean().backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)

    # A checkpoint rebuilds the encoder from its recorded config, the weights from its state dict: not read again.
    node = {"kind": "hf", "name_or_path": str(tmp_path), "max_length": 16}
    recorded = text_encoder_config(conditioner)
    (tmp_path / "model.safetensors").unlink()
    empty = build_conditioner(node, load_pretrained=False, text_encoder_config=recorded).eval()
    assert type(empty.encoder.transformer).__name__ == "T5EncoderModel"
    empty.load_state_dict(conditioner.state_dict())
    torch.testing.assert_close(empty(PROMPTS)["context"], conditioner(PROMPTS)["context"], rtol=0, atol=0)


def test_an_encoder_without_its_own_tokenizer_is_refused(tiny_clip, tmp_path):
    """A T5 folder without spiece.model: transformers builds a tokenizer of T5's 100 extra ids and `▁` that turns
    every word into `▁` + unknown (only the words' number would reach the UNet). A CLIP tokenizer that ends prompts
    with another token than the model's end token: the pooled vector would be the start token's, the same for every
    prompt."""
    from transformers import (
        AutoTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        DebertaV2Config,
        DebertaV2Model,
        T5Config,
        T5EncoderModel,
    )

    from ldm.conditioning.text import CLIPTextEncoder

    T5EncoderModel(T5Config(d_model=24, d_kv=8, d_ff=48, num_layers=1, num_heads=3)).save_pretrained(tmp_path / "t5")
    DebertaV2Model(DebertaV2Config(vocab_size=128, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32)).save_pretrained(tmp_path / "deberta")  # len() 7, 5 entries
    for name in ("t5", "deberta"):
        with pytest.raises(ConfigError, match=rf"name_or_path=.*{name}'?: cannot load AutoTokenizer: .*no tokenizer"):
            build_conditioner({"kind": "hf", "name_or_path": str(tmp_path / name)})

    # a real vocabulary that lacks common words is not an empty one: a small BERT vocab.txt loads
    from transformers import BertConfig, BertModel

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    BertModel(BertConfig(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(tmp_path / "bert")
    assert build_conditioner({"kind": "hf", "name_or_path": str(tmp_path / "bert")}).context_dim == 16

    # what kind=hf cannot encode prompts with, refused naming the key (raw errors, or an export reloaded with new
    # weights: BART's encoder alone saved as a BartModel), and settings it would ignore or overflow
    from transformers import BartConfig, BartModel, CLIPConfig, CLIPModel, RobertaConfig, RobertaModel

    def folder(name: str, model, pad: bool = True) -> str:
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "bert"))  # the 7-word BERT vocabulary
        if not pad:
            tokenizer.pad_token = None
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return str(tmp_path / name)

    small = dict(vocab_size=7, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    bart = BartModel(BartConfig(vocab_size=7, d_model=16, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                decoder_ffn_dim=32, max_position_embeddings=32))
    cases = [
        (folder("clipmodel", CLIPModel(CLIPConfig(text_config=small, vision_config={
            **small, "image_size": 8, "patch_size": 4}))), {}, r"is a multimodal clip model; kind=hf takes a text "
                                                             r"encoder: for CLIP use kind=clip"),
        (folder("bart", bart), {}, r"is a bart encoder-decoder: kind=hf takes encoder models .* would reload with "
                                   r"new weights"),
        (folder("nopad", BertModel(BertConfig(**small)), pad=False), {}, r"its tokenizer has no padding token"),
        (str(tmp_path / "bert"), {"max_length": 600}, r"model\.conditioner\.max_length=600 exceeds the 512 positions "
                                                      r"of .*bert; set model\.conditioner\.max_length to at most 512"),
        (str(tmp_path / "bert"), {"tokenizer": str(tmp_path / "bert")}, r"tokenizer=.* applies to kind=clip"),
        # RoBERTa's position ids start after the padding index: 10 - (1 + 1) usable
        (folder("roberta", RobertaModel(RobertaConfig(**small, max_position_embeddings=10, pad_token_id=1))),
         {"max_length": 9}, r"max_length=9 exceeds the 8 positions"),
    ]
    for path, extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            build_conditioner({"kind": "hf", "name_or_path": path, **extra})
    assert build_conditioner({"kind": "hf", "name_or_path": str(tmp_path / "roberta"), "max_length": 8}).eval()(
        ["a b"])["context"].shape == (1, 8, 16)
    # a checkpoint written before these refusals (a BART encoder, a tokenizer the hf kind ignored) still loads
    old = build_conditioner({"kind": "hf", "name_or_path": str(tmp_path / "bart"), "tokenizer": "/ignored"},
                            load_pretrained=False, text_encoder_config=bart.config.to_dict())
    assert type(old.encoder.transformer).__name__ == "BartEncoder"

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_clip))
    other = CLIPTextModel(CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, eos_token_id=599))
    with pytest.raises(ConfigError, match=rf"ends prompts with token {tokenizer.eos_token_id}, the text encoder "
                                          r"pools at its end token 599: they are not a pair"):
        CLIPTextEncoder("ours", transformer=other, tokenizer=tokenizer)


def test_byte_tokenize_handles_empty_unicode_and_truncation():
    ids, mask = byte_tokenize(["", "é", "x" * 100], max_length=8)
    assert ids[0].tolist() == [BOS, EOS] + [PAD] * 6
    assert ids[1].tolist() == [BOS, 0xC3, 0xA9, EOS] + [PAD] * 4
    assert ids[2].tolist() == [BOS] + [ord("x")] * 6 + [EOS]
    assert mask.sum(1).tolist() == [2, 4, 8]


def test_byte_encoder_shapes_and_gradients():
    encoder = ByteTextEncoder(width=32, num_layers=2, num_heads=4, max_length=16)
    assert encoder.trainable and encoder.context_dim == encoder.pooled_dim == 32
    context, pooled = encoder(["", "héllo wörld ✨", "a very long prompt " * 10])
    assert context.shape == (3, 16, 32) and torch.isfinite(context).all()
    # The pooled vector is the mean over the real tokens (BOS, bytes, EOS): 2 for the empty prompt.
    torch.testing.assert_close(pooled[0], context[0, :2].mean(0))
    torch.testing.assert_close(pooled[2], context[2].mean(0))
    (context.square().mean() + pooled.square().mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in encoder.parameters())
    # Truncation: a prompt and its own first max_length - 2 bytes encode identically.
    long = "0123456789abcdefghij"
    torch.testing.assert_close(encoder([long]), encoder([long[:14]]))


def test_byte_padding_does_not_change_real_tokens():
    encoder = ByteTextEncoder(width=32, num_layers=2, num_heads=4, max_length=16).eval()
    short = ByteTextEncoder(width=32, num_layers=2, num_heads=4, max_length=8).eval()
    short.load_state_dict({k: v[:8] if k == "pos_embed" else v for k, v in encoder.state_dict().items()})
    (context, pooled), (short_context, short_pooled) = encoder(["cat"]), short(["cat"])
    torch.testing.assert_close(context[:, :5], short_context[:, :5])
    torch.testing.assert_close(pooled, short_pooled)  # padding never enters the pooled vector


def byte_conditioner(p: float):
    torch.manual_seed(0)
    return build_conditioner(ConditionerConfig(kind="byte", width=32, num_layers=1, num_heads=4, max_length=16,
                                               cond_drop_prob=p))


def test_dropout_all_gives_exactly_the_empty_prompt():
    conditioner = byte_conditioner(1.0).train()
    g = torch.Generator().manual_seed(1)
    context = conditioner(PROMPTS, generator=g)["context"]
    assert torch.equal(context, conditioner.unconditional(3)["context"])
    assert torch.equal(context, conditioner.encoder([""] * 3)[0])


def test_dropout_none_and_eval_mode_keep_every_prompt():
    conditioner = byte_conditioner(0.0).train()
    kept = conditioner(PROMPTS, generator=torch.Generator().manual_seed(1))["context"]
    assert torch.equal(kept, conditioner.encoder(PROMPTS)[0])
    conditioner.cond_drop_prob = 1.0
    assert torch.equal(conditioner.eval()(PROMPTS)["context"], kept)  # no dropout outside training


def test_dropout_is_deterministic_for_a_generator():
    masks = [drop_mask(256, 0.3, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6)]
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert 0.15 < masks[0].float().mean() < 0.45
    # Every probability draws the same uniforms: a larger p drops a superset.
    assert (drop_mask(256, 0.1, torch.Generator().manual_seed(5)) <= masks[0]).all()
    conditioner = byte_conditioner(0.5).train()
    a = conditioner(PROMPTS * 4, generator=torch.Generator().manual_seed(3))["context"]
    b = conditioner(PROMPTS * 4, generator=torch.Generator().manual_seed(3))["context"]
    assert torch.equal(a, b)


def test_precomputed_encodings_are_dropped_as_their_captions_are():
    """Latent shards carry the frozen encoder's output (`text_context`): guidance dropout must replace it by the empty
    prompt's as it replaces captions, or a run on latent shards never trains the unconditional model."""
    from ldm.conditioning.conditioner import EncodedText

    conditioner = byte_conditioner(0.5).train()
    prompts = PROMPTS * 4
    with torch.no_grad():
        encoded = EncodedText(conditioner.encoder(prompts)[0], None)
        from_captions = conditioner(prompts, generator=torch.Generator().manual_seed(3))["context"]
        from_encodings = conditioner(encoded, generator=torch.Generator().manual_seed(3))["context"]
        empty = conditioner.encoder([""])[0][0]
    dropped = [torch.allclose(row, empty, atol=1e-5) for row in from_encodings]
    assert 0 < sum(dropped) < len(prompts)
    torch.testing.assert_close(from_encodings, from_captions)
    # the pooled vector too (pooled: true), by the same draws; and nothing is dropped outside training (val/loss)
    torch.manual_seed(0)
    pooled = build_conditioner(ConditionerConfig(kind="byte", width=32, num_layers=1, num_heads=4, max_length=16,
                                                 cond_drop_prob=0.5, pooled=True)).train()
    with torch.no_grad():
        encoded = EncodedText(*pooled.encoder(prompts))
        from_captions = pooled(prompts, generator=torch.Generator().manual_seed(3))
        from_encodings = pooled(encoded, generator=torch.Generator().manual_seed(3))
        empty = pooled.unconditional(1)
    for key in ("context", "pooled"):
        torch.testing.assert_close(from_encodings[key], from_captions[key])
        assert [torch.allclose(row, empty[key][0], atol=1e-5) for row in from_encodings[key]] == dropped
    always = byte_conditioner(1.0).eval()
    with torch.no_grad():
        context = always.encoder(prompts)[0]
        assert torch.equal(always(EncodedText(context, None), generator=torch.Generator())["context"], context)
    # a latent shard's batch (text_context, text_pooled) reaches the UNet whole outside training
    pooled.eval().trainable = False  # as an encoder loaded frozen from its path, whose shards were precomputed
    with torch.no_grad():
        context, vector = pooled.encoder(prompts)
        out = pooled(pooled.batch_conditions({"text_context": context, "text_pooled": vector, "caption": prompts}))
    assert torch.equal(out["context"], context) and torch.equal(out["pooled"], vector)


def test_class_labels_as_context_and_for_the_unet():
    as_context = build_conditioner({"kind": "class", "num_classes": 10, "width": 16, "cond_drop_prob": 1.0}).train()
    out = as_context(torch.tensor([1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert out["context"].shape == (3, 1, 16) and out["class_labels"] is None
    assert torch.equal(out["context"], as_context.unconditional(3)["context"])

    for_unet = build_conditioner({"kind": "class", "num_classes": 10, "class_embed": "unet"}).train()
    assert for_unet.context_dim is None and for_unet.num_classes == 10
    labels = for_unet([1, 2, 3], generator=torch.Generator().manual_seed(0))["class_labels"]
    assert labels.shape == (3,) and ((labels == 10) | (labels == torch.tensor([1, 2, 3]))).all()
    for_unet.cond_drop_prob = 1.0  # never dropped outside training, whatever the rate
    assert (for_unet.eval()([1, 2, 3])["class_labels"] == torch.tensor([1, 2, 3])).all()
    with torch.no_grad():
        assert torch.equal(as_context.eval()([1, 2, 3])["context"], as_context.embedder(torch.tensor([1, 2, 3])))
    assert (for_unet.unconditional(2)["class_labels"] == 10).all()
    with pytest.raises(ValueError, match=r"\[0, 10\]"):
        for_unet([11])
    # the null class is guidance's: a training sample labelled with it trained the unconditional embedding
    with pytest.raises(ValueError, match=r"class label 10 is the null class, which training reaches only by "
                                         r"condition dropout"):
        for_unet.train()([1, 10])
    assert (for_unet.eval()([10])["class_labels"] == 10).all()  # sampling may ask for it
    # generation's labels are integers (1.7 was cut to class 1, True read as 1)
    assert torch.equal(for_unet.sampling_conditions(None, torch.tensor([2, 3]), 2), torch.tensor([2, 3]))
    for bad in ([1.7, 2], [True, 2], torch.tensor([1.0, 2.0])):
        with pytest.raises(ValueError, match="class labels are integers"):
            for_unet.sampling_conditions(None, bad, 2)
    assert for_unet.conditional and not for_unet.uses_prompts


def test_none_kind_returns_no_context():
    conditioner = build_conditioner({"kind": "none"})
    assert conditioner(["ignored"]) == {"context": None, "class_labels": None, "pooled": None}
    assert conditioner.context_dim is None and not conditioner.trainable and not conditioner.conditional
    # labels given to a model that reads none were ignored without a word
    with pytest.raises(ValueError, match=r"class_labels=\[1\] given to a model that is not class-conditional"):
        conditioner.sampling_conditions(None, [1], 1)


def test_config_errors_name_the_key():
    for kind in ("class", "none", "byte"):  # a tokenizer is read for kind=clip only: never silently ignored
        with pytest.raises(ConfigError, match=rf"model\.conditioner\.tokenizer=/tok applies to kind=clip .* "
                                              rf"kind={kind} uses"):
            build_conditioner({"kind": kind, "tokenizer": "/tok"})
    with pytest.raises(ConfigError, match=r"model\.conditioner\.kind='t5' is not allowed"):
        build_conditioner({"kind": "t5"})
    with pytest.raises(ConfigError, match=r"model\.conditioner\.layer"):
        build_conditioner({"kind": "clip", "layer": "middle"})
    with pytest.raises(ConfigError, match=r"layer=penultimate applies to kind=clip .* kind=byte reads its last layer"):
        build_conditioner({"kind": "byte", "layer": "penultimate"})  # was accepted and ignored
    for kind, key, value in (("byte", "num_classes", 10), ("none", "class_embed", "unet")):  # trained as kind says
        message = rf"model\.conditioner\.{key}={value} applies to kind=class .*; set model\.conditioner\.kind=class"
        with pytest.raises(ConfigError, match=message):
            build_conditioner({"kind": kind, key: value})
        # a recorded config (a checkpoint's, an export's) that carries the key older code ignored still loads
        assert build_conditioner({"kind": kind, key: value}, load_pretrained=False).kind == kind
    with pytest.raises(ConfigError, match=r"^text_encoder\.num_classes=10 applies to kind=class \(class labels\); "
                                          r"leave num_classes out for kind=none$"):  # ldm-encode: kind=class is no
        build_conditioner({"kind": "none", "num_classes": 10}, prefix="text_encoder")  # text encoder either
    with pytest.raises(ConfigError, match="needs name_or_path"):
        build_conditioner({"kind": "hf"})
    with pytest.raises(ConfigError, match="pooled=true needs a text encoder"):
        build_conditioner({"kind": "class", "pooled": True})


def test_conditioner_drives_the_unet():
    conditioner = build_conditioner({"kind": "byte", "width": 64, "num_layers": 1, "num_heads": 4}).train()
    unet = UNet(UNET_CONFIGS["tiny"])
    conditioner.check_unet(unet.config)
    cond = conditioner(["a red square", ""], generator=torch.Generator().manual_seed(0))
    assert unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), **cond).shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match=r"model\.unet\.context_dim=64 does not match"):
        build_conditioner({"kind": "byte", "width": 32, "num_heads": 4}).check_unet(unet.config)
    with pytest.raises(ConfigError, match=r"set model\.unet\.pooled_dim=64"):
        build_conditioner({"kind": "byte", "width": 64, "num_heads": 4, "pooled": True}).check_unet(unet.config)
    # the hint is an override Hydra accepts: null, not None
    with pytest.raises(ConfigError, match=r"set model\.unet\.context_dim=null$"):
        build_conditioner({"kind": "none"}).check_unet(unet.config)
    # the README's class_embed=unet example left the conditioner at its 1000 classes; the hint named only the UNet
    labels = unet_config("tiny", context_dim=None, num_classes=10)
    with pytest.raises(ConfigError, match=r"num_classes=1000, or model\.conditioner\.num_classes=10$"):
        build_conditioner({"kind": "class", "class_embed": "unet"}).check_unet(labels)


def test_frozen_text_encoder_runs_outside_autocast(tmp_path):
    """A bf16-mixed step on images conditions on the fp32 context that ldm-encode stores in latent shards; a trainable
    encoder runs under the trainer's autocast like the UNet."""
    torch.manual_seed(0)
    ByteTextEncoder(width=64, num_layers=1, num_heads=4, max_length=16).save_pretrained(tmp_path / "text")
    frozen = build_conditioner({"kind": "byte", "name_or_path": str(tmp_path / "text"), "width": 64,
                                "num_layers": 1, "num_heads": 4, "max_length": 16, "cond_drop_prob": 0.0})
    trainable = build_conditioner({"kind": "byte", "width": 64, "num_layers": 1, "num_heads": 4, "max_length": 16})
    prompts = ["a red square", "a large blue circle"]
    reference, trainable_fp32 = frozen(prompts)["context"], trainable.eval()(prompts)["context"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(frozen(prompts)["context"], reference)
        assert not torch.allclose(trainable(prompts)["context"].float(), trainable_fp32, atol=1e-3)


def test_pooled_vector_reaches_the_unet():
    torch.manual_seed(0)
    conditioner = build_conditioner({"kind": "byte", "width": 64, "num_layers": 1, "num_heads": 4,
                                     "pooled": True}).eval()
    unet = UNet(dataclasses.replace(UNET_CONFIGS["tiny"], pooled_dim=64))
    conditioner.check_unet(unet.config)
    for p in unet.parameters():  # undo the zero init so the output depends on its inputs
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    cond = conditioner(["a red square", "a blue circle"])
    assert cond["pooled"].shape == (2, 64)
    out = unet(x, t, **cond)
    other = unet(x, t, **{**cond, "pooled": torch.zeros_like(cond["pooled"])})
    assert (out - other).abs().amax() > 1e-3  # the vector changes the prediction through the time embedding
    with pytest.raises(ValueError, match="pooled .* is required"):
        unet(x, t, context=cond["context"])
    # the pooled vector alone, no cross-attention: the prompt still conditions the model (it was refused as one whose
    # prompts change nothing, and its exports no longer loaded)
    pooled_only = UNet(dataclasses.replace(UNET_CONFIGS["tiny"], pooled_dim=64, attention_levels=(),
                                           mid_attention=False))
    conditioner.check_unet(pooled_only.config)
    for p in pooled_only.parameters():
        torch.nn.init.normal_(p, std=0.05)
    other_prompts = conditioner(["a blue circle", "a red square"])
    assert (pooled_only(x, t, **cond) - pooled_only(x, t, **other_prompts)).abs().amax() > 1e-3


def test_pretrained_byte_encoder_loads_frozen_and_checks_the_config(tmp_path):
    torch.manual_seed(0)
    saved = ByteTextEncoder(width=32, num_layers=1, num_heads=4, max_length=16).eval()
    saved.save_pretrained(tmp_path / "export")
    config = {"kind": "byte", "width": 32, "num_layers": 1, "num_heads": 4, "max_length": 16,
              "name_or_path": str(tmp_path / "export")}
    conditioner = build_conditioner(config).train()
    encoder = conditioner.encoder
    assert not conditioner.trainable and not encoder.training                # stays in eval mode when frozen
    assert not any(p.requires_grad for p in encoder.parameters())
    context = conditioner(PROMPTS, generator=torch.Generator().manual_seed(0))["context"]
    assert not context.requires_grad
    torch.testing.assert_close(conditioner.eval()(PROMPTS)["context"], saved(PROMPTS)[0])

    tuned = build_conditioner({**config, "trainable": True}).train()
    assert tuned.trainable and tuned.encoder.training and all(p.requires_grad for p in tuned.parameters())

    with pytest.raises(ConfigError, match=r"model\.conditioner\.width=64 model\.conditioner\.num_layers=2 but .* has "
                                          r"width=32, num_layers=1; set model\.conditioner\.width=32 "
                                          r"model\.conditioner\.num_layers=1$"):  # at once, not one a start
        build_conditioner({**config, "width": 64, "num_layers": 2})
    with pytest.raises(ConfigError, match=r"model\.conditioner\.width=64 but .* has width=32; set "
                                          r"model\.conditioner\.width=32"):
        build_conditioner({**config, "width": 64})
    with pytest.raises(ConfigError, match=r"model\.conditioner\.name_or_path=.*nowhere: no byte encoder there"):
        build_conditioner({**config, "name_or_path": str(tmp_path / "nowhere")})
    (tmp_path / "sd" / "model_index.json").parent.mkdir()
    (tmp_path / "sd" / "model_index.json").write_text("{}")  # an SD folder given with the default kind
    with pytest.raises(ConfigError, match=r"no byte encoder there .*model\.conditioner\.kind=byte is the default\); "
                                          r"it holds a Stable Diffusion pipeline, whose CLIP text encoder "
                                          r"model\.conditioner\.kind=clip reads$"):
        build_conditioner({**config, "name_or_path": str(tmp_path / "sd")})
    with pytest.raises(ConfigError, match=r"give the folder that holds this file, .*export$"):  # not an SD model
        build_conditioner({**config, "name_or_path": str(tmp_path / "export" / "model.safetensors")})
    # a run of another kind (its config.yaml names the module), finished or not: not "run it again to finish it"
    other_run = tmp_path / "ldm_run"
    (other_run / "checkpoints").mkdir(parents=True)
    (other_run / "config.yaml").write_text("model:\n  _target_: ldm.modules.latent_diffusion.LatentDiffusionModule\n")
    with pytest.raises(ConfigError, match=r"ldm_run is a latent diffusion \(stage 2\) run, not a text-image "
                                          r"pretraining run: point it at the export of a text-image pretraining run"):
        build_conditioner({**config, "name_or_path": str(other_run)})
    # an export missing one of its files; a checkpoint whose run holds an export
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(tmp_path / "export" / "config.json", half)
    with pytest.raises(ConfigError, match=r"it holds config\.json but not model\.safetensors: copy the whole export "
                                          r"folder$"):
        build_conditioner({**config, "name_or_path": str(half)})
    clip_run = tmp_path / "clip_run"
    shutil.copytree(tmp_path / "export", clip_run / "export")
    (clip_run / "checkpoints").mkdir()
    (clip_run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"a checkpoint, which this key does not read; give its run's export, "
                                          rf"{re.escape(str(clip_run / 'export'))}$"):
        build_conditioner({**config, "name_or_path": str(clip_run / "checkpoints" / "last.ckpt")})
    empty = build_conditioner({**config, "name_or_path": str(tmp_path / "nowhere")}, load_pretrained=False)
    assert not empty.trainable  # a checkpoint's state dict fills it


@pytest.mark.parametrize(("layer", "pooled"), [("penultimate", False), ("penultimate", True), ("last", False)])
def test_a_trainable_encoder_leaves_no_parameter_that_wants_a_gradient_without_one(tiny_clip, layer, pooled):
    """DDP waits for a gradient of every parameter that requires one: the penultimate layer without the pooled
    vector leaves CLIP's last block out, which is then frozen (it stayed in AdamW and stopped DDP at its first step)."""
    conditioner = build_conditioner({"kind": "clip", "name_or_path": str(tiny_clip), "trainable": True,
                                     "layer": layer, "pooled": pooled, "cond_drop_prob": 0.0}).train()
    out = conditioner(["a red circle", "a blue square"])
    loss = out["context"].square().mean() + (out["pooled"].square().mean() if pooled else 0)
    loss.backward()
    wanting = [n for n, p in conditioner.named_parameters() if p.requires_grad and p.grad is None]
    assert not wanting, wanting
    trained = sum(p.requires_grad for p in conditioner.parameters())
    assert trained < len(list(conditioner.parameters())) if (layer, pooled) == ("penultimate", False) else \
        trained == len(list(conditioner.parameters()))


def test_loading_a_model_that_lacks_weights_leaves_the_global_random_state(tmp_path):
    """transformers initializes the weights a folder lacks (a BERT saved without its pooler) from torch's global
    generator: every later draw of the run (the UNet's initial weights) would depend on what the folder held."""
    from transformers import AutoModel, BertConfig, BertModel

    from ldm.conditioning.text import load_pretrained

    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path / "bert")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    model = load_pretrained(AutoModel, str(tmp_path / "bert"), "model.conditioner.name_or_path")
    assert model.pooler is not None  # (initialized here)
    assert torch.equal(torch.rand(3), expected)
