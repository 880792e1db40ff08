"""Does ComfyUI's own Load VAE + VAE Decode handle NextStep's tokenizer and the pack's LATENT?

The f8ch16 tokenizer uses the FLUX autoencoder's architecture and key names, so core should detect it from its
keys. The weights here are random but at the real geometry (core infers the architecture from the keys and
assumes FLUX's channel widths, so the tiny test VAE could not tell us anything).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tests.comfyui import models


@pytest.fixture(scope="module")
def full_vae(comfy):
    return models.write_full_size_vae(comfy.models_dir)


def test_core_vae_decode_matches_the_pack(comfy, full_vae):
    if not comfy.modern:
        pytest.skip("the 2024 core VAE loader assumes 4 latent channels; test_legacy.py asserts that it fails")
    folder, filename = full_vae
    assert filename in comfy.object_info("VAELoader")["input"]["required"]["vae_name"][0]
    prompt = {
        "1": {"class_type": "NextStepModelLoader", "inputs": {"model_name": models.T2I_MODEL, "weight_dtype": "fp32",
                                                              "attention": "sdpa", "download": False}},
        "2": {"class_type": "NextStepTextEncode", "inputs": {"prompt": "core vae", "positive_prompt": "",
                                                             "negative_prompt": ""}},
        "3": {"class_type": "NextStepSampler", "inputs": {
            "model": ["1", 0], "conditioning": ["2", 0], "seed": 5, "width": 32, "height": 48, "batch_size": 1,
            "cfg": 3.0, "cfg_img": 1.0, "cfg_schedule": "constant", "timesteps_shift": 1.0, "steps": 2,
            "sampler": "auto", "use_norm": True}},
        "4": {"class_type": "NextStepVAELoader", "inputs": {"vae_name": folder, "download": False}},
        "5": {"class_type": "NextStepVAEDecode", "inputs": {"latent": ["3", 0], "vae": ["4", 0]}},
        "6": {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "pack_vae"}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": filename}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "core_vae"}},
    }
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", entry["status"]
    out = {k: comfy.output_images({"outputs": {k: v}})[0] for k, v in entry["outputs"].items()}
    pack = np.asarray(Image.open(out["6"])).astype(int)
    core = np.asarray(Image.open(out["9"])).astype(int)
    assert pack.shape == core.shape == (48, 32, 3)
    # Same weights, same latents: core's decoder reproduces the pack's up to float32 round-off and 8-bit rounding.
    diff = np.abs(pack - core).max()
    print(f"core vs pack VAE decode: max |diff| = {diff}/255")
    assert diff <= 2, diff
