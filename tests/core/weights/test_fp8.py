"""fp8 weights: fp8 tensor cores (`_scaled_mm`) where the device has them, the head kept in high precision, and a
warning where fp8 can only dequantise (slower than bf16)."""
import logging

import pytest
import torch

import nextstep_core as ns
from nextstep_core.weights import quant as Q
from nextstep_core.weights import quant_fp8
from nextstep_core.weights.convert import convert


@pytest.fixture(autouse=True)
def fresh_probe():
    Q.kernel_works.cache_clear()
    quant_fp8.warn_dequantises.cache_clear()
    yield
    Q.kernel_works.cache_clear()
    quant_fp8.warn_dequantises.cache_clear()


def scaled_mm_runs_here() -> bool:
    q, s = Q.quantize_weight(torch.randn(16, 32), "fp8")
    try:
        Q.fp8_linear(torch.randn(2, 32), q, s, None)
    except (RuntimeError, NotImplementedError) as e:
        return not str(e)
    return True


needs_scaled_mm = pytest.mark.skipif(not scaled_mm_runs_here(), reason="torch._scaled_mm does not run on this CPU")


def test_fp8_keeps_the_head_dense_and_quantises_the_decoder(tiny_dir, tmp_path):
    for m in (ns.load_model(tiny_dir, dtype="float32", quantize="fp8"),
              ns.load_model(convert(tiny_dir, str(tmp_path / "f.safetensors"), "fp8"), dtype="float32")):
        assert m.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn
        assert all(getattr(x, "weight_scale", None) is None for x in m.image_head.modules())
        assert m.image_head.net.res_blocks[0].mlp[0].weight.dtype == torch.float32


def test_an_older_fp8_file_with_a_quantised_head_loads_with_the_head_dequantised(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(Q._KEYS, "fp8", Q._KEYS["int8"])  # how fp8 files were written before: the head's blocks too
    old = convert(tiny_dir, str(tmp_path / "old.safetensors"), "fp8")
    monkeypatch.undo()
    from safetensors import safe_open

    with safe_open(old, "pt") as f:
        stored = f.get_tensor("image_head.net.res_blocks.0.mlp.0.weight")
        scale = f.get_tensor("image_head.net.res_blocks.0.mlp.0.weight_scale")
    assert stored.dtype == torch.float8_e4m3fn
    m = ns.load_model(old, dtype="float32")
    layer = m.image_head.net.res_blocks[0].mlp[0]
    assert layer.weight.dtype == torch.float32 and layer.weight_scale is None
    assert torch.equal(layer.weight, Q.dequantize_weight(stored, scale, torch.float32))


def test_fp8_picks_the_tensor_core_matmul_only_where_the_device_has_one(monkeypatch):
    assert not quant_fp8.tensor_cores(torch.device("cpu"))
    assert Q._choose_kernel("fp8", torch.device("cpu"), torch.bfloat16, (64, 128)) == "dequant"
    monkeypatch.setenv("NEXTSTEP_FP8_MATMUL", "0")
    monkeypatch.setattr(quant_fp8, "tensor_cores", lambda device: True)  # an Ada / Hopper GPU, switched off by hand
    assert Q._choose_kernel("fp8", torch.device("cpu"), torch.bfloat16, (64, 128)) == "dequant"


@needs_scaled_mm
def test_the_scaled_mm_path_matches_the_dequantised_reference_within_its_bound(tiny_dir, monkeypatch):
    """Activations rounded to e4m3 per row: each product within SCALED_MM_TOLERANCE of the dequantised one, and a
    whole generation close to the dequantising model's (on the CPU, where `_scaled_mm` also runs)."""
    torch.manual_seed(0)
    for n_out, n_in in ((48, 128), (64, 256)):
        w, x = torch.randn(n_out, n_in), torch.randn(3, n_in).bfloat16()
        q, s = Q.quantize_weight(w, "fp8")
        fast = Q.fp8_linear(x, q, s, None).float()
        ref = torch.nn.functional.linear(x.float(), Q.dequantize_weight(q, s, torch.float32))
        assert float((fast - ref).norm() / ref.norm()) < quant_fp8.SCALED_MM_TOLERANCE
    monkeypatch.setenv("NEXTSTEP_FP8_MATMUL", "1")
    m = ns.load_model(tiny_dir, dtype="bfloat16", quantize="fp8")
    assert {x.kernel for x in m.modules() if getattr(x, "fmt", None) == "fp8"} == {"fp8_scaled_mm"}
    monkeypatch.setenv("NEXTSTEP_FP8_MATMUL", "0")
    Q.kernel_works.cache_clear()
    ref = ns.load_model(tiny_dir, dtype="bfloat16", quantize="fp8")
    assert {x.kernel for x in ref.modules() if getattr(x, "fmt", None) == "fp8"} == {"dequant"}
    s = ns.SamplerSettings(width=32, height=32, steps=4, seed=3, cfg=3.0)
    a, b = (ns.sample(x, ns.Conditioning(["a cat"]), s).tokens for x in (m, ref))
    assert float((a - b).norm() / b.norm()) < 0.1


def test_fp8_that_can_only_dequantise_says_so_once(tiny_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        ns.load_model(tiny_dir, dtype="float32", quantize="fp8")
        ns.load_model(tiny_dir, dtype="float32", quantize="fp8")
    assert caplog.text.count("has no fp8 matmul") == 1 and "int8 or int4" in caplog.text


def test_a_model_loaded_for_another_device_is_packed_only_there(tiny_dir, tmp_path, monkeypatch):
    """ComfyUI loads on the CPU for the GPU: int4 stays in the file layout until it reaches its device."""
    from nextstep_core.weights import quant_int4

    path = convert(tiny_dir, str(tmp_path / "i4.safetensors"), "int4")
    packed = []
    real = quant_int4.pack
    monkeypatch.setattr(quant_int4, "pack", lambda kernel, b: packed.append(tuple(b.shape)) or real(kernel, b))
    away = ns.load_model(path, dtype="bfloat16", target_device="cuda:0")
    layers = [x for x in away.modules() if getattr(x, "fmt", None) == "int4"]
    assert layers and not packed and {x.kernel for x in layers} == {"dequant"}
    home = ns.load_model(path, dtype="bfloat16", target_device="cpu")
    kernels = {x.kernel for x in home.modules() if getattr(x, "fmt", None) == "int4"}
    weights = sorted((x.out_features, x.in_features // 2) for x in layers)
    assert sorted(p for p in packed if p in weights) == weights  # each layer once (besides the kernel's probe)
    assert kernels <= {quant_int4.kernel_for(torch.device("cpu")), "dequant"}
    s = ns.SamplerSettings(width=32, height=16, steps=3, seed=2)
    a, b = (ns.sample(x, ns.Conditioning(["a"]), s).tokens for x in (away, home))
    assert float((a - b).norm() / b.norm()) < 0.1  # dequantised vs packed kernel, bf16 round-off apart
