"""The Model Loader's family input, downloads through the engine's download module, display names and size limits
from one place (see conftest.py for the ComfyUI stand-ins). Nothing is downloaded: snapshot_download is replaced."""
from __future__ import annotations

import logging
import os
import shutil

import huggingface_hub
import pytest


def node(pack, name):
    return pack[0].NODE_CLASS_MAPPINGS[name]()


def test_family_is_the_last_input_optional_and_auto_by_default(pack):
    types = pack[0].NODE_CLASS_MAPPINGS["NextStepModelLoader"].INPUT_TYPES()
    assert list(types["optional"]) == ["family"]  # after every required input: old workflows still run
    choices, opts = types["optional"]["family"]
    assert choices == ["auto", "nextstep-1", "nextstep-1.1"] and opts["default"] == "auto"
    assert "auto" in opts["tooltip"] and "log" in opts["tooltip"]


def test_family_input_overrides_and_auto_is_logged_once(pack, caplog):
    loader = node(pack, "NextStepModelLoader")
    with caplog.at_level(logging.INFO, logger="nextstep"):
        model = loader.load("NextStep-1.1", "fp32", "sdpa", False)[0]
    assert model.config.family == "nextstep-1.1"
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if "family:" in r.getMessage()] == [
        "family: nextstep-1.1 (from nextstep_family in config.json)"]
    assert loader.load("NextStep-1.1", "fp32", "sdpa", False, family="nextstep-1")[0].config.family == "nextstep-1"


@pytest.fixture
def hub(monkeypatch, tiny_dir, tmp_path):
    """Downloads land in an empty models/nextstep of their own; snapshot_download copies the tiny checkpoint with
    an official-style config (no family key), or just its vae/ for a subfolder download."""
    import folder_paths

    from nextstep_core.weights.testing import write_official_config

    folder_paths.folder_names_and_paths["nextstep"][0].insert(0, str(tmp_path / "nextstep"))
    calls = []

    def snapshot_download(repo_id, local_dir, allow_patterns):
        calls.append((repo_id, local_dir, allow_patterns))
        if all(p.startswith("vae/") for p in allow_patterns):
            shutil.copytree(os.path.join(tiny_dir, "vae"), os.path.join(local_dir, "vae"))
        else:
            shutil.copytree(tiny_dir, local_dir)
            write_official_config(local_dir)
        return local_dir

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, tmp_path / "nextstep"


def test_download_goes_through_the_engine_and_records_the_repo(pack, hub):
    calls, base = hub
    model = node(pack, "NextStepModelLoader").load("NextStep-1-Large", "fp32", "sdpa", True)[0]
    dest = str(base / "NextStep-1-Large")
    assert calls == [("stepfun-ai/NextStep-1-Large", dest, ["*.json", "*.safetensors", "*.txt", "vae/*.json",
                                                             "vae/*.pt", "vae/*.safetensors"])]
    assert model.config.family == "nextstep-1" and model.path == dest
    assert model.config.family_reason == ("from the Hugging Face repo it was downloaded from "
                                          "'stepfun-ai/NextStep-1-Large'")
    vae = node(pack, "NextStepVAELoader").load("NextStep-1-Large-Edit/vae", True)[0]
    assert calls[-1] == ("stepfun-ai/NextStep-1-Large-Edit", str(base / "NextStep-1-Large-Edit"),
                         ["vae/*.json", "vae/*.pt", "vae/*.safetensors"])
    assert vae.path == str(base / "NextStep-1-Large-Edit" / "vae")


def test_a_vae_file_in_the_model_slot_is_named_as_such(pack, models_dir, tiny_dir):
    from nextstep_core.weights.convert import convert

    f = models_dir / "diffusion_models" / "ae.safetensors"
    convert(os.path.join(tiny_dir, "vae"), str(f))
    try:
        with pytest.raises(pack[0].nodes.common.NextStepNodeError,
                           match=r"^NextStep Model Loader: .*ae.safetensors is a VAE \(the f8ch16 tokenizer\), not"):
            node(pack, "NextStepModelLoader").load("ae.safetensors", "fp32", "sdpa", False)
    finally:
        os.remove(f)


def test_display_names_come_from_each_class_title(pack):
    names = pack[0].NODE_DISPLAY_NAME_MAPPINGS
    for key, cls in pack[0].NODE_CLASS_MAPPINGS.items():
        assert names[key] == cls.TITLE and cls.TITLE.startswith("NextStep ")
    err = pack[0].nodes.common.NextStepNodeError
    with pytest.raises(err, match="^NextStep VAE Loader: "):  # user_errors names the node by the same attribute
        node(pack, "NextStepVAELoader").load("no-such-vae", False)


def test_sizes_use_the_engine_limits(pack):
    from nextstep_core.generation.settings import MAX_SIDE, TOKEN_PIXELS

    width = pack[0].NODE_CLASS_MAPPINGS["NextStepSampler"].INPUT_TYPES()["required"]["width"][1]
    assert (width["min"], width["max"], width["step"]) == (TOKEN_PIXELS, MAX_SIDE, TOKEN_PIXELS)
    check = pack[0].nodes.common.check_size
    assert check("width", MAX_SIDE) is None and str(MAX_SIDE) in check("width", MAX_SIDE + TOKEN_PIXELS)


@pytest.mark.parametrize("native_bf16", [False, True], ids=["avx2-like cpu", "avx512-bf16 cpu"])
def test_auto_weight_dtype_on_the_cpu_is_the_engines_rule(pack, monkeypatch, native_bf16):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    glue = pack[0].nodes.comfy_glue
    assert glue.default_weight_dtype(torch.device("cpu")) == (torch.bfloat16 if native_bf16 else torch.float32)
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "auto", "sdpa", False)[0]
    assert model.module.image_head.net.input_proj.weight.dtype == (torch.bfloat16 if native_bf16 else torch.float32)
    # CUDA still asks ComfyUI (the stand-in says no bf16), whatever the CPU has
    assert glue.default_weight_dtype(torch.device("cuda")) == torch.float32


@pytest.mark.parametrize("where", ["patcher", "model"])  # March 2024 ComfyUI / since: where model_lowvram lives
def test_a_quantised_model_comfyui_could_only_load_in_part_is_refused_with_the_sizes_that_fit(pack, where):
    glue = pack[0].nodes.comfy_glue
    mm = glue.mm
    loader = node(pack, "NextStepModelLoader")
    model = loader.load("NextStep-1.1", "int8", "sdpa", False)[0]
    assert model.module.quant == "int8"
    glue.load_to_device(model)  # loaded whole: fine

    def partial_load(models, memory_required=0):
        target = models[0] if where == "patcher" else models[0].model
        target.model_lowvram = True

    mm.load_models_gpu = partial_load
    with pytest.raises(glue.NextStepError, match="low-VRAM mode.*cannot run quantised.*int4 \\(about 9 GB\\) fits a 12 GB"):
        glue.load_to_device(model)
    plain = loader.load("NextStep-1.1", "fp32", "sdpa", False)[0]
    glue.load_to_device(plain)  # a bf16 / fp32 model streams through ComfyUI's cast layers as any model does


def test_comfyui_plans_vram_without_the_table_that_stays_on_the_host(pack):
    glue = pack[0].nodes.comfy_glue
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    table = glue.mm.module_size(model.module.embed_tokens)
    assert table > 0 and model.patcher.size == glue.mm.module_size(model.module) - table
