"""fp8 / int8 / int4 weights and the converter: round trips, error bounds, memory."""
import os

import pytest
import torch

import nextstep_core as ns
from nextstep_core.weights.convert import TensorReader, convert
from nextstep_core.weights.quant import dequantize_weight, quantize_weight, should_quantize


@pytest.mark.parametrize("fmt,tol", [("fp8", 0.07), ("int8", 0.01)])
def test_per_channel_quantisation_error(fmt, tol):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.linspace(0.01, 3, 64)[:, None]
    q, s = quantize_weight(w, fmt)
    err = (dequantize_weight(q, s, torch.float32) - w).norm(dim=1) / w.norm(dim=1)
    assert err.max() < tol


def test_which_layers_are_quantised():
    assert should_quantize("layers.3.self_attn.q_proj.weight") and should_quantize("layers.0.mlp.down_proj.weight")
    assert should_quantize("image_head.net.res_blocks.1.adaLN_modulation.1.weight")
    for k in ("embed_tokens.weight", "image_in_projector.weight", "image_out_projector.weight",
              "image_head.net.final_layer.linear.weight", "image_head.net.cond_embed.weight",
              "layers.0.self_attn.q_proj.bias", "image_head.net.input_proj.weight"):
        assert not should_quantize(k), k


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "fp32"])
def test_convert_plain_dtypes_round_trip(tiny_dir, tmp_path, fmt):
    out = convert(tiny_dir, str(tmp_path / f"m_{fmt}.safetensors"), fmt)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[fmt]
    a, b = ns.load_model(tiny_dir, dtype=dt), ns.load_model(out, dtype=dt)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert "lm_head.weight" not in TensorReader(out).entries


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantised_model_generates_close_to_the_original(tiny_dir, tmp_path, fmt):
    out = convert(tiny_dir, str(tmp_path / f"m_{fmt}.safetensors"), fmt)
    ref = ns.load_model(tiny_dir, dtype="float32")
    q = ns.load_model(out, dtype="float32")
    assert q.quant == fmt and q.state_dict()["layers.0.mlp.up_proj.weight"].element_size() == 1
    cond = ns.Conditioning(["a cat"])
    args = dict(width=32, height=32, steps=4, seed=1, cfg=3.0)
    a, b = ns.sample(ref, cond, ns.SamplerSettings(**args)), ns.sample(q, cond, ns.SamplerSettings(**args))
    rel = (a.tokens - b.tokens).norm() / a.tokens.norm()
    assert 0 < rel < (0.2 if fmt == "fp8" else 0.05), rel


def test_quantised_weights_take_about_half_the_memory_of_bf16(tmp_path):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(str(tmp_path / "small"), size="small", with_vae=False, with_lm_head=False)
    bf16 = ns.load_model(convert(d, str(tmp_path / "b.safetensors"), "bf16"), dtype="bfloat16")

    def nbytes(m, part=""):
        return sum(t.numel() * t.element_size() for k, t in m.state_dict().items() if k.startswith(part))

    for fmt in ("fp8", "int8"):
        q = ns.load_model(convert(d, str(tmp_path / f"{fmt}.safetensors"), fmt), dtype="bfloat16")
        assert nbytes(q, "layers.") <= 0.55 * nbytes(bf16, "layers."), fmt
    # int8 quantises the head's blocks too; fp8 keeps the head in bf16 (see test_fp8_keeps_the_head_dense)
    assert nbytes(q) <= 0.55 * nbytes(bf16)


def test_vae_folder_converts_to_a_single_file(tiny_dir, tmp_path):
    out = convert(os.path.join(tiny_dir, "vae"), str(tmp_path / "vae.safetensors"), "fp32")
    a, b = ns.load_vae(os.path.join(tiny_dir, "vae")), ns.load_vae(out)
    for (k, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(va, vb), k
    assert b.config == a.config


def test_convert_refuses_requantising(tiny_dir, tmp_path):
    out = convert(tiny_dir, str(tmp_path / "q.safetensors"), "int8")
    with pytest.raises(ns.CheckpointError, match="already quantised"):
        convert(out, str(tmp_path / "qq.safetensors"), "fp8")


def test_fp8_matmul_path_matches_the_dequantised_product():
    """The hardware fp8 path (used on CUDA 8.9+) computes what the dequantising path computes, to fp8 accuracy."""
    from nextstep_core.weights.quant import fp8_linear

    torch.manual_seed(0)
    w, x, b = torch.randn(48, 128), torch.randn(5, 1, 128).bfloat16(), torch.randn(48)
    q, s = quantize_weight(w, "fp8")
    try:
        fast = fp8_linear(x, q, s, b)
    except RuntimeError as e:  # torch builds without CPU _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable here: {e}")
    slow = torch.nn.functional.linear(x, dequantize_weight(q, s, torch.bfloat16), b.bfloat16())
    assert fast.shape == (5, 1, 48)
    assert ((fast.float() - slow.float()).norm() / slow.float().norm()) < 0.06


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_quantising_at_load_time_equals_a_converted_file(tiny_dir, tmp_path, fmt):
    a = ns.load_model(tiny_dir, dtype="bfloat16", quantize=fmt)
    b = ns.load_model(convert(tiny_dir, str(tmp_path / "q.safetensors"), fmt), dtype="bfloat16")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].float(), sb[k].float()), k
    assert sa["layers.0.self_attn.q_proj.weight"].element_size() == 1
    with pytest.raises(ns.NextStepError, match="already quantised as " + fmt):
        ns.load_model(str(tmp_path / "q.safetensors"), quantize="int8" if fmt == "fp8" else "fp8")


def test_head_layers_without_a_packed_kernel_are_expanded_once_per_block_and_released(tiny_dir, monkeypatch):
    import nextstep_core.weights.quant as Q

    monkeypatch.setattr(Q, "_choose_kernel", lambda *a: "dequant")  # as where int8 has no packed kernel
    m = ns.load_model(tiny_dir, dtype="float32", quantize="int8")
    head = m.image_head
    layer = head.net.res_blocks[0].mlp[0]
    assert layer.kernel == "dequant"
    x, c = torch.randn(3, 64), torch.randn(3, m.config.hidden_size)
    plain = head.velocity(x, 0.3, c)
    with Q.expanded_weights(head, torch.float32):
        inside = head.velocity(x, 0.3, c)
        cache = Q._EXPANDED.get()
        assert cache[layer] is not None and cache[layer].dtype == torch.float32
    assert Q._EXPANDED.get() is None and not hasattr(layer, "expanded")
    assert torch.allclose(plain, inside, atol=1e-5)


def test_fp8_on_an_apple_gpu_is_refused_with_advice(tiny_dir, monkeypatch):
    import nextstep_core.weights.loading as L

    monkeypatch.setattr(L, "check_dtype_supported", lambda dtype, device: None)  # no MPS device here
    with pytest.raises(ns.NextStepError, match="MPS.*fp8.*int8"):
        ns.load_model(tiny_dir, dtype="bfloat16", device="mps", quantize="fp8")
