"""Sampling one image token with the flow-matching head: update rules, guidance and its schedules.

Notation (reference notes §5.1, §14.3): t is the data fraction (0 = noise, 1 = data); v is the head's velocity.
The time grids and everything else that differs between NextStep-1 and 1.1 come from the family object
(`family.py`).

Samplers (noise ξ comes in pre-drawn, `Family.draws_needed()` per token)
- "euler_maruyama": the reference SDE, x += ((1+t)v - x) dt + sqrt(2(1-t)) sqrt(dt) ξ. Default for NextStep-1.
- "euler": the deterministic ODE, x += v dt.
- "flow_sde": NextStep-1.1's default ("sde", noise level 0.8).
- "flow_cps": NextStep-1.1's "cps" sampler (noise level 0.8).

Guidance rows are laid out [cond | image+negative | negative-only]; all of them are evaluated in one call.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .family import Family
from .quant import expanded_weights
from .settings import CFG_SCHEDULES, SAMPLERS

NOISE_LEVEL = 0.8


def cfg_at(k: int, total: int, cfg: float, schedule: str, family: Family) -> float:
    """The guidance scale for image token k of `total`."""
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        return family.linear_cfg(k, total, cfg)
    raise ValueError(f"unknown cfg schedule {schedule!r}; choose one of {CFG_SCHEDULES}")


@dataclass
class Guidance:
    """How many guidance branches are stacked and with which scales."""
    branches: int  # 1 (none), 2 (text) or 3 (text + image)
    cfg: float
    cfg_img: float

    def combine(self, v: torch.Tensor) -> torch.Tensor:
        if self.branches == 1:
            return v
        if self.branches == 2:
            v_c, v_u = v.chunk(2)
            return v_u + self.cfg * (v_c - v_u)
        v_c, v_u1, v_u2 = v.chunk(3)
        return v_u2 + self.cfg_img * (v_u1 - v_u2) + self.cfg * (v_c - v_u1)


@dataclass
class HeadPlan:
    """What the head's sampling loop needs that is the same for every token of a generation (built once)."""
    grid: torch.Tensor  # the time grid (CPU): its values become Python constants, which a CUDA graph bakes in
    grid_dev: torch.Tensor  # the same on the model's device
    temb: torch.Tensor  # time embeddings of grid[:-1], [N, dim] in the model dtype
    sampler: str
    family: Family
    hoist: bool = True  # the AdaLN modulations of all steps in one matmul (False: the plain per-step loop)

    @classmethod
    def build(cls, head, family: Family, steps: int, settings, device, dtype) -> "HeadPlan":
        grid = family.time_grid(steps, settings.timesteps_shift)
        grid_dev = grid.to(device)
        return cls(grid, grid_dev, head.time_embeddings(grid_dev[:-1], dtype), settings.sampler, family,
                   settings.hoist)

    @property
    def draws(self) -> int:
        return self.family.draws_needed(len(self.grid) - 1, self.sampler != "euler")


def sample_token(head, c: torch.Tensor, noise: torch.Tensor, plan: HeadPlan, guidance: Guidance) -> torch.Tensor:
    """Sample one token for each of B images.

    c: conditions of all guidance rows [branches*B, hidden] (model dtype); noise: [draws, B, D] fp32 on c's device.
    The guidance scales may be device tensors. Returns the guided token [B, D] in float32.
    """
    with expanded_weights(head, c.dtype):  # quantised head layers: dequantise once per token, not once per step
        return _sample_token(head, c, noise, plan, guidance)


def _sample_token(head, c, noise, plan: HeadPlan, guidance: Guidance):
    grid = plan.grid
    n_eval = len(grid) - 1  # number of head evaluations
    x = noise[0].clone()
    if plan.hoist:
        mods = head.modulations(plan.grid_dev[:n_eval], c, plan.temb)
        velocity = lambda i, xin: head.velocity_premod(xin, mods, i)  # noqa: E731
    else:
        velocity = lambda i, xin: head.velocity(xin, plan.grid_dev[i], c)  # noqa: E731
    rep = guidance.branches
    final_step = plan.family.final_step
    for i in range(n_eval):
        v = guidance.combine(velocity(i, x.repeat(rep, 1) if rep > 1 else x))
        if final_step is not None and i == n_eval - 1:  # NextStep-1: a fixed deterministic last step
            x = x + v * final_step
            break
        xi = noise[i + 1] if plan.sampler != "euler" else None
        x = _update(plan.sampler, x, v, i, grid, xi)
    return x


def _update(sampler, x, v, i, grid, xi):
    t, t_next = float(grid[i]), float(grid[i + 1])
    dt = t_next - t
    if sampler == "euler":
        return x + v * dt
    if sampler == "euler_maruyama":
        score = (t * v - x) / ((1 - t) ** 2 - t * (-1) * (1 - t))
        drift = v + (1 - t) * score
        return x + drift * dt + math.sqrt(2 * (1 - t)) * (xi * math.sqrt(dt))
    x0_hat = x - t * v  # noise estimate
    x1_hat = x + (1 - t) * v  # data estimate
    if sampler == "flow_sde":
        sigma = 1 - t
        sigma_ref = float(grid[-2]) if i == 0 else sigma  # at sigma = 1 the reference substitutes t_{N-1}
        std = NOISE_LEVEL * math.sqrt(sigma / (1 - sigma_ref))
        mean = x0_hat * (1 - t_next) + x1_hat * t_next - (std**2 * dt / (2 * sigma)) * x0_hat
        return mean + std * math.sqrt(dt) * xi
    if sampler == "flow_cps":
        if t_next >= 1.0:
            return x1_hat
        std = (1 - t_next) * math.sin(NOISE_LEVEL * math.pi / 2)
        return x0_hat * math.sqrt((1 - t_next) ** 2 - std**2) + x1_hat * t_next + std * xi
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
