"""NextStep Save Model on a real ComfyUI: loader -> save writes a file that the Model Loader lists without a
restart, byte for byte what `python -m nextstep_core convert` writes, and that generates the same tokens."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.comfyui import comfy_server as cs
from tests.comfyui import models


def _loader(model_name):
    return {"class_type": "NextStepModelLoader",
            "inputs": {"model_name": model_name, "weight_dtype": "fp32", "attention": "sdpa", "download": False}}


def save_prompt(filename, dtype="int8", overwrite=False, linked=True):
    save = {"class_type": "NextStepSaveModel", "inputs": {"model_name": models.T2I_MODEL, "filename": filename,
                                                          "dtype": dtype, "overwrite": overwrite}}
    if linked:
        save["inputs"]["model"] = ["1", 0]
        return {"1": _loader(models.T2I_MODEL), "2": save}
    return {"2": save}


def latent_prompt(model_name, prefix):
    """Loader -> text encode -> sampler -> core SaveLatent: the sampler's LATENT is its tokens, unpatchified."""
    return {
        "1": _loader(model_name),
        "2": {"class_type": "NextStepTextEncode",
              "inputs": {"prompt": "a lighthouse at dusk", "positive_prompt": "", "negative_prompt": ""}},
        "3": {"class_type": "NextStepSampler", "inputs": {
            "model": ["1", 0], "conditioning": ["2", 0], "seed": 11, "width": 32, "height": 48, "batch_size": 1,
            "cfg": 3.0, "cfg_img": 1.0, "cfg_schedule": "constant", "timesteps_shift": 1.0, "steps": 3,
            "sampler": "auto", "use_norm": False}},
        "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def saved_latent(server, entry) -> torch.Tensor:
    assert entry["status"]["status_str"] == "success", (cs.messages(entry, "execution_error"), server.log_tail())
    (found,) = [f for out in entry["outputs"].values() for f in out.get("latents", [])]
    return load_file(str(server.output_dir / found["subfolder"] / found["filename"]))["latent_tensor"]


def choices(server) -> list:
    return server.object_info("NextStepModelLoader")["input"]["required"]["model_name"][0]


@pytest.fixture
def saved_files(tiny_models, leave_as_found):
    """The session's shared models/diffusion_models, left as it was found."""
    return leave_as_found(tiny_models / "diffusion_models")


def _save_and_list(server, folder, filename):
    """Saves through the node and returns the loader's list right after it. The folder's mtime is set back to what
    it was at the listing before: where mtimes tick in seconds, a save in the same second as the last listing leaves
    it unchanged, and ComfyUI's mtime-keyed file list must still not go stale."""
    assert f"{filename}.safetensors" not in choices(server)  # now listed, and cached
    stat = os.stat(folder)
    entry = server.run(save_prompt(filename))
    assert entry["status"]["status_str"] == "success", (cs.messages(entry, "execution_error"), server.log_tail())
    assert entry["outputs"]["2"]["text"] == [f"{filename}.safetensors"]
    assert sorted(p for p in os.listdir(folder) if filename in p) == [f"{filename}.safetensors"]  # no .part
    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    return choices(server)


def test_saved_model_is_listed_and_generates_as_the_converted_one(comfy, saved_files):
    assert "saved_by_node_int8.safetensors" in _save_and_list(comfy, saved_files, "saved_by_node_int8")
    cli = saved_files / "cli_int8.safetensors"
    r = subprocess.run([sys.executable, "-m", "nextstep_core", "convert", str(comfy.models_dir / "nextstep" /
                        models.T2I_MODEL), str(cli), "--dtype", "int8"], capture_output=True, text=True,
                       cwd=cs.REPO_ROOT)
    assert r.returncode == 0, r.stderr
    assert (saved_files / "saved_by_node_int8.safetensors").read_bytes() == cli.read_bytes()
    from_node = saved_latent(comfy, comfy.run(latent_prompt("saved_by_node_int8.safetensors", "from_node")))
    from_cli = saved_latent(comfy, comfy.run(latent_prompt("cli_int8.safetensors", "from_cli")))
    assert from_node.shape == (1, 16, 6, 4) and torch.equal(from_node, from_cli)


def test_an_existing_name_is_refused_and_the_server_carries_on(comfy, saved_files):
    (saved_files / "taken.safetensors").write_bytes(b"keep me")
    entry = comfy.run(save_prompt("taken", linked=False))
    (err,) = cs.messages(entry, "execution_error")
    assert err["node_type"] == "NextStepSaveModel"
    assert "taken.safetensors already exists; choose another filename, or set overwrite to true" in \
        err["exception_message"] and "Traceback" not in err["exception_message"]
    assert (saved_files / "taken.safetensors").read_bytes() == b"keep me"
    entry = comfy.run(save_prompt("taken", dtype="bf16", overwrite=True, linked=False))
    assert entry["status"]["status_str"] == "success", cs.messages(entry, "execution_error")
    assert (saved_files / "taken.safetensors").read_bytes()[:8] != b"keep me"


def test_a_bad_filename_is_refused_before_running(comfy):
    with pytest.raises(cs.RequestError) as err:
        comfy.queue(save_prompt("../outside"))
    assert err.value.status == 400 and "no '..'" in str(err.value.body)


def test_legacy_comfyui_lists_the_saved_model_without_a_restart(comfy_legacy, saved_files):
    assert "legacy_saved.safetensors" in _save_and_list(comfy_legacy, saved_files, "legacy_saved")


def test_the_node_is_an_output_node_with_tooltips(comfy):
    info = comfy.object_info("NextStepSaveModel")
    assert info["category"] == "NextStep" and info["output_node"] is True and info["description"]
    specs = {**info["input"]["required"], **info["input"]["optional"]}
    assert [n for n, spec in specs.items() if not spec[1].get("tooltip")] == []
    assert specs["dtype"][0] == ["bf16", "fp8", "int8", "int4"] and specs["overwrite"][1]["default"] is False
