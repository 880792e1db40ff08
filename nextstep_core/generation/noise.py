"""Where the head's noise comes from: one stream per image (default) or the official pipeline's draws.

- "independent": image b has its own CPU generator seeded with (seed + b) mod 2**64, so a batch of N equals N
  single runs with seeds seed..seed+N-1, on every device.
- "reference": one generator seeded with `seed`, drawn in the order of the family's official pipeline. NextStep-1:
  for editing first one draw the size of the input latents (the reference's VAE posterior sample, unused since the
  VAE is deterministic); then per token one [n, 64] draw per noise use, n = images per prompt, shared by all
  prompts (the reference tiles it). NextStep-1.1: one [images, 64] draw per noise use, nothing before (it seeds
  after the VAE encode).
"""
from __future__ import annotations

import torch

from ..model.family import Family
from .settings import SEED_LIMIT


class NoiseSource:
    def __init__(self, mode: str, seed: int, n_prompts: int, n_per_prompt: int, dim: int, family: Family,
                 edit_shape: tuple | None = None):
        self.mode, self.n_prompts, self.n, self.dim = mode, n_prompts, n_per_prompt, dim
        self.tiled = family.reference_noise_tiled
        if mode == "reference":
            self.gen = [torch.Generator().manual_seed(seed)]
            if edit_shape is not None and family.reference_edit_draw:
                torch.randn(edit_shape, generator=self.gen[0])  # the reference's VAE posterior draw
        else:
            self.gen = [torch.Generator().manual_seed((seed + b) % SEED_LIMIT) for b in range(n_prompts * n_per_prompt)]

    def next(self, draws: int) -> torch.Tensor:
        """Noise for one token: [draws, B, D] float32 (CPU)."""
        if self.mode == "reference":
            if not self.tiled:
                return torch.randn((draws, self.n_prompts * self.n, self.dim), generator=self.gen[0])
            z = torch.randn((draws, self.n, self.dim), generator=self.gen[0])
            return z.repeat(1, self.n_prompts, 1)
        return torch.stack([torch.randn((draws, self.dim), generator=g) for g in self.gen], dim=1)
