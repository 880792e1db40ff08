"""What differs between NextStep-1 and 1.1 is answered by the family object: time grids, draws, schedules."""
import math

import pytest
import torch

from nextstep_core.model.family import NEXTSTEP_1, NEXTSTEP_1_1, family_of, shift_time


def test_v1_grid_is_linspace_to_096_shifted_plus_a_fixed_004_step():
    g = NEXTSTEP_1.time_grid(50, 1.0)
    assert len(g) == 51 and g[0] == 0 and math.isclose(float(g[-2]), 0.96, rel_tol=1e-6)
    assert math.isclose(float(g[-1]), 1.0, rel_tol=1e-6)
    g = NEXTSTEP_1.time_grid(50, 3.2)
    assert math.isclose(float(g[-2]), 0.96 / (3.2 - 2.2 * 0.96), rel_tol=1e-5)
    assert math.isclose(float(g[-1] - g[-2]), 0.04, rel_tol=1e-4)  # unshifted final step: ends at 0.9224


def test_v11_grid_lands_on_one():
    g = NEXTSTEP_1_1.time_grid(28, 1.0)
    assert len(g) == 29 and float(g[-1]) == 1.0 and math.isclose(float(g[1]), 1 / 28, rel_tol=1e-5)
    g = NEXTSTEP_1_1.time_grid(50, 3.2)
    assert math.isclose(float(g[1]), float(shift_time(torch.tensor(0.02), 3.2)), rel_tol=1e-6)


def test_draw_counts_match_the_reference():
    assert NEXTSTEP_1.draws_needed(50, stochastic=True) == 50  # x0 + 49 SDE steps; the 0.04 step is deterministic
    assert NEXTSTEP_1_1.draws_needed(28, stochastic=True) == 29
    assert NEXTSTEP_1_1.draws_needed(28, stochastic=False) == 1


def test_linear_cfg_decays_for_nextstep_1_and_ramps_up_for_1_1():
    assert NEXTSTEP_1.linear_cfg(0, 100, 7.5) == 7.5
    assert math.isclose(NEXTSTEP_1.linear_cfg(99, 100, 7.5), 1 + 6.5 / 100)
    assert NEXTSTEP_1_1.linear_cfg(0, 100, 7.5) == 3.75  # 1.1 ramps up from cfg / 2
    assert math.isclose(NEXTSTEP_1_1.linear_cfg(99, 100, 7.5), 1 + 6.5 * 0.99)


def test_position_table_rows():
    assert NEXTSTEP_1.pos_embed_index(5, 4, 32) == 5  # flat index into the table
    assert NEXTSTEP_1_1.pos_embed_index(5, 4, 32) == 32 + 1  # row 1, column 1 of the 32-wide table


def test_the_family_is_looked_up_by_name_or_config():
    assert family_of("nextstep-1.1") is NEXTSTEP_1_1
    assert family_of(type("Cfg", (), {"family": "nextstep-1"})()) is NEXTSTEP_1
    with pytest.raises(ValueError, match="unknown NextStep family"):
        family_of("nextstep-2")
