"""Stage 1b, text-image contrastive pretraining: the InfoNCE loss over ranks, the image tower, a few steps learn,
and the exported text encoder is the trained one."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from ldm.conditioning.byte import ByteTextEncoder
from ldm.config import ConfigError, to_dataclass
from ldm.modules.contrastive import ContrastiveModule, contrastive_loss, retrieval_scores
from ldm.nn.image_encoder import ImageEncoder, ImageEncoderConfig

CAPTIONS = ["a large red circle in the center on a white background",
            "a large blue square in the top left on a black background",
            "a large green star in the bottom right on a gray background",
            "a large pink cross in the top right on a white background"]


def tiny_config(**overrides) -> dict:
    config = {"text": {"width": 32, "num_layers": 1, "num_heads": 2, "max_length": 64},
              "image": {"resolution": 16, "channels": [8, 16]}, "embed_dim": 16, "warmup_steps": 0}
    config.update(overrides)
    return config


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_loss_over_two_ranks_averages_to_the_single_process_loss():
    image, text, scale = unit(8, 16, seed=0), unit(8, 16, seed=1), torch.tensor(10.0)
    full, _ = contrastive_loss(image, text, image, text, 0, scale)
    halves = [contrastive_loss(image[r * 4:(r + 1) * 4], text[r * 4:(r + 1) * 4], image, text, r * 4, scale)[0]
              for r in (0, 1)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, full)  # DDP averages the ranks' gradients the same way
    flat, _ = contrastive_loss(image, text, image, text, 0, torch.tensor(1.0))
    assert flat.item() == pytest.approx(math.log(8), abs=0.1)        # unrelated pairs, cosines near 0: chance
    # the accuracy is caption -> image (each caption's best image is its own), which differs from image -> caption
    # where the similarities are not symmetric in their roles
    near = F.normalize(image + 0.9 * unit(8, 16, seed=7), dim=-1)
    _, accuracy = contrastive_loss(image, near, image, near, 0, scale)
    caption_to_image = ((near @ image.T).argmax(1) == torch.arange(8)).float().mean()
    image_to_caption = ((image @ near.T).argmax(1) == torch.arange(8)).float().mean()
    assert accuracy == caption_to_image == 7 / 8 and image_to_caption == 1


def test_matched_pairs_give_full_accuracy_and_a_low_loss():
    image = unit(6, 16, seed=0)
    loss, accuracy = contrastive_loss(image, image, image, image, 0, torch.tensor(100.0))
    assert accuracy.item() == 1.0 and loss.item() < 1e-3
    _, shuffled = contrastive_loss(image, image.roll(1, dims=0), image, image.roll(1, dims=0), 0, torch.tensor(100.0))
    assert shuffled.item() == 0.0


def test_accuracy_counts_an_image_of_the_same_caption_as_a_hit():
    """Two pairs share a caption (the quickstart's batches of 256 hold about 130 distinct captions): a model that
    embeds both images as the caption cannot tell them apart, which counted as a miss half of the time."""
    text = unit(4, 16, seed=0)
    text[1] = text[0]                                     # pairs 0 and 1: the same caption
    ids = torch.tensor([7, 7, 8, 9])
    _, strict = contrastive_loss(text, text, text, text, 0, torch.tensor(100.0))
    _, by_caption = contrastive_loss(text, text, text, text, 0, torch.tensor(100.0), ids, ids)
    assert strict.item() == 0.75 and by_caption.item() == 1.0


def test_captions_equal_in_the_bytes_the_encoder_keeps_are_one_caption_to_the_accuracy():
    """max_length 16 keeps 14 bytes of a caption: two that differ only beyond them are embedded alike, and are one
    caption to the accuracy (whose hit was a coin toss between their images)."""
    module = ContrastiveModule(tiny_config(text={"width": 32, "num_layers": 1, "num_heads": 2, "max_length": 16}))
    captions = ["a red circle on white", "a red circle on black", "a blue square"]
    _, text, ids = module._embed_batch({"image": torch.zeros(3, 3, 16, 16), "caption": captions})
    assert torch.equal(text[0], text[1]) and ids[0] == ids[1] != ids[2]


def test_compiled_text_tower_compiles_once_for_new_captions():
    """Compiled whole, the text tower's tokenizer made every batch of new captions a recompilation (torch gave up
    after 8 and ran it eagerly); the tensor part alone is compiled now."""
    import torch._dynamo  # noqa: F401 -- the compile counters below

    module = ContrastiveModule(tiny_config())
    module.compile_networks()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for shift in range(3):
        module.text_encoder(CAPTIONS[shift:] + CAPTIONS[:shift] + [f"caption {shift}"])
    assert counters["stats"]["unique_graphs"] == 1
    copy = pickle.loads(pickle.dumps(module))  # pickles (a compiled bound method did not)
    assert copy.state_dict().keys() == module.state_dict().keys()


def test_image_encoder_keeps_position_and_checks_its_input():
    encoder = ImageEncoder(ImageEncoderConfig(resolution=16, channels=[8, 16]))
    assert encoder.out_dim == 16 * 4 * 4
    x = torch.zeros(2, 3, 16, 16)
    x[0, :, 1:4, 1:4] = 1.0     # the same square, top left and bottom right
    x[1, :, 12:15, 12:15] = 1.0
    features = encoder(x)
    assert features.shape == (2, 256) and not torch.allclose(features[0], features[1])
    with pytest.raises(ValueError, match=r"takes 16 x 16"):
        encoder(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="divisible by 2 \\*\\* len\\(channels\\)"):
        ImageEncoderConfig(resolution=20, channels=[8, 16, 32])
    with pytest.raises(ConfigError, match="divisible by norm_groups=8"):
        ImageEncoderConfig(channels=[8, 12])
    with pytest.raises(ConfigError, match=r"^model\.image\.resolution=20 must be divisible"):  # the full key
        to_dataclass(ContrastiveModule.Config, {"image": {"resolution": 20, "channels": [8, 16, 32]}}, "model")
    # out of range: a ZeroDivisionError, or a model built that failed at its first batch
    for key, value, message in (("norm_groups", 0, "norm_groups=0 must be >= 1"),
                                ("resolution", -32, "resolution=-32 must be >= 1"),
                                ("in_channels", 0, "in_channels=0 must be >= 1"),
                                ("channels", [0, 16], r"channels=\[0, 16\] must name at least one level, each")):
        with pytest.raises(ConfigError, match=rf"^model\.image\.{message}"):
            to_dataclass(ContrastiveModule.Config, {"image": {"resolution": 16, "channels": [8, 16], key: value}},
                         "model")


def test_images_of_another_size_than_the_image_tower_takes_are_refused_at_start(tmp_path, shapes_shards):
    """The README's 256 px recipe set model.image.resolution alone: the data stayed 32 px, and the run stopped at its
    first validation batch with a ValueError."""
    import lightning as L

    from ldm.data.datamodule import WebDataModule

    data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), batch_size=4, num_workers=0, resolution=32)
    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu", enable_checkpointing=False)
    with pytest.raises(ConfigError, match=r"model\.image\.resolution=16 but data\.resolution=32"):
        trainer.fit(ContrastiveModule(tiny_config()), datamodule=data)
    assert trainer.global_step == 0
    grey = tiny_config(image={"resolution": 32, "channels": [8, 16], "in_channels": 1})
    with pytest.raises(ConfigError, match=r"model\.image\.in_channels=1, but the data are RGB images"):
        trainer.fit(ContrastiveModule(grey), datamodule=data)


def test_validation_scores_the_whole_set_for_any_batch_size(tmp_path, shapes_shards):
    """val/loss and val/accuracy were per-batch retrieval averaged: 16 validation pairs scored 2.39 / 0.12 in batches
    of 16 and 3.55 / 0.04 in one of 50 (a short last batch of one, a free hit). Now every caption is scored against
    every validation image, in whatever batches they come."""
    import lightning as L

    from ldm.data.datamodule import WebDataModule

    torch.manual_seed(0)
    module = ContrastiveModule(tiny_config(image={"resolution": 32, "channels": [8, 16]}))
    scores = []
    for val_batch_size in (16, 5, 1):  # 16 pairs: one batch; 5 + 5 + 5 + 1; sixteen of one
        data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"),
                             val_shards=str(shapes_shards / "val-*.tar"), batch_size=4, val_batch_size=val_batch_size,
                             num_workers=0, resolution=32)
        trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            default_root_dir=str(tmp_path))
        scores.append(trainer.validate(module, datamodule=data, verbose=False)[0])
    assert scores[1] == pytest.approx(scores[0], rel=1e-5) and scores[2] == pytest.approx(scores[0], rel=1e-5)
    assert 0.0 < scores[0]["val/accuracy"] < 0.5 and scores[0]["val/loss"] > 1.0  # (untrained: near chance, 1/16)
    # the same as scoring the set in one call, and in row blocks
    image, text, ids = unit(9, 16, seed=1), unit(9, 16, seed=2), torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7])
    whole = contrastive_loss(image, text, image, text, 0, torch.tensor(10.0), ids, ids)
    blocks = retrieval_scores(image, text, ids, torch.tensor(10.0), rows=4)
    assert blocks[0].item() == pytest.approx(whole[0].item(), rel=1e-6)
    assert blocks[1].item() == pytest.approx(whole[1].item(), rel=1e-6)


def test_a_global_batch_of_one_pair_is_refused(tmp_path, shapes_shards):
    """With data.batch_size=1 on one process each caption met only its own image: the loss was 0, the accuracy 1, the
    gradients 0, and the run exported the random encoder as trained. A validation of one pair scored 1 too."""
    import lightning as L

    from ldm.data.datamodule import WebDataModule

    trainer = L.Trainer(max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path), accelerator="cpu", enable_checkpointing=False)
    module = ContrastiveModule(tiny_config(image={"resolution": 32, "channels": [8, 16]}))
    data = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), batch_size=1, num_workers=0, resolution=32)
    with pytest.raises(ConfigError, match=r"data\.batch_size=1 on one process: .* raise data\.batch_size"):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0
    one = WebDataModule(train_shards=str(shapes_shards / "train-*.tar"), val_shards=str(shapes_shards / "val-*.tar"),
                        batch_size=4, val_batch_size=1, num_workers=0, resolution=32)
    validate = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=str(tmp_path), limit_val_batches=1)
    message = (r"validation scores one image-caption pair \(data\.val_batch_size=1, trainer\.limit_val_batches=1\): "
               r".* raise data\.val_batch_size or trainer\.limit_val_batches")
    with pytest.raises(ConfigError, match=message):
        validate.validate(module, datamodule=one, verbose=False)
    # known before any step when fitting (it was found at the first validation, after training; in a sweep, with
    # the swept value in its message, so that the job fails alone)
    fit = L.Trainer(max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, logger=False,
                    enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                    accelerator="cpu", enable_checkpointing=False)  # (as conf/trainer: no sanity validation)
    with pytest.raises(ConfigError, match=message):
        fit.fit(module, datamodule=one)
    assert fit.global_step == 0


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    module = ContrastiveModule(tiny_config())
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    batch = {"image": images, "caption": CAPTIONS}
    optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3)
    with torch.no_grad():
        before, _ = module._loss(batch)
    for _ in range(30):
        optimizer.zero_grad()
        module._loss(batch)[0].backward()
        optimizer.step()
    with torch.no_grad():
        after, accuracy = module._loss(batch)
    assert after < 0.3 * before and accuracy.item() == 1.0, (before, after)


def test_a_logit_scale_at_the_cap_can_come_back_down():
    """The scale is clamped as a parameter after each step (as CLIP does), not inside the forward, so at the cap the
    loss still has a gradient for it; a clamped exp() had none above 100 and the scale drifted off for good."""
    torch.manual_seed(0)
    module = ContrastiveModule(tiny_config())
    batch = {"image": torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1, "caption": CAPTIONS}
    with torch.no_grad():
        module.log_logit_scale.fill_(math.log(ContrastiveModule.MAX_LOGIT_SCALE) + 0.5)  # overshot
    module.on_train_batch_end(None, batch, 0)
    assert module.logit_scale.item() == pytest.approx(ContrastiveModule.MAX_LOGIT_SCALE)
    module._loss(batch)[0].backward()
    assert module.log_logit_scale.grad > 0, "random towers: the loss wants a smaller scale, and the gradient says so"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="init_temperature"):
        ContrastiveModule(tiny_config(init_temperature=0.0))
    with pytest.raises(ConfigError, match=r"model\.text\.widht"):
        ContrastiveModule(tiny_config(text={"widht": 32}))
    with pytest.raises(ConfigError, match=r"model\.image\.resolution=20 must be divisible"):
        ContrastiveModule(tiny_config(image={"resolution": 20, "channels": [8, 16, 32]}))


def test_export_is_the_trained_text_encoder(tmp_path):
    module = ContrastiveModule(tiny_config())
    module.text_encoder.save_pretrained(tmp_path / "export")
    loaded = ByteTextEncoder.from_pretrained(tmp_path)                  # a run directory finds its export/
    assert not loaded.trainable and not any(p.requires_grad for p in loaded.parameters())
    module.text_encoder.eval()
    for (a, b) in zip(loaded(CAPTIONS), module.text_encoder(CAPTIONS)):
        torch.testing.assert_close(a, b)


def test_weight_decay_spares_the_temperature_gains_and_biases():
    """CLIP's exclusion: with weight_decay > 0 only matrices and embeddings decay; decaying the learned temperature
    would pull the logit scale towards 1 (and LayerNorm gains towards 0) whatever the loss says."""
    module = ContrastiveModule(tiny_config(weight_decay=0.5))
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    optimizer = torch.optim.AdamW(module._param_groups(), lr=0.1, weight_decay=0.5)
    for p in module.parameters():
        p.grad = torch.zeros_like(p)   # Adam's step is 0: only the decay moves a parameter
    optimizer.step()
    for name, p in module.named_parameters():
        moved = not torch.equal(p, before[name])
        assert moved == (p.ndim >= 2 and bool(before[name].any())), name
    assert module.log_logit_scale == before["log_logit_scale"]


def test_a_one_group_checkpoint_resumes_into_the_two_groups(tmp_path):
    """Checkpoints of older code hold one AdamW group of every parameter (and a resume may change weight_decay): the
    state is split by parameter, so each parameter keeps its moments, and the schedule drives both groups."""
    import lightning as L
    from torch.utils.data import DataLoader

    from ldm.callbacks.optimizer_settings import OptimizerSettings

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"image": torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(i)) * 2 - 1,
                    "caption": CAPTIONS[i % 4]}

    def fit(module, steps, ckpt_path=None):
        logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv", version=str(steps))
        callbacks = [OptimizerSettings(), L.pytorch.callbacks.LearningRateMonitor()]
        trainer = L.Trainer(max_steps=steps, logger=logger, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=str(tmp_path), accelerator="cpu", callbacks=callbacks,
                            enable_checkpointing=False, num_sanity_val_steps=0, log_every_n_steps=1)
        trainer.fit(module, DataLoader(Pairs(), batch_size=4), ckpt_path=ckpt_path)
        return trainer

    torch.manual_seed(0)
    module = ContrastiveModule(tiny_config(warmup_steps=4))
    trainer = fit(module, 2)
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    checkpoint = torch.load(tmp_path / "two.ckpt", weights_only=False)
    state = checkpoint["optimizer_states"][0]
    order = [id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]]
    by_param = {id(p): i for i, p in enumerate(module.parameters())}
    old = {by_param[pid]: state["state"][i] for i, pid in enumerate(order)}  # as one group in parameter order
    state["state"] = old
    unnamed = {k: v for k, v in state["param_groups"][0].items() if k != "name"}  # as older code saved it
    state["param_groups"] = [{**unnamed, "params": sorted(old)}]
    for scheduler in checkpoint["lr_schedulers"]:
        for key, value in scheduler.items():
            if isinstance(value, list):
                scheduler[key] = value[:1]
    torch.save(checkpoint, tmp_path / "one.ckpt")

    resumed = ContrastiveModule(tiny_config(warmup_steps=4, weight_decay=0.1))
    trainer = fit(resumed, 3, str(tmp_path / "one.ckpt"))
    groups = trainer.optimizers[0].param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and groups[0]["lr"] == groups[1]["lr"] > 0
    steps = {int(s["step"]) for s in trainer.optimizers[0].state.values()}
    assert steps == {3}, "every parameter kept its two steps of Adam moments and took the third"
    # the groups are named (the LR monitor logged lr/pg1 and lr/pg2, README's `lr` nowhere), also when restored
    # from a checkpoint whose groups have no names
    for version in ("2", "3"):
        header = (tmp_path / "csv" / version / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {"lr/decay", "lr/no_decay"} <= set(header) and not any("pg" in h for h in header), header


def test_batch_keys_the_batches_lack_are_named_with_the_config_key():
    from ldm.config import ConfigError

    module = ContrastiveModule(tiny_config(caption_key="txt"))
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with pytest.raises(ConfigError, match=r"model\.caption_key='txt': the batch has no entry 'txt', only \['caption', "
                                          r"'image'\]"):
        module._loss({"image": images, "caption": CAPTIONS})


def test_a_caption_with_a_lone_surrogate_trains():
    """JSON metadata may hold a cut-off emoji escape ("\\ud83d"); the byte tokenizer reads it as "?", and so do the
    caption ids of the accuracy now (their strict UTF-8 stopped the run at its first step)."""
    module = ContrastiveModule(tiny_config())
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss, accuracy = module._loss({"image": images, "caption": ["a large square \ud83d", "a large square ?"]})
    assert torch.isfinite(loss) and 0.0 <= accuracy.item() <= 1.0
