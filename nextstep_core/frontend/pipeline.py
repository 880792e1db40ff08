"""One call from prompts (and input images) to pictures: encode edits, sample tokens, decode."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..generation.loop import Conditioning, sample
from .images import decode_latents, encode_edit_images
from ..generation.settings import SamplerSettings, family_defaults


@dataclass
class GenerationResult:
    tokens: torch.Tensor  # [B, T, 64] image tokens as fed back to the model
    latents: torch.Tensor  # [B, 16, H/8, W/8] raw VAE space
    images: torch.Tensor  # [B, 3, H, W] float32 in 0..1

    def pil(self) -> list:
        from PIL import Image

        arr = (self.images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
        return [Image.fromarray(a) for a in arr]


def generate(model, vae, prompts, settings: SamplerSettings | None = None, images=None, positive_prompt: str = "",
             negative_prompt: str = "", progress=None) -> GenerationResult:
    """Text-to-image (or editing, with one input image per prompt). `settings` default to the model family's."""
    edit = images is not None
    settings = settings or family_defaults(model.config.family, edit=edit)
    cond = Conditioning(prompts, positive_prompt, negative_prompt)
    if edit:
        cond = encode_edit_images(vae, cond, images)
    res = sample(model, cond, settings, progress=progress,
                 latent_affine=(vae.config.scaling_factor, vae.config.shift_factor))
    return GenerationResult(res.tokens, res.latents, decode_latents(vae, res.latents))
