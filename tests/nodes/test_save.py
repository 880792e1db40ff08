"""NextStep Save Model: the engine's converter behind a node (see conftest.py for the ComfyUI stand-ins)."""
from __future__ import annotations

import os

import pytest

from nextstep_core.weights.convert import convert
from nextstep_core.weights.st_io import TensorReader


def node(pack, name="NextStepSaveModel"):
    return pack[0].NODE_CLASS_MAPPINGS[name]()


@pytest.fixture
def out_dir(models_dir, leave_as_found):
    """models/diffusion_models, shared by the session: emptied again after the test."""
    return leave_as_found(models_dir / "diffusion_models")


def test_it_writes_what_convert_writes_and_the_loader_lists_it(pack, models_dir, out_dir, tmp_path):
    out = node(pack).save("NextStep-1.1", "tiny_int8", "int8", False)
    assert out == {"ui": {"text": ["tiny_int8.safetensors"]}, "result": ("tiny_int8.safetensors",)}
    cli = convert(str(models_dir / "nextstep" / "NextStep-1.1"), str(tmp_path / "cli.safetensors"), "int8")
    assert (out_dir / "tiny_int8.safetensors").read_bytes() == open(cli, "rb").read()
    assert os.listdir(out_dir) == ["tiny_int8.safetensors"]  # no temporary file left
    loader = pack[0].NODE_CLASS_MAPPINGS["NextStepModelLoader"]
    assert "tiny_int8.safetensors" in loader.INPUT_TYPES()["required"]["model_name"][0]
    n = len(TensorReader(cli).entries) - sum(k.endswith(".weight_scale") for k in TensorReader(cli).entries)
    assert [p[:2] for p in pack[1].progress] == [(i, n) for i in range(1, n + 1)]  # ComfyUI's bar, per tensor


def test_a_loaded_model_is_converted_from_the_files_it_came_from(pack, models_dir, out_dir, tmp_path):
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "int8", "sdpa", False)[0]
    name = node(pack).save("no-such-model", "sub/from_loaded", "bf16", False, model=model)["result"][0]
    assert name == "sub/from_loaded.safetensors"
    cli = convert(str(models_dir / "nextstep" / "NextStep-1.1"), str(tmp_path / "cli.safetensors"), "bf16")
    assert (out_dir / "sub" / "from_loaded.safetensors").read_bytes() == open(cli, "rb").read()
    loader = node(pack, "NextStepModelLoader")
    assert loader.load(name, "auto", "sdpa", False)[0].module.quant is None


def test_an_existing_name_is_refused_before_any_work_unless_overwrite(pack, out_dir, monkeypatch):
    err = pack[0].nodes.common.NextStepNodeError
    (out_dir / "taken.safetensors").write_bytes(b"someone's file")
    with monkeypatch.context() as m:
        m.setattr(TensorReader, "get", lambda self, key: pytest.fail("a weight was read"))
        with pytest.raises(err, match=r"^NextStep Save Model: .*taken.safetensors already exists; choose another "
                                      "filename, or set overwrite to true"):
            node(pack).save("NextStep-1.1", "taken", "int8", False)
    assert (out_dir / "taken.safetensors").read_bytes() == b"someone's file"
    node(pack).save("NextStep-1.1", "taken.safetensors", "int8", True)
    assert TensorReader(str(out_dir / "taken.safetensors")).metadata["nextstep_quant"] == "int8"


def test_refusals_come_before_any_work(pack, models_dir, out_dir, monkeypatch):
    err = pack[0].nodes.common.NextStepNodeError
    fp8 = convert(str(models_dir / "nextstep" / "NextStep-1.1"), str(out_dir / "tiny_fp8.safetensors"), "fp8")
    monkeypatch.setattr(TensorReader, "get", lambda self, key: pytest.fail("a weight was read"))
    with pytest.raises(err, match="already quantised as fp8, so it cannot become int8: convert from the original"):
        node(pack).save("tiny_fp8.safetensors", "again", "int8", False)
    with pytest.raises(err, match="is the source file .*tiny_fp8.safetensors: converting would overwrite"):
        node(pack).save("tiny_fp8.safetensors", "tiny_fp8", "bf16", True)
    import shutil

    from nextstep_core.weights import convert as engine

    real = shutil.disk_usage
    monkeypatch.setattr(engine.shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(err, match="needs .* GiB but .* has only 0.00 GiB free; free some space or choose another disk"):
        node(pack).save("NextStep-1.1", "big", "bf16", False)
    with pytest.raises(err, match="NextStep-1-Large is not downloaded"):
        node(pack).save("NextStep-1-Large", "x", "bf16", False)
    assert sorted(os.listdir(out_dir)) == ["tiny_fp8.safetensors"] and open(fp8, "rb").read(8)


def test_interrupt_stops_it_without_a_partial_file(pack, out_dir):
    import comfy.model_management as mm

    pack[1].interrupt_after = 3
    with pytest.raises(mm.InterruptProcessingException):
        node(pack).save("NextStep-1.1", "stopped", "int4", False)
    assert len(pack[1].progress) == 3 and os.listdir(out_dir) == []


@pytest.mark.parametrize("name,problem", [("", "must be a file name"), ("../escape", "no '..'"),
                                          ("/abs/x", "no absolute path"), ("c:x", "no absolute path"),
                                          ("a//b", "must be a file name")])
def test_file_names_stay_inside_the_folder(pack, name, problem):
    cls = pack[0].NODE_CLASS_MAPPINGS["NextStepSaveModel"]
    assert problem in cls.VALIDATE_INPUTS(filename=name)
    with pytest.raises(pack[0].nodes.common.NextStepNodeError, match=problem):  # a linked name skips validation
        node(pack).save("NextStep-1.1", name, "bf16", False)
    assert cls.VALIDATE_INPUTS(filename="sub/name.v1.1") is True
    assert pack[0].nodes.save.file_name("sub\\name.v1.1") == "sub/name.v1.1.safetensors"


def test_the_file_goes_to_the_diffusion_models_folder_nearest_the_source(pack, tmp_path, monkeypatch):
    import folder_paths

    comfy = tmp_path / "ComfyUI" / "models"
    for d in ("unet", "diffusion_models", "nextstep"):
        (comfy / d).mkdir(parents=True)
    elsewhere = tmp_path / "big_disk" / "models"
    (elsewhere / "diffusion_models").mkdir(parents=True)
    paths = [str(comfy / "unet"), str(comfy / "diffusion_models"), str(elsewhere / "diffusion_models")]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "diffusion_models", (paths, {".safetensors"}))
    save_folder = pack[0].nodes.save.save_folder
    assert save_folder(str(comfy / "nextstep" / "NextStep-1.1")) == str(comfy / "diffusion_models")  # not unet
    assert save_folder(str(elsewhere / "nextstep" / "NextStep-1.1")) == str(elsewhere / "diffusion_models")
    assert save_folder(str(elsewhere / "diffusion_models" / "a.safetensors")) == str(elsewhere / "diffusion_models")
