"""Time grids, guidance schedules and update rules of the samplers."""
import math

import pytest
import torch

from nextstep_core.family import NEXTSTEP_1 as FAMILY_V1, NEXTSTEP_1_1 as FAMILY_V1_1
from nextstep_core.sampling import Guidance, HeadPlan, cfg_at, sample_token


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
        plan = HeadPlan(grid, grid, None, "euler", fam, hoist=False)
        x = sample_token(_ConstHead(v), torch.zeros(1, 4), noise, plan, Guidance(1, 1, 1))
        assert torch.allclose(x, v * float(grid[-1] - grid[0]), atol=1e-6)


def test_flow_sde_first_step_matches_the_1_1_formula():
    """At t=0 with shift 1, NextStep-1.1's SDE gives x <- 0.68 x + v/N + 0.8 xi."""
    from nextstep_core.sampling import _update

    n = 28

    x, v, xi = torch.ones(1, 4), torch.full((1, 4), 2.0), torch.full((1, 4), 0.5)
    full = FAMILY_V1_1.time_grid(n, 1.0)
    out = _update("flow_sde", x, v, 0, full, xi)
    assert torch.allclose(out, 0.68 * x + v / n + 0.8 * xi, atol=1e-5)


def test_cps_last_step_returns_the_data_estimate():
    from nextstep_core.sampling import _update

    x, v = torch.randn(2, 4), torch.randn(2, 4)
    out = _update("flow_cps", x, v, 1, torch.tensor([0.0, 0.9, 1.0]), torch.randn(2, 4))
    assert torch.allclose(out, x + 0.1 * v)
