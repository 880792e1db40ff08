"""Sampling one image token with the flow-matching head: time grids, update rules, guidance and its schedules.

Notation (reference notes §5.1, §14.3): t is the data fraction (0 = noise, 1 = data); v is the head's velocity;
the shift is S_s(t) = t / (s - (s - 1) t).

Grids
- "v1" (NextStep-1, GitHub reference): t_j = S_s(0.96 j / (N-1)), j = 0..N-1; N-1 updates, then a fixed Euler step
  of 0.04 with v(t_{N-1}).
- "v1.1" (NextStep-1.1): t_j = S_s(j / N), j = 0..N-1, then t_N = 1; N updates, the last one lands on t = 1.

Samplers (noise ξ comes in pre-drawn, `draws_needed()` per token)
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

from .config import FAMILY_V1_1
from .quant import expanded_weights

SAMPLERS = ("euler_maruyama", "euler", "flow_sde", "flow_cps")
CFG_SCHEDULES = ("constant", "linear")
V1_LAST_STEP = 0.04
NOISE_LEVEL = 0.8


def shift_time(t: torch.Tensor, s: float) -> torch.Tensor:
    return t / (s - (s - 1) * t)


def time_grid(steps: int, shift: float, family: str) -> torch.Tensor:
    """The t values the head is evaluated at, plus the end point of the last update (float32, on CPU)."""
    if family == FAMILY_V1_1:
        t = shift_time(torch.linspace(0, 1, steps + 1)[:-1], shift)
        return torch.cat([t, torch.ones(1)])
    t = shift_time(torch.linspace(0, 1 - V1_LAST_STEP, steps), shift)
    return torch.cat([t, (t[-1] + V1_LAST_STEP)[None]])


def draws_needed(steps: int, sampler: str, family: str) -> int:
    """Normal draws per token: one for x0, then one per stochastic update."""
    if sampler == "euler":
        return 1
    if family == FAMILY_V1_1:
        return 1 + steps
    return steps  # v1: N-1 stochastic updates, the final 0.04 step is deterministic


def cfg_at(k: int, total: int, cfg: float, schedule: str, family: str) -> float:
    """The guidance scale for image token k of `total`."""
    if schedule == "constant":
        return cfg
    if schedule == "linear":
        if family == FAMILY_V1_1:  # NextStep-1.1 ramps up from half the scale
            return max(cfg / 2, 1 + (cfg - 1) * k / total)
        return 1 + (cfg - 1) * (total - k) / total  # NextStep-1 (Muse): decays towards 1
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


def sample_token(head, c: torch.Tensor, noise: torch.Tensor, grid: torch.Tensor, guidance: Guidance,
                 sampler: str, family: str, hoist: bool = True, grid_dev: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token for each of B images.

    c: conditions of all guidance rows [branches*B, hidden] (model dtype); noise: [draws, B, D] fp32 on c's device;
    grid: `time_grid(...)` (CPU; its values become Python constants, which a CUDA graph bakes in); `grid_dev`: the
    same on c's device, when the caller keeps one (no copy inside a captured graph); `temb`: the grid's time
    embeddings (`head.time_embeddings(grid[:-1])`), which the caller computes once per generation. The guidance
    scales may be device tensors. Returns the guided token [B, D] in float32.
    """
    with expanded_weights(head, c.dtype):  # quantised head layers: dequantise once per token, not once per step
        return _sample_token(head, c, noise, grid, guidance, sampler, family, hoist,
                             grid.to(c.device) if grid_dev is None else grid_dev, temb)


def _sample_token(head, c, noise, grid, guidance, sampler, family, hoist, t_dev, temb):
    n_eval = len(grid) - 1  # number of head evaluations
    x = noise[0].clone()
    if hoist:
        mods = head.modulations(t_dev[:n_eval], c, temb)
        velocity = lambda i, xin: head.velocity_premod(xin, mods, i)  # noqa: E731
    else:
        velocity = lambda i, xin: head.velocity(xin, t_dev[i], c)  # noqa: E731
    rep = guidance.branches
    v1_final = family != FAMILY_V1_1
    for i in range(n_eval):
        v = guidance.combine(velocity(i, x.repeat(rep, 1) if rep > 1 else x))
        t, t_next = float(grid[i]), float(grid[i + 1])
        if v1_final and i == n_eval - 1:
            x = x + v * V1_LAST_STEP
            break
        dt = t_next - t
        xi = noise[i + 1] if sampler != "euler" else None
        x = _update(sampler, x, v, t, t_next, dt, xi, i, grid)
    return x


def _update(sampler, x, v, t, t_next, dt, xi, i, grid):
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
