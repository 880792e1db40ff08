"""One generation's settings resolved against a model and its prompts: what every per-token stepper reads.

`sample` builds a `GenerationPlan` once; the plain loop (`loop.py`) and the fixed-shape step (`graph.py`) only read
it, so a setting is never threaded through their signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..model.family import Family
from .sampling import HeadPlan, cfg_at
from .settings import SamplerSettings
from .step import TokenSpec


@dataclass
class GenerationPlan:
    settings: SamplerSettings  # validated, with the family's choices filled in
    family: Family
    h: int  # token grid: rows
    w: int  # token grid: columns
    branches: int  # guidance branches: 1, 2 or 3
    prompt_len: int  # padded prompt length (cache slots before the first image token)
    n_img: int  # images generated: prompts x images per prompt
    _heads: dict = field(default_factory=dict, repr=False)

    @property
    def total(self) -> int:
        return self.h * self.w

    @property
    def rows(self) -> int:
        return self.branches * self.n_img

    def guidance(self, k: int) -> tuple[float, float]:
        """(cfg, cfg_img) for image token k."""
        s = self.settings
        return (cfg_at(k, self.total, s.cfg, s.cfg_schedule, self.family),
                cfg_at(k, self.total, s.cfg_img, s.cfg_schedule, self.family))

    def steps_at(self, k: int) -> int:
        """Head steps for token k: `steps`, or with annealing a straight line from `steps` to `steps_end`."""
        s = self.settings
        if s.steps_end is None or self.total == 1:
            return s.steps
        return int(round(s.steps + (s.steps_end - s.steps) * k / (self.total - 1)))

    @property
    def draws(self) -> int:
        """Noise draws per token, always for the full step count: annealing keeps the un-annealed noise stream."""
        return self.family.draws_needed(self.settings.steps, self.settings.stochastic)

    def head_plan(self, model, steps: int) -> HeadPlan:
        """The head's time grid and its embeddings for `steps`, built once per generation and step count."""
        if steps not in self._heads:
            self._heads[steps] = HeadPlan.build(model.image_head, self.family, steps, self.settings, model.device,
                                                model.dtype)
        return self._heads[steps]

    def token_spec(self, model, k: int) -> TokenSpec:
        """What token k's step runs with (the head plan of its step count)."""
        return TokenSpec(self.head_plan(model, self.steps_at(k)), self.branches, self.settings.use_norm)

    def pos_rows(self, model, spare: int = 0) -> torch.Tensor | None:
        """The gen_pos_embed row added to the condition that predicts each token [total + spare, hidden] (spare rows
        are zero), or None when the model has no table. Token k of a w-wide grid reads the row its family says."""
        table = model.gen_pos_embed
        if table is None:
            return None
        side = model.config.base_image_grid_size
        idx = torch.tensor([self.family.pos_embed_index(k, self.w, side) for k in range(self.total)],
                           device=table.device)
        rows = table[0].index_select(0, idx)
        return torch.cat([rows, rows.new_zeros(spare, rows.shape[1])]).to(model.dtype)
