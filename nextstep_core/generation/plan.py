"""One generation's settings resolved against a model and its prompts: what every per-token stepper reads.

`sample` builds a `GenerationPlan` once; the eager loop (`generation.py`) and the fixed-shape step (`fast.py`) only
read it, so a setting is never threaded through their signatures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..model.family import Family
from .sampling import HeadPlan, cfg_at
from .settings import SamplerSettings


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
