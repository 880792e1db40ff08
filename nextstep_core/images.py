"""Pixels in and out of the engine: input images to tensors, edit encoding, VAE encode and decode."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from .errors import NextStepError
from .prompt import IMAGE_MARKER

if TYPE_CHECKING:
    from .generation import Conditioning


def to_pixels(image) -> torch.Tensor:
    """PIL image or [3,H,W] / [H,W,3] tensor in 0..1 -> float [3,H,W]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
        if t.ndim != 3:
            raise NextStepError(f"an input image must be [3,H,W] or [H,W,3], got shape {list(image.shape)}")
        return t[:3] if t.shape[0] >= 3 else t.expand(3, -1, -1)
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise NextStepError(f"cannot use {type(image).__name__} as an image; pass a PIL image or a tensor")
    if image.mode == "RGBA":  # as the reference: transparent pixels become white
        bg = Image.new("RGB", image.size, (255, 255, 255))
        bg.paste(image, mask=image.split()[3])
        image = bg
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def encode_edit_images(vae, cond: Conditioning, images) -> Conditioning:
    """Encode one input image per prompt with the VAE; returns a Conditioning for editing."""
    images = list(images) if not isinstance(images, torch.Tensor) or images.ndim != 4 else list(images)
    if len(images) != len(cond.prompts):
        raise NextStepError(f"{len(images)} input image(s) for {len(cond.prompts)} prompt(s): editing needs exactly "
                            "one image per prompt.")
    latents = []
    for i, img in enumerate(images):
        px = to_pixels(img)
        _, h, w = px.shape
        if h % 16 or w % 16:
            raise NextStepError(f"input image {i} is {w}x{h}; editing needs sides that are multiples of 16. Resize "
                                f"or crop it first (e.g. to {max(16, w // 16 * 16)}x{max(16, h // 16 * 16)}).")
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
