"""Teacher forcing: keep some image tokens exactly as given and let the model write the rest.

NextStep writes an image token by token in raster order (16x16 pixels per token, row after row), feeding each token
back into the decoder. A kept token is fed back as given instead of being sampled, and the head does not run for it
(unless another image of the batch samples that position), so every later token is generated knowing it. Kept
tokens still consume their noise draws: with the same seed and settings, regenerating part of an image the sampler
itself produced reproduces the rest of it exactly.

Raster order decides what a regenerated token can see: everything above it and to its left, never what lies below
or to its right. Masks that reach the bottom edge (reroll from a row, outpaint downwards) continue the image
naturally; a hole in the middle is written without knowing the kept part below it, so seams can appear there.

    init = TokenInit.from_latents(latents, model.config, model.latent_affine, keep=keep_rows(8, h, w))
    res = sample(model, cond, settings, init=init)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import NextStepError
from .prompt import patchify
from .settings import is_whole_number


def check_variation(denoise: float, has_init: bool) -> None:
    """A variation strength below 1 starts tokens from an init: without one there is nothing to start from."""
    if denoise < 1 and not has_init:
        raise NextStepError(f"denoise {denoise} varies an image: it needs an init (a latent, --init-image or "
                            "--init-latents) to start from; without one, set denoise to 1.")


def keep_rows(k: int, h: int, w: int) -> torch.Tensor:
    """Keep mask [h*w] that keeps the top k token rows (16 pixels each) and regenerates the rest."""
    _check_grid(h, w)
    if not is_whole_number(k):
        raise NextStepError(f"keep_rows takes a whole number of token rows, got {k!r}.")
    if not 0 <= k <= h:
        raise NextStepError(f"keep_rows {k} is outside the image's {h} token rows (0 keeps nothing, {h} keeps all).")
    keep = torch.zeros(h, w, dtype=torch.bool)
    keep[:k] = True
    return keep.flatten()


def keep_from_mask(mask: torch.Tensor, h: int, w: int, threshold: float = 0.0) -> torch.Tensor:
    """Token keep mask [B, h*w] from a regenerate mask (1 = regenerate) at pixel, latent or any resolution.

    `mask` is [H, W], [B, H, W] or [B, 1, H, W] with values 0..1. Each token takes the mean of the mask over its
    16x16-pixel area (2x2 at latent resolution; proportional windows at other resolutions) and is regenerated when
    that mean is above `threshold` — with the default 0, when any pixel of its block is masked.
    """
    _check_grid(h, w)
    _check_tensor("a mask", mask)
    if mask.numel() == 0:
        raise NextStepError(f"the mask is empty (shape {list(mask.shape)}): give an [H, W] mask, 1 = regenerate.")
    m = mask.float()
    if m.ndim == 2:
        m = m[None]
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise NextStepError(f"a mask must be [H, W] or [B, H, W], got shape {list(mask.shape)}.")
    masked = F.adaptive_avg_pool2d(m[:, None], (h, w))[:, 0]  # [B, h, w]: the masked share of each token
    return (masked <= threshold).flatten(1)


def keep_from_noise_mask(noise_mask: torch.Tensor, n_img: int, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Token keep mask [n_img, h*w] from a ComfyUI `noise_mask` (1 = regenerate), read the way core KSampler reads it.

    KSampler resizes the mask bilinearly to the latent grid (h*patch x w*patch, any input resolution) and repeats
    it over the batch; a latent cell is then regenerated in proportion to its value. A token covers patch x patch
    latent cells and is regenerated when any of them has a value above 0, kept when all are 0.
    """
    _check_grid(h, w)
    _check_tensor("a noise_mask", noise_mask)
    m = noise_mask.float()
    if m.ndim < 2 or m.numel() == 0:
        raise NextStepError(f"a noise_mask must be [H, W], [B, H, W] or [B, 1, H, W], got {list(noise_mask.shape)}.")
    m = F.interpolate(m.reshape(-1, 1, m.shape[-2], m.shape[-1]), size=(h * patch, w * patch), mode="bilinear")
    reps = -(-n_img // m.shape[0])  # as comfy.utils.repeat_to_batch_size: tile, then cut to the batch
    m = m.repeat(reps, 1, 1, 1)[:n_img]
    return (F.max_pool2d(m, patch)[:, 0] <= 0).flatten(1)


@dataclass
class TokenInit:
    """The starting canvas: tokens [B or 1, T, D] in the model's token space and which of them to keep.

    `keep` is [T], [h, w], [B, T] or [B, h, w] (bool, True = keep). One row (B = 1) is shared by every image.
    """
    tokens: torch.Tensor
    keep: torch.Tensor

    def __post_init__(self):
        _check_tensor("TokenInit's tokens", self.tokens)
        _check_tensor("TokenInit's keep mask", self.keep)
        if not self.tokens.is_floating_point():
            raise NextStepError(f"the init tokens must be floating point, got {self.tokens.dtype}.")
        _check_finite("the init tokens", self.tokens)

    @classmethod
    def from_latents(cls, latents: torch.Tensor, cfg, latent_affine=(1.0, 0.0), keep=None) -> "TokenInit":
        """From latents [B, C, H/8, W/8] in the VAE's raw space (what the sampler returns and VAE Encode gives)."""
        _check_tensor("init latents", latents)
        _check_finite("the init latents", latents)
        if latents.ndim != 4 or latents.shape[1] != cfg.latent_channels:
            raise NextStepError(f"init latents must be [batch, {cfg.latent_channels}, height/8, width/8], got "
                                f"{list(latents.shape)}: encode the image with the NextStep VAE.")
        scale, shift = latent_affine
        tokens = patchify((latents.float().cpu() - shift) * scale, cfg.latent_patch_size)
        if keep is None:
            keep = torch.zeros(tokens.shape[1], dtype=torch.bool)
        return cls(tokens, keep)

    def resolve(self, n_img: int, h: int, w: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [n_img, T, D] float32, keep [n_img, T] bool) on the CPU, or a NextStepError saying what is off."""
        t = h * w
        tokens = self.tokens.float().cpu()
        if tokens.ndim != 3 or tokens.shape[1:] != (t, dim):
            raise NextStepError(f"the init tokens are {list(tokens.shape)} but this image needs [batch, {t}, {dim}] "
                                f"({w * 16}x{h * 16} pixels): give an image or latent of the output's size.")
        keep = self.keep.bool().cpu()
        if keep.shape[-2:] == (h, w):
            keep = keep.flatten(-2)
        if keep.ndim == 1:
            keep = keep[None]
        if keep.ndim != 2 or keep.shape[1] != t:
            raise NextStepError(f"the keep mask has shape {list(self.keep.shape)} but the image has {h}x{w} tokens.")
        return _per_image(tokens, n_img, "init tokens"), _per_image(keep, n_img, "keep masks")


def _check_tensor(what: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        how = ": convert it with torch.from_numpy(...)" if type(x).__module__ == "numpy" else ""
        raise NextStepError(f"{what} must be a torch tensor, got {type(x).__name__}{how}.")


def _check_finite(what: str, x: torch.Tensor) -> None:
    """NaN or inf in a kept token would spread into every token after it (and the image would come out black)."""
    if x.is_floating_point() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise NextStepError(f"{what} hold {bad} NaN or infinite value(s): give finite values, e.g. latents from "
                            "VAE Encode or saved by --save-latents.")


def _check_grid(h, w) -> None:
    if not (is_whole_number(h) and is_whole_number(w) and h > 0 and w > 0):
        raise NextStepError(f"the token grid must be whole numbers of rows and columns above 0, got {h!r} x {w!r}.")


def _per_image(x: torch.Tensor, n_img: int, what: str) -> torch.Tensor:
    if x.shape[0] == n_img:
        return x
    if x.shape[0] == 1:
        return x.expand(n_img, *x.shape[1:]).clone()
    raise NextStepError(f"{x.shape[0]} {what} for {n_img} images: give one for all, or one per image.")
