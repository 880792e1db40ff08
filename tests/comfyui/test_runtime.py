"""Runtime behaviour inside ComfyUI: per-token progress with previews, model management, template listing."""
from __future__ import annotations

import io
import struct

from PIL import Image

from tests.comfyui import comfy_server as cs
from tests.comfyui import workflow_api as wf


def _prompt(server, width, height, seed, prefix):
    prompt = wf.to_api(wf.load("nextstep_t2i.json"), server.object_info())
    wf.set_inputs(prompt, "NextStepSampler", width=width, height=height, seed=seed, steps=2)
    wf.set_inputs(prompt, "SaveImage", filename_prefix=prefix)
    return prompt


def test_progress_per_token_with_previews(comfy):
    prompt_id, events, frames = comfy.run_watching(_prompt(comfy, 128, 96, seed=11, prefix="progress"))
    assert not [e for e in events if e["type"] == "execution_error"], events[-3:]
    tokens = (128 // 16) * (96 // 16)  # 48
    sampler = [e["data"] for e in events if e["type"] == "progress" and e["data"]["node"] == "3"]
    assert [p["value"] for p in sampler] == list(range(1, tokens + 1))
    assert all(p["max"] == tokens for p in sampler)
    # previews: binary frames whose 4-byte event type is PREVIEW_IMAGE (1) or PREVIEW_IMAGE_WITH_METADATA (4)
    previews = [f for f in frames if struct.unpack(">I", f[:4])[0] in (1, 4)]
    assert 16 <= len(previews) <= tokens, len(previews)
    if struct.unpack(">I", previews[-1][:4])[0] == 1:  # the plain frame: type, format, JPEG
        img = Image.open(io.BytesIO(previews[-1][8:]))
        assert img.size[0] * 96 == img.size[1] * 128  # the image's aspect (the server scales it to preview_size)


def test_unload_models_then_run_again(comfy):
    assert comfy.run(_prompt(comfy, 32, 32, seed=21, prefix="before_free"))["status"]["status_str"] == "success"
    comfy.post("/free", {"unload_models": True, "free_memory": True})
    entry = comfy.run(_prompt(comfy, 32, 32, seed=22, prefix="after_free"))
    assert entry["status"]["status_str"] == "success", entry["status"]


def test_workflows_are_listed_as_templates(comfy):
    if not comfy.modern:
        return  # the 2024 server has no template route
    templates = comfy.get("/workflow_templates")
    shipped = sorted(p.stem for p in wf.WORKFLOWS.glob("*.json"))
    assert "nextstep_t2i" in shipped and "nextstep_reroll" in shipped
    assert sorted(templates.get(cs.PACK_MODULE, [])) == shipped, templates
