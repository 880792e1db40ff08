"""Variation strength in a real ComfyUI (0.3.75 and March 2024): the variations workflow (Load Image -> NextStep VAE
Encode -> NextStep Sampler with denoise) returns the encoded image itself at denoise 0, the sampler's fresh image at
denoise 1, and something in between at 0.5. Latents are compared exactly, through core Save Latent."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfyui import workflow_api as wf
from tests.comfyui.test_keep_workflows import node_id, save_latent, saved_latents
from tests.comfyui.test_server import assert_success

W, H = 32, 48  # 2 x 3 tokens


@pytest.fixture(params=["comfy", "comfy_legacy"])
def server(request):
    return request.getfixturevalue(request.param)


def variation(server, denoise: float, tag: str, run: str, latent: bool = True) -> dict:
    """The variations workflow at `denoise` on photo_<tag>.png; `latent=False` unplugs the latent (a fresh image)."""
    prompt = wf.to_api(wf.load("nextstep_variations.json"), server.object_info())
    wf.set_inputs(prompt, "LoadImage", image=f"photo_{tag}.png")
    wf.set_inputs(prompt, "ImageScale", width=W, height=H)
    wf.set_inputs(prompt, "NextStepSampler", width=W, height=H, steps=3, seed=11, denoise=denoise)
    tag = f"{tag}_{run}"
    wf.set_inputs(prompt, "SaveImage", filename_prefix=f"variation_{tag}")
    sampler = node_id(prompt, "NextStepSampler")
    if not latent:
        del prompt[sampler]["inputs"]["latent"]
    save_latent(prompt, node_id(prompt, "NextStepVAEEncode"), f"var_{tag}_in")
    save_latent(prompt, sampler, f"var_{tag}_out")
    entry = server.run(prompt)
    assert assert_success(server, entry)[0].shape == (H, W, 3)
    lat = saved_latents(server, entry)
    return {"in": lat[f"var_{tag}_in"], "out": lat[f"var_{tag}_out"]}


def test_the_sampler_offers_denoise_from_zero_to_one_defaulting_to_one(server):
    spec = server.object_info("NextStepSampler")["input"]["optional"]["denoise"]
    assert spec[0] == "FLOAT" and (spec[1]["min"], spec[1]["max"], spec[1]["default"]) == (0.0, 1.0, 1.0)
    assert "Variation strength" in spec[1]["tooltip"]


def test_variations_workflow_zero_keeps_one_regenerates_and_half_is_between(server):
    tag = "modern" if server.modern else "legacy"
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(server.input_dir / f"photo_{tag}.png")
    zero = variation(server, 0.0, tag, "0")
    assert torch.equal(zero["out"], zero["in"])  # the encoded image itself
    one = variation(server, 1.0, tag, "1")
    fresh = variation(server, 1.0, tag, "fresh", latent=False)
    assert torch.equal(one["out"], fresh["out"])  # denoise 1: the fresh image of the same seed
    half = variation(server, 0.5, tag, "half")
    d_half, d_one = (float((r["out"] - zero["in"]).norm()) for r in (half, one))
    assert 0 < d_half < d_one
