"""The pack in ComfyUI's web UI, in headless Chromium: node search, and every shipped workflow loaded, run and
laid out so that no node covers another.

Uses Debian's chromium driven by playwright (no `playwright install`, nothing downloaded at test time).
"""
from __future__ import annotations

import io
import shutil
import urllib.request

import pytest
from PIL import Image

from tests.comfyui import comfy_server as cs
from tests.comfyui import ui_page as ui
from tests.comfyui import workflow_api as wf
from tests.comfyui.conftest import unavailable

WORKFLOWS = sorted(p.name for p in wf.WORKFLOWS.glob("*.json"))
IMAGE_LOADERS = {"LoadImage", "LoadImageMask"}
THUMBNAIL_MAX_BYTES = 200_000


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
        b = p.chromium.launch(executable_path=exe, headless=True, args=ui.CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(params=["comfy", "comfy_legacy"])
def server(request):
    return request.getfixturevalue(request.param)


def test_node_search_finds_nextstep_nodes(browser, server):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page, _ = ui.open_ui(browser, server)
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


def provide_input_images(server, workflow: dict) -> None:
    """A small picture under every file name the workflow's image loaders ask for, as a user would have."""
    for node in workflow["nodes"]:
        if node["type"] in IMAGE_LOADERS:
            Image.new("RGBA", (56, 40), (200, 120, 40, 255)).save(server.input_dir / node["widgets_values"][0])


@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_loads_runs_and_no_node_covers_another(browser, server, name, tmp_path):
    """Each node's box is read from the frontend itself, once after loading and once after a run, when the
    sampler shows its live preview and the output node its image (both make nodes taller)."""
    workflow = wf.load(name)
    provide_input_images(server, workflow)
    page, _ = ui.open_ui(browser, server, width=1920, height=1080)
    ui.load_workflow(page, workflow)
    assert "missing" not in page.inner_text("body").lower(), "the UI reports missing nodes"
    types = page.evaluate("() => app.graph._nodes.map(n => [n.type, !!LiteGraph.registered_node_types[n.type]])")
    assert sorted(t for t, _ in types) == sorted(n["type"] for n in workflow["nodes"])
    assert all(known for _, known in types), types
    problems = ui.layout_problems(ui.read_layout(page))
    assert not problems, (name, "as loaded", problems)

    ui.shrink_for_cpu(page, f"ui_{name[:-5]}")
    entry = ui.run_queued(page, server)
    assert server.output_images(entry), "the run saved no image"
    problems = ui.layout_problems(ui.read_layout(page))
    shot = tmp_path / f"{name[:-5]}_{'modern' if server.modern else 'legacy'}.png"
    page.screenshot(path=str(shot))  # the default view (the workflow's own zoom), previews shown
    assert not problems, (name, "after a run", problems, f"screenshot: {shot}")
    page.close()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_template_browser_gets_a_thumbnail_for_every_workflow(comfy, name):
    """The template browser lists the pack's workflows/ and shows <name>.jpg beside <name>.json (regenerate them
    with `python -m tests.comfyui.thumbnails`)."""
    stem = name[:-5]
    assert stem in comfy.get("/workflow_templates").get(cs.PACK_MODULE, []), comfy.get("/workflow_templates")
    url = f"http://127.0.0.1:{comfy.port}/api/workflow_templates/{cs.PACK_MODULE}/{stem}.jpg"
    with urllib.request.urlopen(url, timeout=10) as r:
        data = r.read()
    assert len(data) < THUMBNAIL_MAX_BYTES, f"{stem}.jpg is {len(data)} bytes"
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == "JPEG" and min(im.size) >= 256, (im.format, im.size)


def test_layout_check_itself():
    """The rule the workflow test applies: boxes [x, y, w, h] closer than the clearance, or a node across a group's
    edge, are reported; a node wholly inside a group is not."""
    def node(i, box):
        return {"id": i, "type": "T", "box": box}
    apart = {"nodes": [node(1, [0, 0, 100, 100]), node(2, [130, 0, 100, 100])], "groups": []}
    assert ui.layout_problems(apart, clearance=20) == []
    assert len(ui.layout_problems(apart, clearance=40)) == 1
    covered = {"nodes": [node(1, [0, 0, 100, 100]), node(2, [50, 50, 100, 100])], "groups": []}
    assert "#1 T" in ui.layout_problems(covered)[0]
    grouped = {"nodes": [node(1, [10, 40, 100, 100])], "groups": [{"title": "g", "box": [0, 0, 200, 200]}]}
    assert ui.layout_problems(grouped) == []
    grouped["nodes"].append(node(2, [150, 40, 100, 100]))
    assert ui.layout_problems(grouped) == ["#2 T [150, 40, 100, 100] straddles the edge of group 'g' [0, 0, 200, 200]"]
