"""Time grids, guidance schedules and update rules of the samplers."""
import math

import pytest
import torch

from nextstep_core.model.family import NEXTSTEP_1 as FAMILY_V1, NEXTSTEP_1_1 as FAMILY_V1_1
from nextstep_core.generation.sampling import Guidance, HeadPlan, cfg_at, sample_token


def test_cfg_schedules():
    assert cfg_at(10, 100, 7.5, "constant", FAMILY_V1) == 7.5
    assert cfg_at(0, 100, 7.5, "linear", FAMILY_V1) == 7.5
    assert math.isclose(cfg_at(99, 100, 7.5, "linear", FAMILY_V1), 1 + 6.5 / 100)
    assert cfg_at(0, 100, 7.5, "linear", FAMILY_V1_1) == 3.75  # 1.1 ramps up from cfg / 2
    assert math.isclose(cfg_at(99, 100, 7.5, "linear", FAMILY_V1_1), 1 + 6.5 * 0.99)
    with pytest.raises(ValueError):
        cfg_at(0, 1, 2.0, "cosine", FAMILY_V1)


def test_guidance_formulas():
    v = torch.tensor([[3.0], [1.0], [0.5]])
    assert Guidance(3, 2.0, 4.0).combine(v).item() == 0.5 + 4.0 * (1.0 - 0.5) + 2.0 * (3.0 - 1.0)
    assert Guidance(2, 2.0, 1.0).combine(v[:2]).item() == 1.0 + 2.0 * 2.0


class _ConstHead:
    """v = a constant: every sampler's trajectory is then known in closed form."""

    def __init__(self, v):
        self.v = v

    def velocity(self, x, t, c):
        return self.v.expand_as(x).clone()


def test_euler_with_constant_velocity_moves_by_v_times_the_time_span():
    v = torch.full((1, 64), 0.5)
    for fam in (FAMILY_V1, FAMILY_V1_1):
        grid = fam.time_grid(10, 1.0)
        noise = torch.zeros(1, 1, 64)
        plan = HeadPlan(grid, grid, None, "euler", fam, loop="plain")
        x = sample_token(_ConstHead(v), torch.zeros(1, 4), noise, plan, Guidance(1, 1, 1))
        assert torch.allclose(x, v * float(grid[-1] - grid[0]), atol=1e-6)


def test_flow_sde_first_step_matches_the_1_1_formula():
    """At t=0 with shift 1, NextStep-1.1's SDE gives x <- 0.68 x + v/N + 0.8 xi."""
    from nextstep_core.generation.sampling import _update

    n = 28

    x, v, xi = torch.ones(1, 4), torch.full((1, 4), 2.0), torch.full((1, 4), 0.5)
    full = FAMILY_V1_1.time_grid(n, 1.0)
    out = _update("flow_sde", x, v, 0, full, xi)
    assert torch.allclose(out, 0.68 * x + v / n + 0.8 * xi, atol=1e-5)


def test_cps_last_step_returns_the_data_estimate():
    from nextstep_core.generation.sampling import _update

    x, v = torch.randn(2, 4), torch.randn(2, 4)
    out = _update("flow_cps", x, v, 1, torch.tensor([0.0, 0.9, 1.0]), torch.randn(2, 4))
    assert torch.allclose(out, x + 0.1 * v)


@pytest.mark.parametrize("family", [FAMILY_V1, FAMILY_V1_1], ids=lambda f: f.name)
@pytest.mark.parametrize("sampler", ["euler_maruyama", "euler", "flow_sde", "flow_cps"])
@pytest.mark.parametrize("guidance", [Guidance(1, 1.0, 1.0), Guidance(2, 4.0, 1.0), Guidance(3, 4.0, 2.0),
                                      Guidance(3, 1.0, 2.5)], ids=["1row", "2rows", "3rows", "3rows-cfg1"])
def test_fused_and_hoisted_loops_equal_the_plain_loop_on_the_same_noise(tiny_model, family, sampler, guidance):
    from nextstep_core.generation.settings import SamplerSettings

    head, images = tiny_model.image_head, 2
    g = torch.Generator().manual_seed(7)
    c = torch.randn(guidance.branches * images, tiny_model.config.hidden_size, generator=g)
    settings = SamplerSettings(sampler=sampler, timesteps_shift=2.0)
    out = {}
    for loop in ("plain", "hoisted", "fused"):
        plan = HeadPlan.build(head, family, 6, settings.replace(head_loop=loop), tiny_model.device, tiny_model.dtype)
        noise = torch.randn(plan.draws, images, 64, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            out[loop] = sample_token(head, c, noise, plan, guidance)
    scale = out["plain"].abs().max()
    assert (out["fused"] - out["plain"]).abs().max() <= 1e-6 * scale
    assert (out["hoisted"] - out["plain"]).abs().max() <= 1e-6 * scale


def test_step_coefficients_are_the_update_rules_in_closed_form():
    """x' = a x + b v + c xi: e.g. the reference SDE at t has a = 1 - dt (1-t)/d, b = dt (1 + t (1-t)/d), c = ..."""
    from nextstep_core.generation.sampling import StepCoefficients

    grid = FAMILY_V1.time_grid(5, 1.0)
    coef = StepCoefficients.build(grid, "euler_maruyama", FAMILY_V1, "cpu")
    t, dt = float(grid[1]), float(grid[2] - grid[1])
    d = (1 - t) ** 2 + t * (1 - t)
    assert math.isclose(coef.a[1], 1 - dt * (1 - t) / d, rel_tol=1e-9)
    assert math.isclose(coef.b[1], dt * (1 + t * (1 - t) / d), rel_tol=1e-9)
    assert math.isclose(coef.c[1], math.sqrt(2 * (1 - t)) * math.sqrt(dt), rel_tol=1e-9)
    assert (coef.a[-1], coef.b[-1], coef.c[-1]) == (1.0, 0.04, 0.0)  # NextStep-1's fixed deterministic last step
    assert coef.c_dev.shape == (4, 1, 1)  # one noise draw per stochastic step, after x0


def test_an_unknown_head_loop_is_refused():
    from nextstep_core import NextStepError
    from nextstep_core.generation.settings import SamplerSettings

    with pytest.raises(NextStepError, match="unknown head loop 'turbo'"):
        SamplerSettings(head_loop="turbo").validate()
