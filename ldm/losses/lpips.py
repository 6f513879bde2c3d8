"""LPIPS (Zhang et al. 2018) from the `lpips` package, built without network access.

The package ships its linear-layer weights, but the VGG16 backbone comes from torchvision's download into the torch hub
cache. Offline, a missing backbone file must fail before anything is built, naming the file to provide and the flag
that turns the pretrained backbone off; the file is read as tensors only (`load_checkpoint`), never unpickled with
code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoints import CheckpointError, load_checkpoint

VGG16_FILE = "vgg16-397923af.pth"  # torchvision's VGG16_Weights.IMAGENET1K_V1, the backbone lpips loads
MIN_SIZE = 16  # px: VGG16's fifth block max-pools the image halved four times, which must keep a pixel


def vgg16_weights_path() -> Path:
    """Where torchvision looks for the VGG16 backbone: `<torch hub dir>/checkpoints/vgg16-397923af.pth`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE


def build_lpips(pretrained_backbone: bool = True, flag: str = "model.loss.lpips_pretrained_backbone") -> nn.Module:
    """A frozen LPIPS-VGG network in eval mode; inputs are images in [-1, 1], output (B, 1, 1, 1).

    Args:
        pretrained_backbone: load torchvision's ImageNet VGG16 from the torch hub cache (it must be there already);
            False keeps a randomly initialized backbone under the pretrained linear layers, which needs no file.
        flag: the config key of `pretrained_backbone`, named in the error when the file is missing.
    """
    import lpips

    path = vgg16_weights_path()
    if pretrained_backbone and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS needs the VGG16 backbone weights at {path} and will not download them. Copy {VGG16_FILE} there "
            f"(or set TORCH_HOME to a directory whose hub/checkpoints/ holds it), set {flag}=false to use a random "
            f"backbone, or set model.loss.lpips_weight=0 to drop LPIPS.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecation notice for `pretrained=`
        net = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    if pretrained_backbone:
        load_vgg16_backbone(net.net, path, flag)
    net.eval().requires_grad_(False)
    return net


def load_vgg16_backbone(backbone: nn.Module, path: Path, flag: str) -> None:
    """torchvision's VGG16 convolutions from `path` into lpips' backbone (its `sliceK.<index>` modules are
    `features.<index>`), read without running code: torchvision's own loader unpickles the cached file with
    `weights_only=False`, so a planted file there would run whatever it carries."""
    try:
        state = load_checkpoint(path, "LPIPS backbone")
    except CheckpointError as err:
        why = "carries code in its pickle (refused: nothing ran)" if "refused to load" in str(err) else \
            "cannot be read (damaged, cut short, or not a file torch.save wrote)"
        raise CheckpointError(f"LPIPS's VGG16 backbone {path} {why}: replace it with torchvision's {VGG16_FILE}, "
                              f"or set {flag}=false to use a random backbone") from None
    names = {name: f"features.{name.split('.', 1)[1]}" for name in backbone.state_dict()}
    wrong = next((source for name, source in names.items() if not isinstance(state.get(source), torch.Tensor)
                  or state[source].shape != backbone.state_dict()[name].shape), None)
    if wrong is not None:
        raise CheckpointError(f"{path} is not torchvision's VGG16 ({wrong} missing or of another shape): replace it "
                              f"with {VGG16_FILE}, or set {flag}=false to use a random backbone")
    backbone.load_state_dict({name: state[source] for name, source in names.items()})
