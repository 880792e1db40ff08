"""ComfyUI's web UI in headless Chromium: open it, load a UI-format workflow, run it, read where nodes are drawn.

Shared by test_ui.py and thumbnails.py. Works on both frontends the suite targets (the Vue frontend of ComfyUI
0.3.75 and the March-2024 litegraph UI): both expose `app`, `app.graph` and `LiteGraph` on the window.
"""
from __future__ import annotations

import itertools
import time

from PIL import Image

from tests.comfyui import comfy_server as cs

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]

# Canvas units kept free between any two boxes: the Vue frontend draws each node's source badge ("NextStep")
# just above its title bar, outside the node's bounding box.
CLEARANCE = 20

# A node's bounding box in canvas units, title bar included, as the frontend itself computes it for hit tests.
_READ_LAYOUT = """() => ({
  nodes: app.graph._nodes.map(n => ({id: n.id, type: n.type, box: Array.from(n.getBounding()).slice(0, 4)})),
  groups: (app.graph._groups || []).map(g => ({title: g.title,
                                               box: Array.from(g._bounding || [...g.pos, ...g.size]).slice(0, 4)})),
})"""


def open_ui(browser, server, width=1400, height=900):
    """A page with the UI ready and the pack's node types registered; returns (page, page errors)."""
    if server.modern:  # otherwise the template browser opens over the canvas on a fresh user directory
        server.post("/settings/Comfy.TutorialCompleted", True)
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"http://127.0.0.1:{server.port}/")
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph"
                           " && LiteGraph.registered_node_types['NextStepSampler']", timeout=60_000)
    return page, errors


def load_workflow(page, workflow: dict) -> None:
    """What dragging the file onto the canvas does; the graph's own view (`extra.ds`) is kept."""
    page.evaluate("(wf) => app.loadGraphData(wf)", workflow)
    page.wait_for_timeout(300)  # one frame or two: node sizes settle when they are first drawn


def shrink_for_cpu(page, filename_prefix: str) -> None:
    """Makes any workflow cheap to run on a CPU with the tiny models: every width/height widget 32, every steps
    widget 2 (by widget name, so new workflows need no change here), and a unique output name."""
    page.evaluate("""(prefix) => { for (const n of app.graph._nodes) for (const w of n.widgets || []) {
        if (w.name === 'width' || w.name === 'height') w.value = 32;
        else if (w.name === 'steps') w.value = 2;
        else if (w.name === 'filename_prefix') w.value = prefix;
    } }""", filename_prefix)


def run_queued(page, server, timeout=120.0) -> dict:
    """Presses Run (queue from the UI) and waits until the prompt has finished and its output images are shown;
    returns its history entry."""
    before = set(server.get("/history"))
    page.evaluate("() => app.queuePrompt(0, 1)")
    deadline = time.monotonic() + timeout
    while True:
        new = set(server.get("/history")) - before
        if new:
            entry = server.get("/history")[new.pop()]
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the queued workflow did not finish in {timeout:.0f}s\n{server.log_tail()}")
        time.sleep(0.25)
    assert entry["status"]["status_str"] == "success", (cs.messages(entry, "execution_error"), server.log_tail())
    shown = [node_id for node_id, out in entry.get("outputs", {}).items() if out.get("images")]
    page.wait_for_function("(ids) => ids.every(id => { const n = app.graph.getNodeById(Number(id));"
                           " return n && n.imgs && n.imgs.length; })", arg=shown, timeout=15_000)
    page.wait_for_timeout(300)  # a node grows for its image when it is next drawn
    return entry


def read_layout(page) -> dict:
    return page.evaluate(_READ_LAYOUT)


def _intersects(a, b, gap=0.0) -> bool:
    return (a[0] < b[0] + b[2] + gap and b[0] < a[0] + a[2] + gap
            and a[1] < b[1] + b[3] + gap and b[1] < a[1] + a[3] + gap)


def _contains(outer, inner) -> bool:
    return (outer[0] <= inner[0] and outer[1] <= inner[1]
            and inner[0] + inner[2] <= outer[0] + outer[2] and inner[1] + inner[3] <= outer[1] + outer[3])


def layout_problems(layout: dict, clearance: float = CLEARANCE) -> list[str]:
    """Every pair of nodes closer than `clearance` (notes are nodes too), every node that straddles a group's
    edge, and every two groups that overlap without one holding the other."""
    nodes = [(f"#{n['id']} {n['type']} {[round(v) for v in n['box']]}", n["box"]) for n in layout["nodes"]]
    groups = [(f"group {g['title']!r} {[round(v) for v in g['box']]}", g["box"]) for g in layout["groups"]]
    problems = [f"{a} and {b} overlap or are closer than {clearance}"
                for (a, ra), (b, rb) in itertools.combinations(nodes, 2) if _intersects(ra, rb, clearance)]
    problems += [f"{a} straddles the edge of {g}" for g, rg in groups for a, ra in nodes
                 if _intersects(ra, rg) and not _contains(rg, ra)]
    problems += [f"{a} and {b} overlap" for (a, ra), (b, rb) in itertools.combinations(groups, 2)
                 if _intersects(ra, rb) and not (_contains(ra, rb) or _contains(rb, ra))]
    return problems


def graph_extent(layout: dict) -> list[float]:
    """[x, y, w, h] around every node and group, in canvas units."""
    boxes = [n["box"] for n in layout["nodes"]] + [g["box"] for g in layout["groups"]]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return [x0, y0, x1 - x0, y1 - y0]


def show_whole_graph(page, region: list[float]) -> list[float]:
    """Zooms and scrolls the canvas so the whole graph fills the screen rectangle `region` ([x, y, w, h] in CSS
    pixels, centred); returns the graph's screen rectangle."""
    ext = graph_extent(read_layout(page))
    scale = min(region[2] / ext[2], region[3] / ext[3])
    w, h = ext[2] * scale, ext[3] * scale
    left, top = region[0] + (region[2] - w) / 2, region[1] + (region[3] - h) / 2
    page.evaluate("""([scale, ox, oy]) => { app.canvas.ds.scale = scale; app.canvas.ds.offset = [ox, oy];
                      app.canvas.setDirty(true, true); }""", [scale, left / scale - ext[0], top / scale - ext[1]])
    page.wait_for_timeout(300)
    return [left, top, w, h]


def hide_chrome(page) -> None:
    """Hides the menus, side bar, minimap and canvas statistics, so a screenshot shows the graph alone."""
    page.evaluate("""async () => {
        app.canvas.show_info = false;
        const ui = app.extensionManager;
        if (ui && ui.command) {  // Vue frontend
            await ui.setting.set('Comfy.Minimap.Visible', false);
            if (!ui.focusMode) await ui.command.execute('Workspace.ToggleFocusMode');
        }
        for (const e of document.querySelectorAll('.comfy-menu, .comfy-menu-btns')) e.style.display = 'none';
        app.canvas.setDirty(true, true);
    }""")
    page.wait_for_timeout(300)


def save_jpeg(png_path, jpg_path, size: int, quality: int = 82) -> None:
    """Scales a screenshot to fit in size x size and writes it as a JPEG (what ComfyUI's template browser shows)."""
    with Image.open(png_path) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        im.save(jpg_path, "JPEG", quality=quality, optimize=True, progressive=True)
