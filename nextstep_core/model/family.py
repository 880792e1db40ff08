"""What differs between NextStep-1 and NextStep-1.1, in one place: the family object chosen once per model.

Everything else asks the family (`family_of(cfg)`) instead of comparing names; a third family is one more
`Family(...)` below. Reference notes §5.1, §5.2, §5.9 (NextStep-1) and §14.2–§14.6, §14.9 (NextStep-1.1).

Time grids (t = data fraction, 0 = noise, S_s(t) = t / (s - (s - 1) t)):
- NextStep-1: t_j = S_s(0.96 j / (N-1)), j = 0..N-1; N-1 updates, then a fixed Euler step of 0.04 with v(t_{N-1}).
- NextStep-1.1: t_j = S_s(j / N), j = 0..N-1, then t_N = 1; N updates, the last one lands on t = 1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FAMILY_V1 = "nextstep-1"
FAMILY_V1_1 = "nextstep-1.1"
DEFAULT_NEGATIVE = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                    "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, "
                    "blurry.")


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    return t / (s - (s - 1) * t)


@dataclass(frozen=True)
class Family:
    name: str
    final_step: float | None  # NextStep-1's fixed last Euler step (0.04); None: the grid ends at t = 1
    linear_cfg_ramps_up: bool  # linear schedule: 1.1 rises from cfg/2, NextStep-1 (Muse) decays towards 1
    prepends_bos: bool  # 1.1 puts the tokenizer's BOS in front of each caption
    reference_noise_tiled: bool  # NextStep-1's pipeline tiles one draw over the prompts; 1.1 draws a row per image
    reference_edit_draw: bool  # NextStep-1 draws a VAE-posterior sample before seeding the head (1.1 seeds after)
    pos_embed_aspect: bool  # gen_pos_embed: 1.1 slices the GxG table by rows; NextStep-1 indexes it flat
    sampler: str  # the reference's default head sampler
    steps: int
    use_norm: bool
    positive_prompt: str
    negative_prompt: str = DEFAULT_NEGATIVE

    def time_grid(self, steps: int, shift: float) -> torch.Tensor:
        """The t values the head is evaluated at, plus the end point of the last update (float32, on CPU)."""
        if self.final_step is None:
            t = shift_time(torch.linspace(0, 1, steps + 1)[:-1], shift)
            return torch.cat([t, torch.ones(1)])
        t = shift_time(torch.linspace(0, 1 - self.final_step, steps), shift)
        return torch.cat([t, (t[-1] + self.final_step)[None]])

    def draws_needed(self, steps: int, stochastic: bool) -> int:
        """Normal draws per token: one for x0, then one per stochastic update (NextStep-1's last step is not)."""
        if not stochastic:
            return 1
        return steps if self.final_step is not None else 1 + steps

    def linear_cfg(self, k: int, total: int, cfg: float) -> float:
        """The linear schedule's guidance scale for image token k of `total`."""
        if self.linear_cfg_ramps_up:
            return max(cfg / 2, 1 + (cfg - 1) * k / total)
        return 1 + (cfg - 1) * (total - k) / total

    def pos_embed_index(self, k: int, w: int, table_side: int) -> int:
        """Row of the gen_pos_embed table for image token k on a grid w tokens wide."""
        return (k // w) * table_side + (k % w) if self.pos_embed_aspect else k


NEXTSTEP_1 = Family(FAMILY_V1, final_step=0.04, linear_cfg_ramps_up=False, prepends_bos=False,
                    reference_noise_tiled=True, reference_edit_draw=True, pos_embed_aspect=False,
                    sampler="euler_maruyama", steps=50, use_norm=True,
                    positive_prompt="masterpiece, film grained, best quality.")
NEXTSTEP_1_1 = Family(FAMILY_V1_1, final_step=None, linear_cfg_ramps_up=True, prepends_bos=True,
                      reference_noise_tiled=False, reference_edit_draw=False, pos_embed_aspect=True,
                      sampler="flow_sde", steps=28, use_norm=False, positive_prompt="")
_BY_NAME = {f.name: f for f in (NEXTSTEP_1, NEXTSTEP_1_1)}
FAMILIES = tuple(_BY_NAME)


def family_of(cfg_or_name) -> Family:
    """The family object of a model config (or of a family name)."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.family
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown NextStep family {name!r}; expected one of {FAMILIES}") from None
