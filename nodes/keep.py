"""Keep part of an image: the NextStep Sampler's optional LATENT input, and NextStep Keep Rows.

A LATENT's `noise_mask` (1 = regenerate) is read the way core KSampler reads it, so core Set Latent Noise Mask,
VAE Encode (for Inpainting) and Pad Image for Outpainting work unchanged; kept tokens are teacher-forced
(nextstep_core/keep.py).
"""
from __future__ import annotations

import torch

from .. import nextstep_core as ns
from .common import CATEGORY, MAX_SIDE, TOKEN_PIXELS, NextStepNodeError

RASTER_NOTE = ("NextStep writes tokens in rows, top to bottom and left to right: a regenerated region sees only "
               "what lies above it and to its left, never what is below or to its right.")
LATENT_TOOLTIP = ("Optional: keep part of this image (from NextStep VAE Encode or a previous NextStep Sampler). Its "
                  "noise_mask (Set Latent Noise Mask, VAE Encode for Inpainting, NextStep Keep Rows) marks what to "
                  "regenerate (1) and what to keep (0); without one, everything is generated and the latent only "
                  "sets the size. width/height must equal its size. " + RASTER_NOTE)


def _samples(latent, node: str, channels: int | None = None) -> torch.Tensor:
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if samples is None or samples.ndim != 4:
        raise NextStepNodeError(f"{node}: expected a LATENT with 'samples' [B,C,H,W].")
    if channels is not None and samples.shape[1] != channels:
        raise NextStepNodeError(f"{node}: this LATENT has {samples.shape[1]} channels, NextStep's have {channels}: "
                                "encode the image with NextStep VAE Encode.")
    step = TOKEN_PIXELS // 8
    if samples.shape[-1] % step or samples.shape[-2] % step:
        raise NextStepNodeError(f"{node}: this LATENT is {samples.shape[-1] * 8}x{samples.shape[-2] * 8} pixels; "
                                f"NextStep needs sides that are multiples of {TOKEN_PIXELS}. Scale the image first.")
    return samples


def sampler_init(latent, module, n_img: int, width: int, height: int, node: str):
    """The TokenInit for the NextStep Sampler's `latent` input (None without one).

    One latent serves every image, or one per image; a noise_mask is repeated over the images as KSampler does."""
    if latent is None:
        return None
    cfg = module.config
    samples = _samples(latent, node, cfg.latent_channels)
    size = (samples.shape[-1] * 8, samples.shape[-2] * 8)
    if size != (width, height):
        raise NextStepNodeError(f"{node}: the latent is {size[0]}x{size[1]} pixels but width/height are "
                                f"{width}x{height}. The latent decides the image size: set width {size[0]} and "
                                f"height {size[1]}.")
    if samples.shape[0] not in (1, n_img):
        raise NextStepNodeError(f"{node}: the latent holds {samples.shape[0]} images for {n_img} to generate: give "
                                "one for all of them, or one per image.")
    h, w = height // TOKEN_PIXELS, width // TOKEN_PIXELS
    mask = latent.get("noise_mask")
    keep = (torch.zeros(h * w, dtype=torch.bool) if mask is None else
            ns.keep_from_noise_mask(mask.cpu(), n_img, h, w, cfg.latent_patch_size))
    return ns.TokenInit.from_latents(samples, cfg, module.latent_affine, keep)


class NextStepKeepRows:
    TITLE = "NextStep Keep Rows"
    DESCRIPTION = ("Marks the top rows of a LATENT to keep and the rest to regenerate (a noise_mask), for the NextStep "
                   "Sampler's latent input: reroll the bottom of an image with a new seed. " + RASTER_NOTE)
    CATEGORY = CATEGORY
    FUNCTION = "keep"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The same latent with a noise_mask: 0 (keep) on the top rows, 1 (regenerate) below.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "From a NextStep Sampler or NextStep VAE Encode."}),
            "rows": ("INT", {"default": 16, "min": 0, "max": MAX_SIDE // TOKEN_PIXELS,
                             "tooltip": f"Token rows to keep from the top ({TOKEN_PIXELS} pixels each; 16 = the top "
                                        f"256 pixels). 0 regenerates everything; rows beyond the image keep all of "
                                        "it. Replaces any noise_mask the latent had."}),
        }}

    def keep(self, latent, rows):
        samples = _samples(latent, self.TITLE)
        mask = torch.ones(1, 1, *samples.shape[-2:], dtype=torch.float32)
        mask[..., :rows * (TOKEN_PIXELS // 8), :] = 0.0
        return ({**latent, "noise_mask": mask.to(samples.device)},)


NODE_CLASS_MAPPINGS = {"NextStepKeepRows": NextStepKeepRows}