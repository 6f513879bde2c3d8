"""The autoencoder loss: GAN schedule and adaptive weight, LPIPS built offline, the missing-backbone error."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.checkpoints import CheckpointError
from ldm.losses.autoencoder import AutoencoderLoss, LossConfig, discriminator_loss, generator_loss
from ldm.losses.lpips import VGG16_FILE, build_lpips, vgg16_weights_path
from ldm.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm.nn.discriminator import DiscriminatorConfig


def tiny_autoencoder() -> AutoencoderKL:
    return AutoencoderKL(AutoencoderConfig(resolution=32, ch=16, ch_mult=[1, 2], num_res_blocks=1, norm_groups=8))


def disc_grad_norm(loss: AutoencoderLoss) -> float:
    grads = [p.grad for p in loss.discriminator.parameters() if p.grad is not None]
    return float(sum(g.norm() for g in grads)) if grads else 0.0


def test_discriminator_learns_only_from_disc_start_and_adaptive_weight_is_sane():
    torch.manual_seed(0)
    model = tiny_autoencoder()
    loss = AutoencoderLoss(LossConfig(lpips_weight=0.0, disc_start=10, disc=DiscriminatorConfig(ndf=8, n_layers=2)))
    x = torch.rand(4, 3, 32, 32) * 2 - 1

    for step, active in [(9, False), (10, True)]:
        loss.discriminator.zero_grad(set_to_none=True)
        x_rec, posterior = model(x)
        g_total, g_log = loss.generator_step(x, x_rec, posterior, step, last_layer=model.last_layer)
        d_loss, d_log = loss.discriminator_step(x, x_rec, step)
        assert (d_loss.requires_grad, g_log["g_loss"].abs() > 0) == (active, active)
        if active:
            weight = g_log["disc_weight"]
            assert torch.isfinite(weight) and 0 < weight <= 0.5 * 1e4 and not weight.requires_grad
            loss.discriminator.zero_grad(set_to_none=True)
            d_loss.backward()
            assert disc_grad_norm(loss) > 0
        else:
            assert g_log["disc_weight"] == 0 and d_log["d_loss"] == 0
            g_total.backward()
            assert disc_grad_norm(loss) == 0  # no discriminator forward at all before disc_start


@pytest.mark.parametrize("rec_loss", ["l1", "l2"])
def test_the_generator_loss_is_ldm_s_formula(tmp_path, monkeypatch, rec_loss):
    """total = NLL + kl_weight KL + adaptive weight x disc_factor x G, NLL = sum over pixels of (|x - x'| (l2:
    (x - x')^2) + lpips_weight LPIPS) / exp(logvar) + logvar per image, the adaptive weight disc_weight x
    ||dNLL/dL|| / (||dG/dL|| + 1e-4) at the decoder's last layer L, its output convolution's weight
    (taming-transformers' LPIPSWithDiscriminator), each written out here; the discriminator's loss disc_factor x
    hinge(D(x), D(x'))."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = tiny_autoencoder()
    loss = AutoencoderLoss(LossConfig(rec_loss=rec_loss, lpips_weight=0.7, lpips_pretrained_backbone=False,
                                      learn_logvar=True, logvar_init=0.3, kl_weight=1e-3, disc_start=0,
                                      disc_weight=0.5, disc_factor=0.8, disc=DiscriminatorConfig(ndf=8, n_layers=2)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_rec, posterior = model(x)
    assert model.last_layer is model.decoder.conv_out.weight
    total, logged = loss.generator_step(x, x_rec, posterior, step=0, last_layer=model.last_layer)

    lpips = loss.perceptual(x, x_rec).flatten()                                   # (B,)
    pixel = (x - x_rec).abs() if rec_loss == "l1" else (x - x_rec) ** 2
    per_image = [(pixel[i] + 0.7 * lpips[i]).sum() / np.exp(0.3) + 0.3 * x[i].numel() for i in range(2)]
    nll = (per_image[0] + per_image[1]) / 2
    kl = 0.5 * (posterior.mean ** 2 + torch.exp(posterior.logvar) - 1 - posterior.logvar).sum() / 2
    g = -loss.discriminator(x_rec).mean()                                         # hinge's generator term
    last = model.decoder.conv_out.weight
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    weight = 0.5 * grad_nll.norm() / (grad_g.norm() + 1e-4)
    torch.testing.assert_close(logged["rec_loss"], pixel.mean().detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(logged["nll_loss"], nll.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(logged["kl_loss"], kl.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(logged["disc_weight"], weight.detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(total.detach(), (nll + 1e-3 * kl + weight * 0.8 * g).detach(), rtol=1e-5, atol=0)
    d_loss, _ = loss.discriminator_step(x, x_rec, step=0)
    hinge = (F.relu(1 - loss.discriminator(x)).mean() + F.relu(1 + loss.discriminator(x_rec)).mean()) / 2
    torch.testing.assert_close(d_loss.detach(), (0.8 * hinge).detach(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["hinge", "vanilla", "non_saturating"])
def test_gan_losses_reward_the_right_side(kind):
    good_d = discriminator_loss(kind, torch.full((2, 1, 4, 4), 3.0), torch.full((2, 1, 4, 4), -3.0))
    bad_d = discriminator_loss(kind, torch.full((2, 1, 4, 4), -3.0), torch.full((2, 1, 4, 4), 3.0))
    assert good_d < bad_d
    assert generator_loss(kind, torch.full((1,), 3.0)) < generator_loss(kind, torch.full((1,), -3.0))


def test_learned_logvar_is_a_parameter():
    learned = AutoencoderLoss(LossConfig(lpips_weight=0.0, learn_logvar=True, logvar_init=0.5))
    fixed = AutoencoderLoss(LossConfig(lpips_weight=0.0))
    assert isinstance(learned.logvar, torch.nn.Parameter) and float(learned.logvar.detach()) == 0.5
    assert not isinstance(fixed.logvar, torch.nn.Parameter)
    # the value logged is the one the step's loss used, not the optimizer step's update of it (logged after it)
    model, x = tiny_autoencoder(), torch.rand(2, 3, 32, 32) * 2 - 1
    total, logged = learned.generator_step(x, *model(x), step=0)
    total.backward()
    torch.optim.SGD([learned.logvar], lr=0.1).step()
    assert float(logged["logvar"]) == 0.5 and float(learned.logvar.detach()) != 0.5


@pytest.fixture
def local_vgg16(tmp_path, monkeypatch):
    """A torch hub dir holding a VGG16 checkpoint under torchvision's file name: random convs, tiny classifier.

    note: the classifier tensors are broadcast views of one number, so the file is ~60 MB instead of 550 MB; the real
    torchvision loading path (load_state_dict_from_url -> load_state_dict) reads it all the same.
    """
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = torchvision.models.vgg16().state_dict()
    state = {k: (v if k.startswith("features") else torch.zeros(1).expand_as(v)) for k, v in state.items()}
    path = vgg16_weights_path()
    assert str(path).startswith(str(tmp_path)) and path.name == VGG16_FILE
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    return state


def test_lpips_with_local_backbone_file_runs_without_download(local_vgg16):
    net = build_lpips(pretrained_backbone=True)
    assert torch.equal(net.net.slice1[0].weight, local_vgg16["features.0.weight"])  # the file was loaded
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    same, different = net(x, x).flatten(), net(x, -x).flatten()
    assert torch.allclose(same, torch.zeros(2), atol=1e-6) and (different > 0).all()
    assert not any(p.requires_grad for p in net.parameters())


def test_lpips_random_backbone_needs_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    loss = AutoencoderLoss(LossConfig(lpips_weight=1.0, lpips_pretrained_backbone=False))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = tiny_autoencoder()
    x_rec, posterior = model(x)
    _, log = loss.generator_step(x, x_rec, posterior, step=0)
    assert log["p_loss"] > 0


def test_lpips_stays_in_eval_mode_when_its_parent_trains(tmp_path, monkeypatch):
    """Lightning calls `.train()` on the module at fit start: LPIPS' heads have dropout (p=0.5), which must stay off
    so that the perceptual loss of an image pair is one number, not a random one."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    loss = AutoencoderLoss(LossConfig(lpips_weight=1.0, lpips_pretrained_backbone=False)).train()
    assert any(isinstance(m, torch.nn.Dropout) for m in loss.perceptual.modules())
    assert not any(m.training for m in loss.perceptual.modules())
    x, y = torch.rand(2, 2, 3, 32, 32) * 2 - 1
    assert torch.equal(loss.perceptual(x, y), loss.perceptual(x, y))


def test_missing_backbone_fails_fast_naming_flag_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError) as err:
        AutoencoderLoss(LossConfig(lpips_weight=1.0))
    message = str(err.value)
    assert "model.loss.lpips_pretrained_backbone=false" in message
    assert str(tmp_path / "empty" / "hub" / "checkpoints" / VGG16_FILE) in message


class LeavesAMark:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")  # unpickling it creates the file


def test_a_backbone_file_carrying_code_or_other_tensors_is_refused(local_vgg16, tmp_path):
    """torchvision read the cached VGG16 with weights_only=False: a file planted there ran its code."""
    path = vgg16_weights_path()
    torch.save({**local_vgg16, "extra": LeavesAMark(tmp_path / "ran")}, path)
    with pytest.raises(CheckpointError, match=r"VGG16 backbone .* carries code in its pickle \(refused: nothing "
                                              r"ran\): replace it .* or set model\.loss\.lpips_pretrained_backbone="
                                              r"false to use a random backbone$"):
        build_lpips(pretrained_backbone=True)
    assert not (tmp_path / "ran").exists()
    path.write_bytes(path.read_bytes()[:100])  # cut short
    with pytest.raises(CheckpointError, match=r"cannot be read \(damaged, .*set model\.loss\.lpips_pretrained_backbone"
                                              r"=false"):
        build_lpips(pretrained_backbone=True)
    torch.save({k: v for k, v in local_vgg16.items() if k != "features.28.weight"}, path)
    with pytest.raises(CheckpointError, match=r"is not torchvision's VGG16 \(features\.28\.weight missing .*set "
                                              r"model\.loss\.lpips_pretrained_backbone=false"):
        build_lpips(pretrained_backbone=True)


def test_the_loss_with_lpips_pickles(tmp_path, monkeypatch):
    """The module pickles (multiprocessing, `torch.save` of a whole module)."""
    import pickle

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    loss = AutoencoderLoss(LossConfig(lpips_weight=1.0, lpips_pretrained_backbone=False)).train()
    again = pickle.loads(pickle.dumps(loss))
    assert not again.perceptual.training and again.discriminator.training
