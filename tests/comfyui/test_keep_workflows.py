"""Keeping part of an image in a real ComfyUI (0.3.75 and March 2024): the reroll and inpaint workflows, and the
NextStep Sampler honouring core noise_mask LATENTs (Set Latent Noise Mask, VAE Encode (for Inpainting)).

Latents are compared exactly, through core Save Latent: a kept token must come back bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.comfyui import models
from tests.comfyui import workflow_api as wf
from tests.comfyui.test_server import assert_success

W, H = 32, 48  # 2 x 3 tokens


@pytest.fixture(params=["comfy", "comfy_legacy"])
def server(request):
    return request.getfixturevalue(request.param)


def node_id(prompt: dict, class_type: str, **linked) -> str:
    """The id of the one node of a type whose inputs link to the given node ids."""
    hits = [k for k, n in prompt.items() if n["class_type"] == class_type
            and all((n["inputs"].get(name) or [None])[0] == src for name, src in linked.items())]
    assert len(hits) == 1, (class_type, linked, hits)
    return hits[0]


def save_latent(prompt: dict, source: str, prefix: str) -> None:
    prompt[f"9{len(prompt)}"] = {"class_type": "SaveLatent",
                                 "inputs": {"samples": [source, 0], "filename_prefix": f"latents/{prefix}"}}


def saved_latents(server, entry) -> dict[str, torch.Tensor]:
    """prefix -> the latent core Save Latent wrote (its 'latent_tensor')."""
    from safetensors.torch import load_file

    out = {}
    for result in entry["outputs"].values():
        for item in result.get("latents", []):
            path = server.output_dir / item.get("subfolder", "") / item["filename"]
            out[item["filename"].rsplit("_", 2)[0]] = load_file(str(path))["latent_tensor"]
    return out


def token_rows(latent: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w).permute(0, 2, 1, 3, 4)  # [B, token rows, C, 2, W/8]


def reroll_prompt(server, seeds: tuple[int, int], prefix: str) -> tuple[dict, str, str]:
    prompt = wf.to_api(wf.load("nextstep_reroll.json"), server.object_info())
    wf.set_inputs(prompt, "NextStepSampler", width=W, height=H, steps=2)
    wf.set_inputs(prompt, "NextStepKeepRows", rows=1)
    first = next(k for k, n in prompt.items() if n["class_type"] == "NextStepSampler" and "latent" not in n["inputs"])
    second = node_id(prompt, "NextStepSampler", latent=node_id(prompt, "NextStepKeepRows", latent=first))
    prompt[first]["inputs"]["seed"], prompt[second]["inputs"]["seed"] = seeds
    for k, n in prompt.items():
        if n["class_type"] == "SaveImage":
            n["inputs"]["filename_prefix"] = f"{prefix}_{n['inputs']['filename_prefix']}"
    save_latent(prompt, first, f"{prefix}_first")
    save_latent(prompt, second, f"{prefix}_second")
    return prompt, first, second


def test_keep_inputs_are_registered_with_tooltips_that_state_raster_order(server):
    keep_rows = server.object_info("NextStepKeepRows")
    assert keep_rows["category"] == "NextStep" and "above it and to its left" in keep_rows["description"]
    assert keep_rows["input"]["required"]["rows"][1]["tooltip"]
    latent = server.object_info("NextStepSampler")["input"]["optional"]["latent"]
    assert latent[0] == "LATENT" and "above it and to its left" in latent[1]["tooltip"]


def test_reroll_workflow_keeps_the_top_rows_and_rerolls_the_rest(server):
    tag = "modern" if server.modern else "legacy"
    entry = server.run(reroll_prompt(server, (5, 6), f"reroll_{tag}")[0])
    images = assert_success(server, entry)
    assert [i.shape for i in images] == [(H, W, 3)] * 2  # the original and the reroll, side by side
    lat = saved_latents(server, entry)
    first, second = lat[f"reroll_{tag}_first"], lat[f"reroll_{tag}_second"]
    assert torch.equal(token_rows(second)[:, :1], token_rows(first)[:, :1])
    assert not torch.equal(token_rows(second)[:, 1:], token_rows(first)[:, 1:])

    same = server.run(reroll_prompt(server, (5, 5), f"same_{tag}")[0])  # the same seed: the same image again
    a, b = assert_success(server, same)
    assert np.array_equal(a, b)


def _rgba_with_hole(path, hole) -> None:
    """A picture whose transparent pixels (Load Image's MASK = 1 - alpha) mark what to regenerate."""
    rgba = np.random.default_rng(0).integers(0, 255, (H, W, 4), dtype=np.uint8)
    rgba[..., 3] = 255
    rgba[hole] = 0
    Image.fromarray(rgba, "RGBA").save(path)


def test_inpaint_workflow_regenerates_only_the_masked_token(server):
    tag = "modern" if server.modern else "legacy"
    _rgba_with_hole(server.input_dir / f"hole_{tag}.png", np.s_[16:32, 16:32])  # the middle row's right token
    prompt = wf.to_api(wf.load("nextstep_inpaint.json"), server.object_info())
    wf.set_inputs(prompt, "LoadImage", image=f"hole_{tag}.png")
    wf.set_inputs(prompt, "ImageScale", width=W, height=H)
    wf.set_inputs(prompt, "NextStepSampler", width=W, height=H, steps=2)
    wf.set_inputs(prompt, "SaveImage", filename_prefix=f"inpaint_{tag}")
    save_latent(prompt, node_id(prompt, "NextStepVAEEncode"), f"inpaint_{tag}_in")
    save_latent(prompt, node_id(prompt, "NextStepSampler"), f"inpaint_{tag}_out")
    entry = server.run(prompt)
    assert assert_success(server, entry)[0].shape == (H, W, 3)
    lat = saved_latents(server, entry)
    given, out = lat[f"inpaint_{tag}_in"], lat[f"inpaint_{tag}_out"]
    changed = (out != given)[0].any(0).reshape(3, 2, 2, 2).any(3).any(1)  # [token rows, token columns]
    assert changed.tolist() == [[False, False], [False, True], [False, False]]


def test_vae_encode_for_inpainting_latent(comfy):
    """Core VAE Encode (for Inpainting) greys the masked pixels, grows the mask by 6 pixels and returns the mask at
    pixel resolution; the sampler reads it as KSampler would (bilinear to the latent grid)."""
    if not comfy.modern:
        pytest.skip("the 2024 core VAE loader cannot load the f8ch16 tokenizer (test_legacy.py)")
    _folder, filename = models.write_full_size_vae(comfy.models_dir)
    _rgba_with_hole(comfy.input_dir / "hole_core.png", np.s_[32:48, 16:32])  # the bottom row's right token
    prompt = {
        "1": {"class_type": "NextStepModelLoader", "inputs": {"model_name": models.T2I_MODEL, "weight_dtype": "fp32",
                                                              "attention": "sdpa", "download": False}},
        "2": {"class_type": "NextStepTextEncode", "inputs": {"prompt": "inpaint", "positive_prompt": "",
                                                             "negative_prompt": ""}},
        "3": {"class_type": "LoadImage", "inputs": {"image": "hole_core.png"}},
        "4": {"class_type": "VAELoader", "inputs": {"vae_name": filename}},
        "5": {"class_type": "VAEEncodeForInpaint", "inputs": {"pixels": ["3", 0], "vae": ["4", 0], "mask": ["3", 1],
                                                              "grow_mask_by": 6}},
        "6": {"class_type": "NextStepSampler", "inputs": {
            "model": ["1", 0], "conditioning": ["2", 0], "seed": 5, "width": W, "height": H, "batch_size": 1,
            "cfg": 3.0, "cfg_img": 1.0, "cfg_schedule": "constant", "timesteps_shift": 1.0, "steps": 2,
            "sampler": "auto", "use_norm": True, "latent": ["5", 0]}},
    }
    save_latent(prompt, "5", "core_inpaint_in")
    save_latent(prompt, "6", "core_inpaint_out")
    entry = comfy.run(prompt)
    assert_success(comfy, entry)
    lat = saved_latents(comfy, entry)
    given, out = lat["core_inpaint_in"], lat["core_inpaint_out"]
    changed = (out != given)[0].any(0).reshape(3, 2, 2, 2).any(3).any(1)
    # the grown mask reaches 6 pixels into the neighbours, between KSampler's sample points: only the hole changes
    assert changed.tolist() == [[False, False], [False, False], [False, True]]
