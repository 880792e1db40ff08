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

Head loops (`SamplerSettings.head_loop`): "plain" evaluates the head step by step as the reference does (the
reference the others are tested against); "hoisted" computes the AdaLN modulations of all steps at once; "fused"
(default) also runs each step in as few kernels as the arithmetic allows. Every update rule is linear in (x, v, ξ),
x' = a x + b v + c ξ, with a, b, c fixed by the time grid, so the fused loop reads them from a table built once per
generation (`StepCoefficients`, taken from `_update` itself), scales all of a token's noise in one op, and spends
three ops per step on guidance + update. On the fixed-shape path the fused loop's step (head, guidance and update)
can run through `torch.compile` (`compile.py`, `HeadPlan.compiled`), with its coefficients as tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import compile as compiling
from ..model.family import Family
from ..weights.quant import expanded_weights
from .settings import CFG_SCHEDULES, HEAD_LOOPS, SAMPLERS

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

    def weights(self) -> torch.Tensor | None:
        """The combine as weights of the rows (3 branches): v_c cfg + v_u1 (cfg_img - cfg) + v_u2 (1 - cfg_img)."""
        if self.branches != 3:
            return None
        cfg, cfg_img = torch.as_tensor(self.cfg), torch.as_tensor(self.cfg_img)
        return torch.stack([cfg, cfg_img - cfg, 1 - cfg_img]).float()[:, None, None]

    def combine_rows(self, v: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """`combine` for v [branches, B, D] in one or two ops; `w` = `weights()`, computed once per token."""
        if self.branches == 1:
            return v[0]
        if self.branches == 2:
            return torch.lerp(v[1], v[0], self.cfg)
        return (v * w).sum(0)


@dataclass
class StepCoefficients:
    """x' = a x + b v + c ξ for each head step (Python floats, so a CUDA graph bakes them in); c as a tensor too, and
    a, b as tensors for the compiled step (whose graph must not depend on the step)."""
    a: list
    b: list
    c: list
    c_dev: torch.Tensor | None  # [steps that draw noise] on the model's device; None for the ODE sampler
    ab_dev: torch.Tensor | None = None  # [steps, 2] float32 on the model's device

    @classmethod
    def build(cls, grid: torch.Tensor, sampler: str, family: Family, device) -> "StepCoefficients":
        n_eval = len(grid) - 1
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        noisy = sampler != "euler"
        xi = zero if noisy else None
        a, b, c = [], [], []
        for i in range(n_eval):
            if family.final_step is not None and i == n_eval - 1:  # NextStep-1's fixed deterministic last step
                abc = (1.0, family.final_step, 0.0)
            else:  # the rule is linear: its value at unit inputs is the coefficient
                abc = (float(_update(sampler, one, zero, i, grid, xi)), float(_update(sampler, zero, one, i, grid, xi)),
                       float(_update(sampler, zero, zero, i, grid, one)) if noisy else 0.0)
            for column, value in zip((a, b, c), abc):
                column.append(value)
        n_noise = family.draws_needed(n_eval, noisy) - 1
        c_dev = torch.tensor(c[:n_noise], dtype=torch.float32, device=device)[:, None, None] if noisy else None
        return cls(a, b, c, c_dev, torch.tensor([a, b], dtype=torch.float32, device=device).t().contiguous())


@dataclass
class HeadPlan:
    """What the head's sampling loop needs that is the same for every token of a generation (built once)."""
    grid: torch.Tensor  # the time grid (CPU): its values become Python constants, which a CUDA graph bakes in
    grid_dev: torch.Tensor  # the same on the model's device
    temb: torch.Tensor  # time embeddings of grid[:-1], [N, dim] in the model dtype
    sampler: str
    family: Family
    loop: str = "fused"  # "plain" (per-step reference loop), "hoisted" or "fused": see the module docstring
    coef: StepCoefficients | None = None  # the fused loop's per-step coefficients (built when loop == "fused")
    compiled: bool = False  # the fused loop's step through torch.compile (compile.py): set by the fixed-shape path
    start: int = 0  # the first step evaluated: > 0 starts part-way from an init token (variation strength, denoise)

    def __post_init__(self):
        if self.loop not in HEAD_LOOPS:
            raise ValueError(f"unknown head loop {self.loop!r}; choose one of {HEAD_LOOPS}")
        if self.loop == "fused" and self.coef is None:
            self.coef = StepCoefficients.build(self.grid, self.sampler, self.family, self.grid_dev.device)

    @classmethod
    def build(cls, head, family: Family, steps: int, settings, device, dtype) -> "HeadPlan":
        grid = family.time_grid(steps, settings.timesteps_shift)
        grid_dev = grid.to(device)
        return cls(grid, grid_dev, head.time_embeddings(grid_dev[:-1], dtype), settings.sampler, family,
                   settings.head_loop, start=start_step(settings.denoise, len(grid) - 1))

    @property
    def draws(self) -> int:
        return self.family.draws_needed(len(self.grid) - 1, self.sampler != "euler")


def start_step(denoise: float, n_eval: int) -> int:
    """The first of `n_eval` head steps a token with an init starts at, for variation strength `denoise`: 1 runs them
    all (from pure noise), 0.5 the second half of the family's time grid, 0 none (the init as it is)."""
    return min(n_eval, int(round((1.0 - denoise) * n_eval)))


def start_point(noise: torch.Tensor, init: torch.Tensor | None, plan: HeadPlan) -> torch.Tensor:
    """Where the flow starts: the token's first draw x0 (pure noise, t = 0), or, part-way, its init token mixed with
    x0 at the grid's time t_start as flow matching defines the path: t init + (1 - t) x0."""
    if plan.start == 0 or init is None:
        return noise[0]
    return torch.lerp(noise[0], init.to(noise.dtype), float(plan.grid[plan.start]))


def sample_token(head, c: torch.Tensor, noise: torch.Tensor, plan: HeadPlan, guidance: Guidance,
                 init: torch.Tensor | None = None) -> torch.Tensor:
    """Sample one token for each of B images.

    c: conditions of all guidance rows [branches*B, hidden] (model dtype); noise: [draws, B, D] fp32 on c's device.
    The guidance scales may be device tensors. `init` [B, D]: the tokens a variation starts from (`plan.start > 0`).
    Returns the guided token [B, D] in float32. The noise is read as a whole run reads it, whatever the start.
    """
    with expanded_weights(head, c.dtype):  # quantised head layers: dequantise once per token, not once per step
        return _sample_token(head, c, noise, plan, guidance, init)


def _sample_token(head, c, noise, plan: HeadPlan, guidance: Guidance, init):
    if plan.loop == "fused":
        return _fused_loop(head, c, noise, plan, guidance, init)
    grid = plan.grid
    n_eval = len(grid) - 1  # number of head evaluations
    x = start_point(noise, init, plan).clone()
    if plan.loop == "hoisted":
        mods = head.modulations(plan.grid_dev[:n_eval], c, plan.temb)
        velocity = lambda i, xin: head.velocity_premod(xin, mods, i)  # noqa: E731
    else:
        velocity = lambda i, xin: head.velocity(xin, plan.grid_dev[i], c)  # noqa: E731
    rep = guidance.branches
    final_step = plan.family.final_step
    for i in range(plan.start, n_eval):
        v = guidance.combine(velocity(i, x.repeat(rep, 1) if rep > 1 else x))
        if final_step is not None and i == n_eval - 1:  # NextStep-1: a fixed deterministic last step
            x = x + v * final_step
            break
        xi = noise[i + 1] if plan.sampler != "euler" else None
        x = _update(plan.sampler, x, v, i, grid, xi)
    return x


def _fused_loop(head, c, noise, plan: HeadPlan, guidance: Guidance, init):
    """The plain loop's arithmetic, reassociated: per step the head, then guidance and update in three ops."""
    coef = plan.coef
    n_eval = len(coef.a)
    mods = head.modulations(plan.grid_dev[:n_eval], c, plan.temb, plus_one=True)
    w = guidance.weights()
    w = None if w is None else w.to(noise.device)
    # every noise term of the token scaled at once: c_i ξ_i (the draws after x0, in step order)
    scaled = noise[1:1 + len(coef.c_dev)] * coef.c_dev if coef.c_dev is not None else None
    x = start_point(noise, init, plan)
    if plan.compiled and compiling.active():
        return _compiled_loop(head, x, mods, scaled, plan, guidance, w)
    for i in range(plan.start, n_eval):
        v = guidance.combine_rows(head.velocity_fused(x, mods, i, guidance.branches), w)
        a, b = coef.a[i], coef.b[i]
        if coef.c[i] != 0.0:
            base = torch.add(scaled[i], x, alpha=a)
        else:
            base = x if a == 1.0 else x * a
        x = torch.add(base, v, alpha=b)
    return x


def _compiled_loop(head, x, mods, scaled, plan: HeadPlan, guidance: Guidance, w):
    """The fused loop through the compiled step (`compile.head_update`): everything that changes with the step goes
    in as a tensor (its slices of the modulations, its coefficients, its scaled noise or zeros), so one graph serves
    every step, token and step count."""
    coef, rows = plan.coef, guidance.branches
    n_eval = len(coef.a)
    if rows == 2:  # the scale as a tensor: a float would be baked into the graph
        w = torch.as_tensor(guidance.cfg, dtype=torch.float32, device=x.device)
    terms = x.new_zeros(n_eval, *x.shape)
    if scaled is not None:
        terms[:len(scaled)] = scaled
    ab = coef.ab_dev
    for i in range(plan.start, n_eval):
        x = compiling.head_update(head, x, [m[i:i + 1] for m in mods], rows, w, ab[i, 0], ab[i, 1], terms[i])
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
