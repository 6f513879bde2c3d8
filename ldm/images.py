"""Images in and out: every decoded file becomes 8-bit RGB here, and model images in [-1, 1] become uint8 here.

`decode_image` / `to_rgb` are the one place where an image file turns into pixels, for `ldm-data`, the training loader
and the evaluator alike, so a 16-bit PNG or a transparent logo looks the same everywhere:

- 16-bit and 32-bit integer greys (`I;16`, `I;16L`, `I;16B`, `I;16N`, `I`) are scaled from [0, 65535] to [0, 255]
  (Pillow's own `convert` clips them at 255, which turns a 16-bit photo white);
- float greys (`F`) are taken as [0, 1] when every value lies there, else as [0, 255], and clipped;
- transparency (`RGBA`, `LA`, `PA`, premultiplied `RGBa` / `La`, a palette or colour key with `transparency`) is
  composited over ALPHA_BACKGROUND, white, the usual page behind a transparent image;
- everything else (`1`, `L`, `P`, `CMYK`, `YCbCr`, `HSV`, `LAB`, 8-bit `RGB`) goes through Pillow's conversion;
- an EXIF orientation (phone photos store the sensor's pixels and a rotation tag) is applied first, so the image is
  upright, as every viewer shows it.
"""

from __future__ import annotations

import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps

ALPHA_BACKGROUND = (255, 255, 255)  # what shows through transparent pixels
EXIF_ORIENTATION = 0x0112              # the EXIF tag; 1 = upright, 2-8 = mirrored and / or rotated
INTEGER_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "LA", "PA")
PREMULTIPLIED_MODES = ("RGBa", "La")
# The formats an image member or file may be in (ldm.data.stream.IMAGE_KEYS; a phone's multi-picture JPEG opens as
# JPEG). Pillow would otherwise open whatever its plugins accept, EPS included, which hands the data to Ghostscript.
OPEN_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")


def open_image(source: str | os.PathLike | io.BytesIO) -> Image.Image:
    """`Image.open` restricted to OPEN_FORMATS; another format raises PIL.UnidentifiedImageError."""
    return Image.open(source, formats=OPEN_FORMATS)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """`image` (any Pillow mode) as 8-bit RGB, scaled and composited as the module docstring says.

    Args:
        image: a loaded (or lazily loading) Pillow image.
        background: the RGB colour transparent pixels are composited over.
    """
    image = upright(image)
    mode = image.mode
    if mode in INTEGER_GREY_MODES:
        raw = np.asarray(image)
        # 65535 -> 255, rounded to nearest (never a tie: x / 257 is never k + 0.5), in integers: float copies took
        # 85 bytes a pixel (3 GB for a 6000 x 6000 scan)
        grey = ((raw.astype(np.int64) + 128) // 257).clip(0, 255).astype(np.uint8)
        rgb = Image.fromarray(grey, "L").convert("RGB")
        key = image.info.get("transparency")  # a 16-bit PNG's colour key: that grey value is transparent
        if isinstance(key, int) and (keyed := raw == key).any():
            pixels = np.array(rgb)
            pixels[keyed] = background
            rgb = Image.fromarray(pixels, "RGB")
        return rgb
    if mode == "F":
        grey = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if grey.size and grey.min() >= 0.0 and grey.max() <= 1.0:
            grey = grey * 255.0
        return _grey_to_rgb(grey)
    if mode in PREMULTIPLIED_MODES:
        pixels = np.asarray(image).astype(np.float64)                  # (H, W, 4) or (H, W, 2), colour x alpha
        colour = pixels[..., :-1] if mode == "RGBa" else np.repeat(pixels[..., :1], 3, axis=-1)  # (H, W, 3)
        alpha = pixels[..., -1:] / 255.0                                                           # (H, W, 1)
        return _array_to_rgb(colour + np.asarray(background, dtype=np.float64) * (1.0 - alpha))
    if mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")  # note: applies a palette's or a colour key's `transparency` as alpha
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def upright(image: Image.Image) -> Image.Image:
    """`image` with its EXIF orientation applied (itself when it has none: no copy, and when its EXIF block cannot be
    read: damaged metadata, not a damaged image)."""
    try:
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 -- struct.error, SyntaxError, ValueError...: Pillow's parser has no one error
        return image
    if orientation in (None, 1):
        return image
    return ImageOps.exif_transpose(image)


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    """A float grey array in [0, 255] (values outside clipped) as an RGB image."""
    return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")


def _array_to_rgb(rgb: np.ndarray) -> Image.Image:
    """A float (H, W, 3) array in [0, 255] (values outside clipped) as an RGB image."""
    return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")


def decode_image(data: bytes) -> Image.Image:
    """The encoded image `data` (PNG, JPEG, WebP, BMP, GIF, TIFF) as 8-bit RGB; a truncated or garbage file, or
    another format, raises here."""
    with open_image(io.BytesIO(data)) as image:
        key = image.info.get("transparency")
        if image.mode == "RGB" and isinstance(key, tuple) and image.tile and image.tile[0][3] == "RGB;16B":
            return _keyed_16_bit_rgb(data, key)
        image.load()  # note: decodes now, so a truncated file fails inside this call, not later in a transform
        return to_rgb(image)


def _keyed_16_bit_rgb(data: bytes, key: tuple[int, int, int],
                      background: tuple[int, int, int] = ALPHA_BACKGROUND) -> Image.Image:
    """A 16-bit RGB PNG with a colour key: Pillow decodes the samples' high bytes and keeps the key in 16-bit units,
    so the key is matched on the exact samples (high bytes, then the low bytes through the little-endian unpacker
    on the same file), as libpng does, and the matching pixels composited over `background`."""
    planes = []
    for rawmode in ("RGB;16B", "RGB;16L"):  # the big-endian samples' high bytes, then their low bytes
        with open_image(io.BytesIO(data)) as image:
            image.info.pop("transparency")
            codec, extents, offset, _ = tile = image.tile[0]
            image.tile = [type(tile)(codec, extents, offset, rawmode)]  # the same tile, unpacked another way
            image.load()
            planes.append(np.asarray(upright(image)))
    high, low = planes
    keyed = ((high.astype(np.uint32) << 8 | low) == np.asarray(key, dtype=np.uint32)).all(axis=-1)
    pixels = high.copy()
    pixels[keyed] = background
    return Image.fromarray(pixels, "RGB")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] as uint8 in [0, 255], rounded as an image file stores them; stays on its device."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def write_png(pixels: torch.Tensor, path: str | os.PathLike) -> None:
    """Write uint8 pixels (3, H, W) as a PNG file, atomically: a write that fails (a full disk, a file size limit)
    raises and leaves no part-written file (torchvision's `write_png` wrote truncated or empty files without a
    word)."""
    import torchvision

    from ldm.io import atomic_write_bytes

    atomic_write_bytes(torchvision.io.encode_png(pixels.cpu()).numpy().tobytes(), path)


def make_grid(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Images (B, C, H, W) in [-1, 1] -> one uint8 grid (3, H', W') on the CPU, `nrow` images a row, white padding."""
    import torchvision  # note: imported here so that `ldm-data`, which decodes images, starts without it

    images = images.detach().float().cpu().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return to_uint8(torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0))  # (3, H', W')
