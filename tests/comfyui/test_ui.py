"""The pack in ComfyUI's web UI, in headless Chromium: node search, loading the shipped workflow, running it.

Uses Debian's chromium driven by playwright (no `playwright install`, nothing downloaded at test time).
"""
from __future__ import annotations

import json
import shutil
import time

import pytest

from tests.comfyui import workflow_api as wf
from tests.comfyui.conftest import unavailable

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        unavailable("chromium is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(params=["comfy", "comfy_legacy"])
def server(request):
    return request.getfixturevalue(request.param)


def open_ui(browser, server):
    if server.modern:  # otherwise the template browser opens over the canvas on a fresh user directory
        server.post("/settings/Comfy.TutorialCompleted", True)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                           " && LiteGraph.registered_node_types['NextStepSampler']", timeout=60_000)
    return page, errors


def test_node_search_finds_nextstep_nodes(browser, server):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page, _ = open_ui(browser, server)
    page.evaluate("() => app.graph.clear()")
    for _attempt in range(3):  # the canvas may still be settling (fonts, banners) when the node types are in
        page.keyboard.press("Escape")
        page.mouse.dblclick(700, 450)  # double-click on empty canvas opens the node search
        page.keyboard.type("NextStep Sampler", delay=20)
        try:
            page.get_by_text("NextStep Sampler").first.wait_for(state="visible", timeout=8_000)
            break
        except PlaywrightTimeout:
            page.wait_for_timeout(1000)
    else:
        pytest.fail(f"node search did not show NextStep Sampler; page text: {page.inner_text('body')[:800]!r}")
    page.close()


def test_t2i_workflow_loads_and_runs_from_the_ui(browser, server):
    page, errors = open_ui(browser, server)
    workflow = wf.load("nextstep_t2i.json")
    for node in workflow["nodes"]:  # keep the CPU run short: 64x64 pixels, 2 head steps
        if node["type"] == "NextStepSampler":
            node["widgets_values"][2:4] = [64, 64]
            node["widgets_values"][9] = 2
        if node["type"] == "SaveImage":
            node["widgets_values"][0] = "ui_run"
    page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
    page.wait_for_timeout(500)
    assert "missing" not in page.inner_text("body").lower(), "the UI reports missing nodes"
    types = page.evaluate("() => app.graph._nodes.map(n => [n.type, !!LiteGraph.registered_node_types[n.type]])")
    assert sorted(t for t, _ in types) == sorted(n["type"] for n in workflow["nodes"])
    assert all(known for _, known in types), types
    before = set(server.output_dir.glob("ui_run*.png"))
    page.evaluate("() => app.queuePrompt(0, 1)")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not set(server.output_dir.glob("ui_run*.png")) - before:
        time.sleep(0.25)
    assert set(server.output_dir.glob("ui_run*.png")) - before, (
        f"no image written; history: {json.dumps(server.get('/history'))[-1500:]}")
    page.close()
