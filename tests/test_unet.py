"""The denoising UNet: shapes across tiny configs, SD 1.5's parameter count, zero output at init, gradient
checkpointing equivalence, mixed precision, config validation, save/load, a few steps lower the loss."""

from __future__ import annotations

import contextlib
import dataclasses
import re

import pytest
import torch

from ldm.config import ConfigError, to_dataclass
from ldm.nn.attention import attention
from ldm.nn.unet import UNET_CONFIGS, UNet, UNetConfig, count_parameters, unet_config

SD15_PARAMETERS = 859_520_964
SD21_PARAMETERS = 865_910_724

TINY = UNET_CONFIGS["tiny"]


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter (the zero-initialised ones included) small random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(config: UNetConfig, batch: int = 2, size: tuple[int, int] = (8, 8), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    kwargs = {"x": torch.randn(batch, config.in_channels, *size, generator=g),
              "t": torch.randint(0, 1000, (batch,), generator=g)}
    if config.context_dim is not None:
        kwargs["context"] = torch.randn(batch, 5, config.context_dim, generator=g)
    if config.num_classes is not None:
        kwargs["class_labels"] = torch.randint(0, config.num_classes + 1, (batch,), generator=g)
    return kwargs


VARIANTS = {
    "tiny": {},
    "num_heads": dict(num_heads=4, head_dim=None),
    "no_context": dict(context_dim=None),
    "class_labels": dict(num_classes=10),
    "class_labels_no_context": dict(num_classes=10, context_dim=None),
    "linear_proj_depth2": dict(use_linear_proj=True, transformer_depth=2),
    "add_embedding": dict(use_scale_shift_norm=False, dropout=0.1),
    "learned_variance": dict(out_channels=8),
    "three_levels": dict(channel_mult=[1, 2, 2], num_res_blocks=2, attention_levels=[0, 2], mid_attention=False),
    "no_attention": dict(attention_levels=[], mid_attention=False, context_dim=None),
}


@pytest.mark.parametrize("name", VARIANTS)
def test_output_shape(name):
    config = dataclasses.replace(TINY, **VARIANTS[name])
    model = randomize(UNet(config))
    size = (8, 16) if len(config.channel_mult) == 2 else (16, 8)
    out = model(**inputs(config, size=size))
    assert out.shape == (2, config.output_channels, *size)
    assert torch.isfinite(out).all()


def test_scalar_timestep_broadcasts():
    model = randomize(UNet(TINY)).eval()
    kwargs = inputs(TINY)
    kwargs["t"] = torch.tensor([7, 7])
    expected = model(**kwargs)
    kwargs["t"] = torch.tensor(7)
    torch.testing.assert_close(model(**kwargs), expected)


def test_sd15_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = UNet(UNET_CONFIGS["sd15"])
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model) == SD15_PARAMETERS


def test_sd21_parameter_count_on_meta_device():
    with torch.device("meta"):
        assert count_parameters(UNet(UNET_CONFIGS["sd21"])) == SD21_PARAMETERS


def test_state_dict_keys_read_like_a_map():
    keys = UNet(TINY).state_dict().keys()
    assert "enc.level0_block0.res.conv1.weight" in keys
    assert "enc.level0_down.conv.weight" in keys
    assert "enc.level1_block0.attn.blocks.0.attn2.to_k.weight" in keys
    assert "mid.block0.attn.proj_out.weight" in keys
    assert "dec.level1_up.conv.weight" in keys


def test_output_is_exactly_zero_at_init():
    model = UNet(TINY)
    out = model(**inputs(TINY))
    assert torch.count_nonzero(out) == 0
    for name, p in model.named_parameters():
        if name.endswith(("res.conv2.weight", "attn.proj_out.weight")) or name.startswith("conv_out"):
            assert torch.count_nonzero(p) == 0, name


def test_gradient_checkpointing_matches():
    config = dataclasses.replace(TINY, dropout=0.1, num_classes=3)
    plain = randomize(UNet(config))
    ckpt = UNet(dataclasses.replace(config, gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    kwargs = inputs(config, batch=4)
    losses, grads = [], []
    for model in (plain, ckpt):
        torch.manual_seed(0)  # same dropout masks; non-reentrant checkpointing replays the RNG state
        loss = model(**kwargs).square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_forward_is_finite(dtype):
    config = dataclasses.replace(TINY, upcast_attention=dtype == torch.float16)
    model = randomize(UNet(config))
    kwargs = inputs(config)
    with torch.autocast("cpu", dtype=dtype):
        out = model(**kwargs)
    assert torch.isfinite(out).all()
    reference = model(**kwargs)
    assert (out.float() - reference).abs().max() < 0.1 * reference.abs().max()


@contextlib.contextmanager
def fp16_reduction_math_sdp():
    """SDPA's math backend reducing fp16 in fp16 (torch's flag; off by default, when every kernel accumulates fp16 in
    fp32): the attention written as fp16 products that SD 2.1's upcast_attention guarded against."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def test_fp16_attention_overflows_in_fp16_products_unless_upcast():
    # Logits of 300 * 300 * 64 / 8 = 720000 exceed fp16's 65504.
    q = torch.full((1, 1, 4, 64), 300.0)
    q[0, 0, :, 0] += torch.arange(4.0)
    v = torch.randn(1, 1, 4, 64)
    reference = attention(q, q, v)
    half = q.half(), q.half(), v.half()
    torch.testing.assert_close(attention(*half).float(), reference, atol=1e-2, rtol=1e-2)  # torch's default: fp32 sums
    with fp16_reduction_math_sdp():
        assert not torch.isfinite(attention(*half)).all()
        out = attention(*half, upcast=True)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference, atol=1e-2, rtol=1e-2)


def test_save_load_round_trip_and_determinism(tmp_path):
    model = randomize(UNet(TINY)).eval()
    torch.save(model.state_dict(), tmp_path / "unet.pt")
    loaded = UNet(TINY).eval()
    loaded.load_state_dict(torch.load(tmp_path / "unet.pt"))
    kwargs = inputs(TINY)
    assert torch.equal(model(**kwargs), loaded(**kwargs))
    assert torch.equal(model(**kwargs), model(**kwargs))


def test_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = UNet(TINY)
    kwargs = inputs(TINY, batch=4)
    target = torch.randn_like(kwargs["x"])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(10):
        loss = (model(**kwargs) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("overrides, message", [
    (dict(model_channels=30, norm_groups=8), "not divisible by norm_groups=8"),
    (dict(num_heads=3, head_dim=None), "not divisible by num_heads=3"),
    (dict(head_dim=24), "not divisible by head_dim=24"),
    (dict(num_heads=2, head_dim=16), "num_heads=2 and head_dim=16 are both set: set exactly one"),
    (dict(num_heads=None, head_dim=None), "are both null: set exactly one"),
    (dict(attention_levels=[2]), "outside 0..1"),
    # a text model whose prompts nothing reads (no cross-attention anywhere): trained and sampled as if conditioned
    (dict(attention_levels=[], mid_attention=False),
     r"no transformer reads it .* no pooled prompt vector .* context_dim=null"),
])
def test_config_cross_field_checks(overrides, message):
    node = {**dataclasses.asdict(TINY), **overrides}
    with pytest.raises(ConfigError, match=message) as err:
        to_dataclass(UNetConfig, node, prefix="model.unet")
    assert str(err.value).startswith(("model.unet.", "model.unet: "))  # on the key, or before a sentence


def test_named_config_overrides():
    config = unet_config("tiny", context_dim=None)
    assert config.context_dim is None and config.model_channels == TINY.model_channels
    with pytest.raises(ConfigError, match="unknown UNet size"):
        unet_config("huge")


def test_forward_input_checks():
    model = UNet(TINY)
    kwargs = inputs(TINY)
    with pytest.raises(ValueError, match="pass context"):
        model(kwargs["x"], kwargs["t"])
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(2, 4, 7, 8), kwargs["t"], kwargs["context"])
    with pytest.raises(ValueError, match="not class-conditional"):
        model(**kwargs, class_labels=torch.zeros(2, dtype=torch.long))
    for t in (torch.tensor([5, 6, 7]), torch.tensor([[5], [6]])):  # a RuntimeError deep inside a block before
        got = re.escape(str(tuple(t.shape)))
        with pytest.raises(ValueError, match=rf"t must be a scalar, \(1,\) or \(B=2,\).*got {got}"):
            model(kwargs["x"], t, kwargs["context"])
    labelled = UNet(dataclasses.replace(TINY, num_classes=5))
    for labels in (torch.tensor([0.0, 1.0]), [0, 1]):  # torch's "Expected tensor for argument #1 'indices'", or an
        with pytest.raises(ValueError, match=r"class_labels must be an integer tensor \(B,\)"):  # AttributeError
            labelled(**kwargs, class_labels=labels)
    with torch.no_grad():  # any integer dtype, as torch's embedding takes int32 / int64 alone
        want = labelled(**kwargs, class_labels=torch.tensor([1, 4]))
        assert all(torch.equal(labelled(**kwargs, class_labels=torch.tensor([1, 4], dtype=dtype)), want)
                   for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32))
    with torch.no_grad():  # one timestep for the batch, as a scalar or diffusers' (1,)
        each = model(kwargs["x"], torch.tensor([5, 5]), kwargs["context"])
        assert torch.equal(model(kwargs["x"], 5, kwargs["context"]), each)
        assert torch.equal(model(kwargs["x"], torch.tensor([5]), kwargs["context"]), each)


def test_a_unet_built_on_the_meta_device_and_loaded_equals_the_original():
    """The way large models load (build on meta, `to_empty`, `load_state_dict`): nothing the state dict does not
    fill may hold uninitialised memory (the folded upsampling's taps were such a buffer)."""
    config = dataclasses.replace(TINY, channel_mult=[1, 2])
    model = randomize(UNet(config)).eval()
    with torch.device("meta"):
        empty = UNet(config)
    loaded = empty.to_empty(device="cpu").eval()
    loaded.load_state_dict(model.state_dict(), strict=True)
    kwargs = inputs(config)
    with torch.no_grad():
        assert torch.equal(loaded(**kwargs), model(**kwargs))


@pytest.mark.parametrize("use_linear_proj", [False, True])
def test_a_frozen_fp32_copy_rounds_as_the_trained_unet(onednn, use_linear_proj):
    """The EMA and a loaded copy (no parameter requires a gradient) give the training forward's outputs to the bit,
    on either route of the fp32 products (`ldm.nn.linear`), channels_last as the recipes train."""
    config = dataclasses.replace(TINY, use_linear_proj=use_linear_proj)
    trained = randomize(UNet(config)).to(memory_format=torch.channels_last)
    frozen = UNet(config).to(memory_format=torch.channels_last).requires_grad_(False)
    frozen.load_state_dict(trained.state_dict())
    kwargs = inputs(config, batch=3)
    kwargs["x"] = kwargs["x"].contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = frozen(**kwargs)
    assert torch.equal(trained(**kwargs).detach(), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_frozen_copy_with_linear_projections_rounds_as_the_trained_unet(dtype):
    """An EMA or loaded copy (no parameter requires a gradient) gives the trained UNet's outputs to the bit, also
    with nn.Linear projections under half-precision autocast (a strided input let matmul fold or batch by
    requires_grad)."""
    config = dataclasses.replace(TINY, use_linear_proj=True, transformer_depth=2)
    trained = randomize(UNet(config)).eval()
    frozen = randomize(UNet(config)).eval().requires_grad_(False)
    kwargs = inputs(config, batch=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        assert torch.equal(trained(**kwargs), frozen(**kwargs))


def test_dropout_is_in_the_resnet_blocks_only_as_ldm_and_diffusers():
    model = UNet(dataclasses.replace(TINY, dropout=0.1))
    rates = {name.split(".")[-1] if "res" not in name else "res": m.p for name, m in model.named_modules()
             if isinstance(m, torch.nn.Dropout)}
    assert rates.pop("res") == 0.1 and all(p == 0.0 for p in rates.values())


def test_pointwise_conv_takes_an_empty_batch():
    from ldm.nn.conv import PointwiseConv

    conv = PointwiseConv(4, 6)
    for x in (torch.zeros(0, 4, 3, 3), torch.zeros(0, 4, 3, 3).to(memory_format=torch.channels_last)):
        assert conv(x).shape == (0, 6, 3, 3)


def test_upsampling_trains_after_a_forward_under_inference_mode():
    """A process that sampled or validated under torch.inference_mode, then trains: the folded upsampling's constant
    must not be an inference tensor (it cannot be saved for backward)."""
    from ldm.nn.conv import _TAPS, Upsample

    upsample = Upsample(4).double()  # a dtype the cache does not hold yet
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    for device_dtype in [k for k in _TAPS if k[1] != torch.float32]:
        del _TAPS[device_dtype]
    with torch.inference_mode():
        upsample(x)
    upsample(x).sum().backward()
    assert upsample.conv.weight.grad is not None


def test_upcast_attention_reaches_every_attention_of_the_unet():
    """upcast_attention=true (SD 2.1's) in every attention layer of the UNet, not in `attention` alone: logits far
    past fp16's range stay finite under fp16 autocast with fp16-reducing SDPA."""
    from ldm.nn.attention import Attention

    config = dataclasses.replace(TINY, upcast_attention=True)
    model = randomize(UNet(config))
    assert {m.upcast for m in model.modules() if isinstance(m, Attention)} == {True}
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention):  # logits far past fp16's 65504
                m.to_q.weight.mul_(2000.0)
                m.to_k.weight.mul_(2000.0)
        with fp16_reduction_math_sdp(), torch.autocast("cpu", dtype=torch.float16):
            assert torch.isfinite(model(**inputs(config))).all()
