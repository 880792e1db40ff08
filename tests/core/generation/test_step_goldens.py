"""The per-token step gives the tokens the engine gave before it was unified: bit for bit, in fp32 on the CPU.

`golden/step_goldens.npz` was written by `golden/make_step_goldens.py` from the eager loop as it stood before the
eager loop and the CUDA-graph path were made one function. Where this machine's CPU capability and torch version are
the ones recorded, the tokens must be equal; elsewhere a matmul may round differently, so they must agree to 1e-4
(the bound the parity tests hold the official pipeline's goldens to).
"""
import os

import numpy as np
import pytest
import torch

from tests.core.golden.step_golden_cases import CASES, run_case

GOLDEN = np.load(os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden", "step_goldens.npz"))
SAME_PLATFORM = (str(GOLDEN["capability"]) == torch.backends.cpu.get_cpu_capability()
                 and str(GOLDEN["torch"]) == torch.__version__.split("+")[0])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return str(tmp_path_factory.mktemp("step_goldens"))


@pytest.mark.parametrize("name", list(CASES))
def test_the_eager_step_reproduces_the_recorded_tokens(name, ckpts):
    torch.set_num_threads(1)
    got = run_case(name, ckpts).numpy()
    want = GOLDEN[name]
    assert got.shape == want.shape
    if SAME_PLATFORM:
        assert np.array_equal(got, want), float(np.abs(got - want).max())
    else:
        assert np.abs(got - want).max() < 1e-4
