"""Shared fixtures: tiny random checkpoints in the official layout, made by the engine's own maker."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> str:
    from nextstep_core.weights.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "NextStep-tiny"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from nextstep_core import load_model

    return load_model(tiny_dir, dtype="float32")


@pytest.fixture(scope="session")
def tiny_vae(tiny_dir):
    from nextstep_core import load_vae

    return load_vae(tiny_dir + "/vae")


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Results must not depend on the thread count; pin it so that bit-identity tests are meaningful."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def leave_as_found():
    """leave_as_found(folder) -> folder: what the test adds to that shared folder is removed after it."""
    import os
    import shutil

    watched = []

    def watch(folder):
        watched.append((folder, set(os.listdir(folder))))
        return folder

    yield watch
    for folder, before in watched:
        for name in set(os.listdir(folder)) - before:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
