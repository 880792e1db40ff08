"""Regenerates workflows/<name>.jpg, the picture ComfyUI's template browser shows beside workflows/<name>.json:
the workflow as the real UI draws it (ComfyUI 0.3.75's frontend, tiny test models, menus hidden), scaled into the
browser's square card.

    python -m tests.comfyui.thumbnails          # needs what tests/comfyui/install.sh installs (chromium, playwright)
"""
from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from tests.comfyui import comfy_server as cs
from tests.comfyui import models
from tests.comfyui import ui_page as ui
from tests.comfyui import workflow_api as wf

SIDE = 1200      # CSS pixels of the square screenshot
PAD = 30         # CSS pixels kept free around the graph inside it
THUMB = 768      # pixels of the saved JPEG's side


def example_photo(path: Path) -> None:
    """A simple drawn scene for the edit workflow's Load Image (a cat on a hill), so its thumbnail shows an input."""
    im = Image.new("RGB", (512, 512))
    draw = ImageDraw.Draw(im)
    for y in range(512):
        draw.line([(0, y), (511, y)], fill=(90 + y // 6, 150 + y // 8, 230))
    draw.ellipse([360, 50, 450, 140], fill=(255, 220, 90))
    draw.ellipse([-120, 330, 640, 760], fill=(80, 160, 70))
    draw.ellipse([170, 250, 350, 400], fill=(230, 140, 50))                      # body
    draw.ellipse([140, 170, 260, 280], fill=(230, 140, 50))                      # head
    draw.polygon([(150, 200), (160, 140), (195, 180)], fill=(230, 140, 50))      # ears
    draw.polygon([(205, 180), (240, 140), (250, 200)], fill=(230, 140, 50))
    draw.ellipse([170, 210, 185, 225], fill=(30, 30, 30))
    draw.ellipse([215, 210, 230, 225], fill=(30, 30, 30))
    im.save(path)


def main() -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="nextstep-thumbs-") as tmp:
        root = Path(tmp)
        server = cs.ComfyServer(cs.obtain_comfyui(None), root / "server", models.build_models_dir(root / "models"))
        server.start()
        try:
            example_photo(server.input_dir / "example.png")
            exe = shutil.which("chromium") or shutil.which("chromium-browser")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=exe, headless=True, args=ui.CHROMIUM_ARGS)
                for path in sorted(wf.WORKFLOWS.glob("*.json")):
                    # a larger window than the shot keeps the canvas toolbar (bottom right) out of it
                    page, _ = ui.open_ui(browser, server, width=SIDE + 240, height=SIDE + 240)
                    ui.hide_chrome(page)
                    ui.load_workflow(page, wf.load(path.name))
                    ui.show_whole_graph(page, [40 + PAD, 40 + PAD, SIDE - 2 * PAD, SIDE - 2 * PAD])
                    page.screenshot(path=str(root / "shot.png"), clip={"x": 40, "y": 40, "width": SIDE, "height": SIDE})
                    ui.save_jpeg(root / "shot.png", path.with_suffix(".jpg"), THUMB)
                    print(f"{path.with_suffix('.jpg')}: {path.with_suffix('.jpg').stat().st_size // 1024} KB")
                    page.close()
                browser.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
