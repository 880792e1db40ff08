"""Writes `step_goldens.npz`: the eager per-token loop's tokens for every kind of generation, taken from the engine
as it was before the per-token step was unified (issue "One per-token step", commit 67f00f1), so that the refactor
can be held to bit-identity (`tests/core/generation/test_step_goldens.py`).

    python -m tests.core.golden.make_step_goldens        # from the repository root; one thread, fp32, CPU

Each case is (family, conditioning, settings, init); the cases themselves live in `step_golden_cases.py` so that the
test runs exactly what was recorded. The file also records the CPU capability and torch version it was made with:
bit-identity is only expected where both match (another instruction set may round a matmul differently).
"""
from __future__ import annotations

import os
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from tests.core.golden.step_golden_cases import CASES, run_case

    torch.set_num_threads(1)
    out = {"capability": np.array(torch.backends.cpu.get_cpu_capability()),
           "torch": np.array(torch.__version__.split("+")[0])}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            out[name] = run_case(name, tmp).numpy()
            print(name, out[name].shape)
    np.savez_compressed(os.path.join(HERE, "step_goldens.npz"), **out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
