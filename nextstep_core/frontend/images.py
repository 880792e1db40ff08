"""Pixels in and out of the engine: input images to tensors, edit encoding, VAE encode and decode."""
from __future__ import annotations

import os
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ..errors import NextStepError
from ..fs import fs_error
from ..generation.prompt import IMAGE_MARKER
from ..generation.settings import MAX_SIDE

if TYPE_CHECKING:
    from ..generation.loop import Conditioning

MAX_INPUT_SIDE = MAX_SIDE  # no input image can be larger than the largest output
GRAY_16 = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grayscale (PNG, TIFF): scaled by 65535, not clipped at 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def read_image(path) -> torch.Tensor:
    """An image file -> float [3,H,W] in 0..1: the engine's one image reader (CLI, API; the nodes get tensors).

    As the reference's `load_image`: the camera's EXIF orientation is applied, transparency is composited on white.
    A side above MAX_INPUT_SIDE is refused from the file's header, before any pixel is decoded.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.path.expanduser(os.fspath(path))
    try:
        with warnings.catch_warnings():  # Pillow's bomb warning: any image it warns about is refused just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)  # lazy: reads the header only
        with im:
            if max(im.size) > MAX_INPUT_SIDE:
                raise NextStepError(f"the image {path} is {im.size[0]}x{im.size[1]}; no side may be above "
                                    f"{MAX_INPUT_SIDE} pixels. Resize it first.")
            im.load()
            return to_pixels(ImageOps.exif_transpose(im))
    except NextStepError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise NextStepError(f"cannot read the image {path}: there is no such file.") from None
    except UnidentifiedImageError:
        raise NextStepError(f"cannot read the image {path}: it is not an image format Pillow knows (use PNG, "
                            "JPEG or WebP).") from None
    except Image.DecompressionBombError as e:
        raise NextStepError(f"cannot read the image {path}: {e}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        if isinstance(e, OSError) and e.errno is not None:  # permission, a folder, a link loop: not the image's fault
            raise fs_error("read the image", path, e) from None
        raise NextStepError(f"cannot read the image {path}: it is truncated or corrupt ({e}). Save it "
                            "again as PNG.") from None


def to_pixels(image) -> torch.Tensor:
    """An image file path, PIL image or [3,H,W] / [H,W,3] tensor in 0..1 -> float [3,H,W] in 0..1."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, torch.Tensor):
        return _tensor_pixels(image)
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise NextStepError(f"cannot use {type(image).__name__} as an image; pass a file path, a PIL image or a "
                            "tensor")
    return torch.from_numpy(_pil_rgb(image)).permute(2, 0, 1).contiguous()


def _tensor_pixels(image: torch.Tensor) -> torch.Tensor:
    t = image.detach()
    t = t.float() / 255 if t.dtype == torch.uint8 else t.float()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)
    if t.ndim != 3:
        raise NextStepError(f"an input image must be [3,H,W] or [H,W,3], got shape {list(image.shape)}")
    if not torch.isfinite(t).all():
        raise NextStepError("the input image holds NaN or infinite values.")
    return t[:3] if t.shape[0] >= 3 else t.expand(3, -1, -1)


def _pil_rgb(image):
    """PIL image of any common mode -> float32 [H,W,3] in 0..1."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in GRAY_16 or mode in ("I", "F"):
        gray = _gray_unit(np.asarray(image).astype(np.float64), mode)
        return np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if mode in ALPHA_MODES or "transparency" in image.info:
        # as the reference: transparent pixels become white (its to_rgb composites RGBA and LA on white; a
        # palette or RGB image with a transparent colour is treated the same instead of showing the hidden colour)
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba)
    try:
        rgb = image.convert("RGB")
    except ValueError as e:
        raise NextStepError(f"images in mode {mode} cannot be used ({e}); save it as an RGB PNG.") from None
    return np.asarray(rgb, dtype=np.float32) / 255.0


def _gray_unit(a, mode: str):
    """16/32-bit or float grayscale -> 0..1 by the range its data type holds, not clipped at 255."""
    import numpy as np

    if not np.isfinite(a).all():
        raise NextStepError(f"the {mode} image holds NaN or infinite values.")
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode in GRAY_16 or (mode == "I" and lo >= 0 and hi <= 65535):  # 16-bit PNG / TIFF data
        return a / 65535.0
    if mode == "F" and lo >= 0 and hi <= 1:
        return a
    # 32-bit integers or floats outside 0..1: no fixed scale, so the image's own range maps to 0..1
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def prepare_edit_images(images, n_prompts: int) -> list:
    """Input images (paths, PIL images or tensors) -> checked pixels [3,H,W], one per prompt, before any encode."""
    images = list(images)
    if len(images) != n_prompts:
        raise NextStepError(f"{len(images)} input image(s) for {n_prompts} prompt(s): editing needs exactly "
                            "one image per prompt.")
    pixels = []
    for i, img in enumerate(images):
        px = to_pixels(img)
        _, h, w = px.shape
        if h % 16 or w % 16 or h > MAX_INPUT_SIDE or w > MAX_INPUT_SIDE:
            raise NextStepError(f"input image {i} is {w}x{h}; editing needs sides that are multiples of 16, at "
                                f"most {MAX_INPUT_SIDE}. Resize or crop it first (e.g. to "
                                f"{_fit16(w)}x{_fit16(h)}).")
        pixels.append(px)
    return pixels


def _fit16(side: int) -> int:
    return min(MAX_INPUT_SIDE, max(16, side // 16 * 16))


def encode_edit_images(vae, cond: Conditioning, images) -> Conditioning:
    """Encode one input image per prompt with the VAE; returns a Conditioning for editing."""
    latents = []
    for px in prepare_edit_images(images, len(cond.prompts)):
        with torch.inference_mode():
            latents.append(vae.to_ar(vae.encode_mean(px[None]))[0].float().cpu())
    prompts = [p if IMAGE_MARKER in p else IMAGE_MARKER + p for p in cond.prompts]
    return replace(cond, prompts=prompts, edit_latents=latents)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B,C,h,w] -> images [B,3,H,W] float32 in 0..1 (CPU)."""
    if latents.shape[1] != vae.config.z_channels:
        raise NextStepError(f"these latents have {latents.shape[1]} channels but the VAE takes "
                            f"{vae.config.z_channels}: decode them with the VAE they were made for.")
    with torch.inference_mode():
        return vae.decode(latents).cpu()


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] in 0..1 -> raw VAE latents [B,C,H/8,W/8] (float32, CPU)."""
    if images.shape[-1] % 8 or images.shape[-2] % 8:
        raise NextStepError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of 8.")
    with torch.inference_mode():
        return vae.encode_mean(images).float().cpu()
