"""Node classes against ComfyUI stand-ins: registration, validation, conversions, glue (see conftest.py)."""
from __future__ import annotations

import json

import pytest
import torch


def node(pack, name):
    return pack[0].NODE_CLASS_MAPPINGS[name]()


def test_registration_metadata(pack):
    mappings = pack[0].NODE_CLASS_MAPPINGS
    assert set(mappings) == {"NextStepModelLoader", "NextStepVAELoader", "NextStepTextEncode", "NextStepEditEncode",
                             "NextStepSampler", "NextStepVAEDecode", "NextStepVAEEncode", "NextStepKeepRows",
                             "NextStepSaveModel"}
    assert set(pack[0].NODE_DISPLAY_NAME_MAPPINGS) == set(mappings)
    for cls in mappings.values():
        assert cls.CATEGORY == "NextStep" and cls.DESCRIPTION
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES)
        assert callable(getattr(cls(), cls.FUNCTION))
        for name, spec in cls.INPUT_TYPES()["required"].items():
            assert spec[1].get("tooltip"), f"{cls.__name__}.{name}"


def test_model_and_vae_lists(pack, models_dir):
    (models_dir / "nextstep" / "stray").mkdir(exist_ok=True)  # no config.json: not offered
    loaders = pack[0].nodes.loaders
    models = loaders.NextStepModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    vaes = loaders.NextStepVAELoader.INPUT_TYPES()["required"]["vae_name"][0]
    assert "NextStep-1.1" in models and "NextStep-1-Large-Edit" in models  # local + published (downloadable)
    assert "NextStep-1.1/vae" not in models and "stray" not in models
    assert "NextStep-1.1/vae" in vaes and "NextStep-1-f8ch16-Tokenizer" in vaes and "NextStep-1.1" not in vaes


def test_extra_model_paths_are_searched(pack, tmp_path):
    import folder_paths

    from nextstep_core.weights import testing

    testing.write_vae(str(tmp_path / "elsewhere" / "my-vae"))
    folder_paths.add_model_folder_path("nextstep", str(tmp_path / "elsewhere"))
    files = pack[0].nodes.files
    assert "my-vae" in files.vae_choices()
    assert files.resolve("my-vae", "vae", download=False) == str(tmp_path / "elsewhere" / "my-vae")


def test_missing_published_model_names_the_url_and_folder(pack, models_dir):
    files = pack[0].nodes.files
    with pytest.raises(FileNotFoundError) as e:
        files.resolve("NextStep-1-Large", "model", download=False)
    msg = str(e.value)
    assert "https://huggingface.co/stepfun-ai/NextStep-1-Large" in msg and str(models_dir / "nextstep") in msg
    with pytest.raises(FileNotFoundError, match="not found"):
        files.resolve("nothing-like-this", "model", download=False)


def test_download_offline_is_refused_clearly(pack, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loader = node(pack, "NextStepModelLoader")
    err = pack[0].nodes.common.NextStepNodeError
    with pytest.raises(err, match="Cannot download https://huggingface.co/stepfun-ai/NextStep-1-Large: HF_HUB_OFFLINE"):
        loader.load("NextStep-1-Large", "auto", "sdpa", True)


def test_validate_inputs(pack):
    sampler = pack[0].NODE_CLASS_MAPPINGS["NextStepSampler"]
    assert sampler.VALIDATE_INPUTS(width=512, height=768) is True
    assert sampler.VALIDATE_INPUTS(width=None, height=None) is True  # linked sizes: checked at run time
    assert "multiple of 16" in sampler.VALIDATE_INPUTS(width=520, height=512)
    assert "multiple of 16" in sampler.VALIDATE_INPUTS(width=512, height=0)
    assert "multiple of 16" in sampler.VALIDATE_INPUTS(width=512, height=8192)
    loader = pack[0].NODE_CLASS_MAPPINGS["NextStepModelLoader"]
    assert loader.VALIDATE_INPUTS(attention="sdpa") is True
    assert "flash_attn" in loader.VALIDATE_INPUTS(attention="flash-attn")  # not installed on CPU machines


def test_image_conversions(pack):
    common = pack[0].nodes.common
    rgba = torch.rand(2, 24, 40, 4)
    px = common.image_to_engine(rgba)
    assert px.shape == (2, 3, 24, 40) and torch.equal(px[1, 2], rgba[1, :, :, 2])
    grey = common.image_to_engine(torch.rand(1, 8, 8, 1))
    assert grey.shape == (1, 3, 8, 8) and torch.equal(grey[0, 0], grey[0, 2])
    back = common.image_from_engine(px)
    assert back.shape == (2, 24, 40, 3) and torch.equal(back, rgba[..., :3])


def _generate(pack, width=32, height=48, seed=3, batch=1):
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    cond = node(pack, "NextStepTextEncode").encode("a cat", "", "")[0]
    return model, node(pack, "NextStepSampler").sample(model, cond, seed, width, height, batch, 3.0, 1.0, "constant",
                                                       1.0, 2, "auto", True)[0]


def test_text_to_image_chain(pack):
    model, latent = _generate(pack, batch=2)
    rec = pack[1]
    assert latent["samples"].shape == (2, 16, 48 // 8, 32 // 8) and latent["samples"].dtype == torch.float32
    # ComfyUI was asked to place the model with room for the KV cache on top of the weights
    (patchers, extra), = [call for call in rec.loads if call[0][0] is model.patcher]
    assert extra > 0
    tokens = (32 // 16) * (48 // 16)
    assert [p[0] for p in rec.progress] == list(range(1, tokens + 1))
    fmt, image, size = rec.progress[-1][2]
    assert fmt == "JPEG" and image.size == (32 // 8, 48 // 8) and size == 256
    vae = node(pack, "NextStepVAELoader").load("NextStep-1.1/vae", False)[0]
    images = node(pack, "NextStepVAEDecode").decode(latent, vae)[0]
    assert images.shape == (2, 48, 32, 3) and 0 <= images.min() and images.max() <= 1


@pytest.mark.parametrize("weight_dtype", ["fp8", "int8", "int4"])
def test_quantised_weight_dtypes(pack, weight_dtype):
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", weight_dtype, "sdpa", False)[0]
    assert model.module.quant == weight_dtype
    assert model.module.state_dict()["layers.0.mlp.up_proj.weight"].element_size() == 1
    cond = node(pack, "NextStepTextEncode").encode("a cat", "", "")[0]
    latent = node(pack, "NextStepSampler").sample(model, cond, 1, 32, 32, 1, 3.0, 1.0, "constant", 1.0, 2, "auto",
                                                  False)[0]
    assert torch.isfinite(latent["samples"]).all()


def test_step_annealing_input(pack):
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    cond = node(pack, "NextStepTextEncode").encode("a cat", "", "")[0]
    sampler = node(pack, "NextStepSampler")
    args = (model, cond, 5, 64, 32, 1, 3.0, 1.0, "constant", 1.0, 6, "euler", False)
    plain, annealed = sampler.sample(*args)[0]["samples"], sampler.sample(*args, steps_end=2)[0]["samples"]
    assert torch.equal(plain, sampler.sample(*args, steps_end=0)[0]["samples"])  # 0 = off
    assert not torch.equal(plain, annealed)


def test_same_seed_same_latent(pack):
    assert torch.equal(_generate(pack, seed=9)[1]["samples"], _generate(pack, seed=9)[1]["samples"])
    assert not torch.equal(_generate(pack, seed=9)[1]["samples"], _generate(pack, seed=10)[1]["samples"])


def test_interrupt_becomes_comfy_interrupt(pack):
    import comfy.model_management as mm

    pack[1].interrupt_after = 2
    with pytest.raises(mm.InterruptProcessingException):
        _generate(pack, width=64, height=64)
    assert len(pack[1].progress) == 2  # stopped at the next token, not at the end


def test_run_time_errors_are_short(pack):
    err = pack[0].nodes.common.NextStepNodeError
    vae = node(pack, "NextStepVAELoader").load("NextStep-1.1/vae", False)[0]
    with pytest.raises(err, match="4 channels"):
        node(pack, "NextStepVAEDecode").decode({"samples": torch.zeros(1, 4, 8, 8)}, vae)
    cond = node(pack, "NextStepTextEncode").encode("edit", "", "")[0]
    with pytest.raises(err, match="multiples of 16"):
        node(pack, "NextStepEditEncode").encode(cond, vae, torch.rand(1, 40, 24, 3))
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    with pytest.raises(err, match="multiple of 16"):  # a linked width skips VALIDATE_INPUTS
        node(pack, "NextStepSampler").sample(model, cond, 0, 40, 32, 1, 3.0, 1.0, "constant", 1.0, 2, "auto", True)


def test_edit_chain_and_vae_round_trip(pack):
    vae = node(pack, "NextStepVAELoader").load("NextStep-1.1/vae", False)[0]
    image = torch.rand(1, 32, 48, 3)
    latent = node(pack, "NextStepVAEEncode").encode(image, vae)[0]
    assert latent["samples"].shape == (1, 16, 4, 6)
    assert node(pack, "NextStepVAEDecode").decode(latent, vae)[0].shape == (1, 32, 48, 3)
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    cond = node(pack, "NextStepTextEncode").encode("add a hat", "", "Copy original image.")[0]
    cond = node(pack, "NextStepEditEncode").encode(cond, vae, image)[0]
    out = node(pack, "NextStepSampler").sample(model, cond, 1, 48, 32, 1, 3.0, 2.0, "constant", 3.2, 2, "auto", True)
    assert out[0]["samples"].shape == (1, 16, 4, 6)


def test_workflows_use_only_known_widgets(pack):
    """The shipped workflows' widget values fit the node definitions (the real check runs in tests/comfyui)."""
    from pathlib import Path

    mappings = pack[0].NODE_CLASS_MAPPINGS
    for path in (Path(__file__).resolve().parents[2] / "workflows").glob("*.json"):
        for n in json.loads(path.read_text())["nodes"]:
            if n["type"] in mappings:
                types = mappings[n["type"]].INPUT_TYPES()
                spec = {**types["required"], **types.get("optional", {})}
                widgets = [k for k, v in spec.items() if isinstance(v[0], list) or v[0] in
                           ("INT", "FLOAT", "STRING", "BOOLEAN")]
                extra = 1 if "seed" in widgets else 0
                assert len(n.get("widgets_values", [])) == len(widgets) + extra, (path.name, n["type"])


def test_moving_the_managed_model_releases_the_kept_per_token_step(pack):
    """ComfyUI loads and unloads by moving the patcher's module: the kept step (KV cache, graph) must go too."""
    import nextstep_core as ns

    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    settings = ns.SamplerSettings(width=32, height=32, steps=2, fast="static")
    ns.sample(model.module, ns.Conditioning(["a cat"]), settings)
    assert model.module.step_cache is not None
    model.patcher.model.to("cpu")
    assert model.module.step_cache is None
