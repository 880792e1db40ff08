"""Loading the official layout and single files: identical tensors, dtype casts, and one clear error per problem."""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from nextstep_core import load_model, load_vae
from nextstep_core.errors import CheckpointError, NextStepError
from nextstep_core.weights.loading import check_dtype_supported, parse_dtype


def _file_state(folder):
    state = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, f)))
    return state


def _copy(tiny_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_sharded_folder_round_trip(tiny_dir):
    files = sorted(f for f in os.listdir(tiny_dir) if f.endswith(".safetensors"))
    assert len(files) >= 2 and os.path.isfile(os.path.join(tiny_dir, "model.safetensors.index.json"))
    state = _file_state(tiny_dir)
    m = load_model(tiny_dir, dtype="float32")
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert m.lm_head is None  # not needed for images, so not loaded
    assert "lm_head.weight" in state


def test_bf16_load_casts_every_tensor(tiny_dir):
    state = _file_state(tiny_dir)
    m = load_model(tiny_dir, dtype="bfloat16")
    for k, v in m.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, state[k].to(torch.bfloat16)), k


def test_lm_head_on_request(tiny_dir):
    m = load_model(tiny_dir, dtype="float32", load_lm_head=True)
    assert m.logits(torch.zeros(1, m.config.hidden_size)).shape == (1, m.config.vocab_size)


def test_single_file_round_trip(tiny_dir, tmp_path):
    from nextstep_core.weights.convert import convert

    out = convert(tiny_dir, str(tmp_path / "one.safetensors"), "fp32")
    a, b = load_model(tiny_dir, dtype="float32"), load_model(out, dtype="float32")
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert b.tokenizer.encode("a cat") == a.tokenizer.encode("a cat")
    assert b.config.family == a.config.family


def test_missing_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is missing"):
        load_model(str(d))


def test_truncated_shard(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    p = d / "model-00001-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors.*truncated or corrupt"):
        load_model(str(d))


def test_missing_key(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    name = "model-00002-of-00002.safetensors"
    state = load_file(str(d / name))
    victim = next(k for k in state if "res_blocks" in k)
    del state[victim]
    save_file(state, str(d / name))
    idx = json.load(open(d / "model.safetensors.index.json"))
    del idx["weight_map"][victim]
    json.dump(idx, open(d / "model.safetensors.index.json", "w"))
    with pytest.raises(CheckpointError, match=r"1 model tensor\(s\) missing.*" + victim.replace(".", r"\.")):
        load_model(str(d))


def test_shape_that_does_not_match_the_config(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.load(open(d / "config.json"))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match="gate_proj.weight has shape .*128, 64.* config implies .*96, 64"):
        load_model(str(d))


def test_unexpected_keys_are_reported(tiny_dir, tmp_path, caplog):
    d = _copy(tiny_dir, tmp_path)
    name = "model-00001-of-00002.safetensors"
    state = load_file(str(d / name))
    state["mystery.weight"] = torch.zeros(3)
    save_file(state, str(d / name))
    idx = json.load(open(d / "model.safetensors.index.json"))
    idx["weight_map"]["mystery.weight"] = name
    json.dump(idx, open(d / "model.safetensors.index.json", "w"))
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        m = load_model(str(d))
    assert m.unexpected_keys == ["mystery.weight"]
    assert "mystery.weight" in caplog.text


def test_vae_in_the_model_slot(tiny_dir):
    with pytest.raises(CheckpointError, match=r"/vae is a VAE \(the f8ch16 tokenizer\), not the model"):
        load_model(tiny_dir + "/vae")


def test_model_in_the_vae_slot(tiny_dir, tmp_path):
    from nextstep_core.weights.convert import convert

    with pytest.raises(CheckpointError, match="is the NextStep AR model, not its VAE"):
        load_vae(tiny_dir)
    f = convert(tiny_dir, str(tmp_path / "model.safetensors"), "fp32")
    with pytest.raises(CheckpointError, match="is the NextStep AR model, not its VAE"):
        load_vae(f)


def test_vae_file_in_the_model_slot(tiny_dir, tmp_path):
    from nextstep_core.weights.convert import convert

    f = convert(tiny_dir + "/vae", str(tmp_path / "vae.safetensors"))
    with pytest.raises(CheckpointError, match="is a VAE"):
        load_model(f)


def test_plain_qwen_folder(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.load(open(d / "config.json"))
    for k in ("boi", "eoi", "image_placeholder_id", "fm_head_dim", "fm_head_layers", "latent_patch_size"):
        cfg.pop(k)
    cfg["model_type"] = "qwen2"
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match="not a NextStep model config"):
        load_model(str(d))


def test_tokenizer_from_another_model(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    cfg = json.load(open(d / "config.json"))
    cfg["boi"] += 1
    json.dump(cfg, open(d / "config.json", "w"))
    with pytest.raises(CheckpointError, match="tokenizer does not match"):
        load_model(str(d))


def test_no_weights_and_missing_path(tiny_dir, tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), d)
    with pytest.raises(CheckpointError, match="no model\\*.safetensors"):
        load_model(str(d))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_dtypes(monkeypatch):
    assert parse_dtype("bf16") is torch.bfloat16
    with pytest.raises(NextStepError, match="unknown dtype"):
        parse_dtype("int4")

    def broken_ones(*a, **k):
        raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")

    monkeypatch.setattr(torch, "ones", broken_ones)
    with pytest.raises(NextStepError, match="cannot compute in torch.float16.*float32 always works"):
        check_dtype_supported(torch.float16, torch.device("cpu"))


def test_flash_backend_without_flash_attn(tiny_dir):
    pytest.importorskip("torch")
    try:
        import flash_attn  # noqa: F401
        pytest.skip("flash-attn is installed here")
    except ImportError:
        pass
    with pytest.raises(NextStepError, match="flash-attn.*sdpa"):
        load_model(tiny_dir, attn_backend="flash")


def test_a_flux_style_vae_file_in_the_model_slot(tiny_dir, tmp_path):
    """A bare BFL-named autoencoder file (e.g. FLUX's ae.safetensors) is recognised, not half-loaded."""
    state = torch.load(os.path.join(tiny_dir, "vae", "checkpoint.pt"), weights_only=True)
    f = tmp_path / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(f))
    with pytest.raises(CheckpointError, match="is a VAE .*load it as the VAE"):
        load_model(str(f))
