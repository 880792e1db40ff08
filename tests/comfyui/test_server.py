"""The pack inside a real ComfyUI server: registration, the shipped workflows, errors and interrupts."""
from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from tests.comfyui import comfy_server as cs
from tests.comfyui import models
from tests.comfyui import workflow_api as wf

NODES = ["NextStepModelLoader", "NextStepVAELoader", "NextStepTextEncode", "NextStepEditEncode",
         "NextStepSampler", "NextStepVAEDecode", "NextStepVAEEncode"]


def t2i_prompt(server, width=32, height=48, seed=1, steps=2, prefix="t2i", **sampler):
    prompt = wf.to_api(wf.load("nextstep_t2i.json"), server.object_info())
    wf.set_inputs(prompt, "NextStepSampler", width=width, height=height, seed=seed, steps=steps, **sampler)
    wf.set_inputs(prompt, "SaveImage", filename_prefix=prefix)
    return prompt


def assert_success(server, entry):
    status = entry["status"]
    assert status["status_str"] == "success", (cs.messages(entry, "execution_error"), server.log_tail())
    return [np.asarray(Image.open(p)) for p in server.output_images(entry)]


def run_error(server, prompt) -> dict:
    entry = server.run(prompt)
    errors = cs.messages(entry, "execution_error")
    assert entry["status"]["status_str"] == "error" and errors, entry["status"]
    return errors[0]


def test_pack_imports_without_errors(comfy):
    log = comfy.log_path.read_text(errors="replace")
    assert "IMPORT FAILED" not in log or cs.PACK_MODULE not in log.split("IMPORT FAILED")[1][:300], log[-3000:]
    assert f"Cannot import {comfy.workdir}" not in log
    info = comfy.object_info()
    missing = [n for n in NODES if n not in info]
    assert not missing, f"not registered: {missing}"


@pytest.mark.parametrize("node", NODES)
def test_object_info(comfy, node):
    info = comfy.object_info(node)
    assert info["category"] == "NextStep"
    assert info["description"]
    specs = {**info["input"]["required"], **info["input"].get("optional", {})}
    for name, spec in specs.items():
        assert spec[1].get("tooltip"), f"{node}.{name} has no tooltip"
    if "output_tooltips" in info:  # ComfyUI >= late 2024 serves them
        assert all(info["output_tooltips"]), info["output_tooltips"]


def test_node_inputs(comfy):
    sampler = comfy.object_info("NextStepSampler")["input"]["required"]
    assert sampler["seed"][1]["control_after_generate"] is True
    assert sampler["width"][1]["step"] == 16 and sampler["height"][1]["step"] == 16
    for name in ("cfg", "cfg_img", "cfg_schedule", "timesteps_shift", "steps", "sampler", "use_norm", "batch_size"):
        assert name in sampler
    choices = comfy.object_info("NextStepModelLoader")["input"]["required"]["model_name"][0]
    assert {models.T2I_MODEL, models.EDIT_MODEL, models.SINGLE_FILE} <= set(choices)
    assert "NextStep-1.1/vae" not in choices  # a VAE folder is not offered as a model
    vaes = comfy.object_info("NextStepVAELoader")["input"]["required"]["vae_name"][0]
    assert f"{models.T2I_MODEL}/vae" in vaes and models.T2I_MODEL not in vaes


def test_t2i_workflow(comfy):
    images = assert_success(comfy, comfy.run(t2i_prompt(comfy, width=32, height=48, prefix="t2i_size")))
    assert len(images) == 1 and images[0].shape == (48, 32, 3)
    assert images[0].std() > 0  # not a blank image


@pytest.mark.parametrize("filename", [models.SINGLE_FILE, models.SINGLE_FILE_FP8])
def test_single_file_model_and_batch(comfy, filename):
    prompt = t2i_prompt(comfy, width=16, height=32, batch_size=2, prefix="single_file")
    wf.set_inputs(prompt, "NextStepModelLoader", model_name=filename)
    images = assert_success(comfy, comfy.run(prompt))
    assert [i.shape for i in images] == [(32, 16, 3)] * 2


def test_edit_workflow(comfy):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(comfy.input_dir / "example.png")
    prompt = wf.to_api(wf.load("nextstep_edit.json"), comfy.object_info())
    wf.set_inputs(prompt, "ImageScale", width=32, height=32)
    wf.set_inputs(prompt, "NextStepSampler", width=32, height=32, steps=2)
    wf.set_inputs(prompt, "SaveImage", filename_prefix="edit")
    images = assert_success(comfy, comfy.run(prompt))
    assert images[0].shape == (32, 32, 3)


@pytest.mark.parametrize("node,inputs,expected", [
    ("NextStepSampler", {"width": 40}, "multiple of 16"),
    ("NextStepSampler", {"height": 8}, "multiple of 16"),
    ("NextStepModelLoader", {"attention": "flash-attn"}, "flash_attn"),
    ("NextStepModelLoader", {"model_name": "no-such-model"}, "no-such-model"),
])
def test_bad_widget_values_are_rejected_before_running(comfy, node, inputs, expected):
    prompt = t2i_prompt(comfy)
    wf.set_inputs(prompt, node, **inputs)
    with pytest.raises(cs.RequestError) as err:
        comfy.queue(prompt)
    assert err.value.status == 400
    assert expected in str(err.value.body), err.value.body


def test_missing_published_model_says_where_to_put_it(comfy):
    prompt = t2i_prompt(comfy, prefix="missing")
    wf.set_inputs(prompt, "NextStepModelLoader", model_name="NextStep-1-Large", download=False)
    err = run_error(comfy, prompt)
    assert err["node_type"] == "NextStepModelLoader"
    assert "huggingface.co/stepfun-ai/NextStep-1-Large" in err["exception_message"]
    assert "download" in err["exception_message"]


def test_download_offline_is_a_clear_error(comfy):
    prompt = t2i_prompt(comfy, prefix="offline")
    wf.set_inputs(prompt, "NextStepModelLoader", model_name="NextStep-1-Large", download=True)
    err = run_error(comfy, prompt)
    assert "Cannot download https://huggingface.co/stepfun-ai/NextStep-1-Large" in err["exception_message"]


def test_foreign_latent_is_a_clear_error(comfy):
    prompt = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "NextStepVAELoader", "inputs": {"vae_name": f"{models.T2I_MODEL}/vae", "download": False}},
        "3": {"class_type": "NextStepVAEDecode", "inputs": {"latent": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "foreign"}},
    }
    err = run_error(comfy, prompt)
    assert err["node_type"] == "NextStepVAEDecode" and "4 channels" in err["exception_message"]
    comfy.get("/system_stats")  # still up


def test_interrupt_then_rerun_matches_fresh_run(comfy):
    small = t2i_prompt(comfy, width=32, height=32, seed=7, prefix="fresh")
    fresh = assert_success(comfy, comfy.run(small))[0]

    long = t2i_prompt(comfy, width=512, height=512, seed=8, steps=50, prefix="long")
    prompt_id = comfy.queue(long)
    started = time.monotonic()
    while not comfy.get("/queue")["queue_running"]:
        time.sleep(0.05)
    time.sleep(1.0)  # into the token loop (the tiny model loads in milliseconds)
    comfy.interrupt()
    entry = comfy.wait(prompt_id)
    assert cs.messages(entry, "execution_interrupted"), entry["status"]
    assert time.monotonic() - started < 60, "interrupt was not honoured promptly"
    assert not comfy.output_images(entry)

    small["9"] = {"class_type": "SaveImage", "inputs": {"images": ["5", 0], "filename_prefix": "again"}}
    again_entry = comfy.run(small)
    cached = [n for m in cs.messages(again_entry, "execution_cached") for n in m.get("nodes", [])]
    assert "3" not in cached, "the sampler did not run again"
    again = assert_success(comfy, again_entry)
    assert all(np.array_equal(fresh, img) for img in again), "a run after an interrupt differs from a fresh run"


def test_a_wrong_kind_of_value_is_rejected_before_running(comfy):
    """Wiring a core LATENT where the sampler wants NextStep conditioning fails validation (400), nothing runs."""
    prompt = t2i_prompt(comfy, prefix="mistyped")
    sampler = next(k for k, n in prompt.items() if n["class_type"] == "NextStepSampler")
    prompt["900"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    prompt[sampler]["inputs"]["conditioning"] = ["900", 0]
    with pytest.raises(cs.RequestError) as err:
        comfy.queue(prompt)
    assert err.value.status == 400
    assert "return_type_mismatch" in str(err.value.body), err.value.body


def test_bad_values_are_one_node_error_and_the_next_prompt_runs(comfy):
    """What the command line refuses (a NaN guidance, an edit image of the wrong size) is one clear node error here."""
    nan_cfg = t2i_prompt(comfy, prefix="nan_cfg", cfg=float("nan"))  # NaN passes ComfyUI's own min/max check
    err = run_error(comfy, nan_cfg)
    assert err["node_type"] == "NextStepSampler" and "cfg must be a finite number" in err["exception_message"]
    assert "Traceback" not in err["exception_message"]

    Image.new("RGB", (40, 40), (9, 9, 9)).save(comfy.input_dir / "example.png")
    edit = wf.to_api(wf.load("nextstep_edit.json"), comfy.object_info())
    wf.set_inputs(edit, "ImageScale", width=40, height=40)
    wf.set_inputs(edit, "NextStepSampler", width=32, height=32, steps=2)
    err = run_error(comfy, edit)
    assert err["node_type"] == "NextStepEditEncode" and "multiples of 16" in err["exception_message"]

    images = assert_success(comfy, comfy.run(t2i_prompt(comfy, prefix="after_errors")))
    assert images[0].std() > 0
