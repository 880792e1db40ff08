"""Quantised layers through PyTorch's packed kernels: same numbers as the dequantised reference, a fallback decided
at load, int4 files that are device-neutral, and shapes int4 cannot take kept as int8."""
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import nextstep_core as ns
import nextstep_core.weights.quant as Q
from nextstep_core.weights import quant_int4
from nextstep_core.weights.convert import TensorReader, convert

# bf16 activations and outputs: the packed products and the dequantised reference differ by bf16 round-off only
PACKED_BOUND = 1e-2
# a decoder whose every projection int4 can take (in_features multiples of 128), and one where down_proj cannot
INT4_GEOMETRY = dict(hidden_size=128, intermediate_size=256)
MIXED_GEOMETRY = dict(hidden_size=128, intermediate_size=192)
# the CPU's int4 kernel where this torch has the op (every CPU it runs on: `quant_int4.cpu_layout`), else the fallback
CPU_INT4 = quant_int4.kernel_for(torch.device("cpu")) or "dequant"
NEEDS_CPU_INT4 = pytest.mark.skipif(CPU_INT4 == "dequant", reason="this torch has no CPU int4 kernel")


@pytest.fixture(autouse=True)
def _fresh_probes():
    Q.kernel_works.cache_clear()
    yield
    Q.kernel_works.cache_clear()


@pytest.fixture(scope="module")
def int4_dir(tmp_path_factory):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ck") / "int4able"), with_lm_head=False, **INT4_GEOMETRY)


def quant_layer(fmt, out_f=128, in_f=256, bias=True, dtype=torch.bfloat16, seed=0):
    """A QuantLinear holding `fmt` weights as a loaded file would, prepared for the CPU; and the float weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * torch.linspace(0.05, 2, out_f)[:, None]
    layer = Q.make_quant_linear(torch.nn.Linear)(in_f, out_f, bias=bias)
    for key, t in Q.quantized_tensors("layers.0.mlp.up_proj.weight", w, fmt):
        setattr(layer, key.rsplit(".", 1)[-1], torch.nn.Parameter(t, requires_grad=False) if key.endswith(".weight")
                else t)
    if bias:
        layer.bias.data = torch.randn(out_f, generator=g).to(dtype)
    layer.prepare(dtype)
    return layer.requires_grad_(False)


def reference(layer, x):
    """F.linear with the dequantised weight, in float32."""
    w = Q.dequantize_weight(layer.plain_weight(), layer.weight_scale.float().contiguous(), torch.float32,
                            None if layer.weight_zero is None else layer.weight_zero.float().contiguous())
    return F.linear(x.float(), w, None if layer.bias is None else layer.bias.float())


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("fmt,kernel", [("int8", "int8_pack"), ("int4", CPU_INT4)])
@pytest.mark.parametrize("rows", [1, 2, 3, 24])
def test_packed_product_equals_the_dequantised_reference(fmt, kernel, rows):
    layer = quant_layer(fmt)
    assert layer.kernel == kernel
    x = torch.randn(rows, 256).bfloat16()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, 128)
    assert rel(y, reference(layer, x)) < PACKED_BOUND


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_the_dense_path_for_many_rows_equals_the_reference_in_every_compute_dtype(fmt, dtype):
    layer = quant_layer(fmt, dtype=dtype)
    x = torch.randn(40, 256).to(dtype)  # a prefill: above PACKED_ROWS, so the weight is expanded for one matmul
    y = layer(x)
    assert y.dtype == dtype and rel(y, reference(layer, x)) < PACKED_BOUND


def test_int4_packed_layer_keeps_fp32_activations_in_fp32():
    layer = quant_layer("int4", dtype=torch.float32)
    x = torch.randn(2, 1, 256)
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 1, 128)
    assert rel(y, reference(layer, x)) < PACKED_BOUND  # the CPU kernel runs in bf16: this is its round-off


def _missing(name):
    def install(monkeypatch):
        monkeypatch.delattr(torch, name)
    return install


def _raising(name, exc):
    def install(monkeypatch):
        def boom(*args, **kwargs):
            raise exc("not supported on this device")
        monkeypatch.setattr(torch, name, boom)
    return install


@pytest.mark.parametrize("fmt,op", [("int8", "_weight_int8pack_mm"), ("int4", "_weight_int4pack_mm_for_cpu")])
@pytest.mark.parametrize("how", ["missing", RuntimeError, NotImplementedError, TypeError])
def test_a_missing_or_failing_kernel_falls_back_at_load_to_the_same_numbers(monkeypatch, fmt, op, how):
    x = torch.randn(2, 256).bfloat16()
    packed = quant_layer(fmt)
    expected = packed(x)
    Q.kernel_works.cache_clear()
    (_missing(op) if how == "missing" else _raising(op, how))(monkeypatch)
    fallback = quant_layer(fmt)
    assert fallback.kernel == "dequant"
    assert rel(fallback(x), reference(fallback, x)) < PACKED_BOUND
    assert rel(fallback(x), expected) < PACKED_BOUND
    assert torch.equal(fallback.plain_weight(), packed.plain_weight())  # the same codes, laid out as in the file


def test_the_fallback_is_decided_once_not_per_call(monkeypatch):
    layer = quant_layer("int8")
    calls = []
    real = torch._weight_int8pack_mm
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 256).bfloat16()
    for _ in range(3):
        layer(x)
    assert len(calls) == 3 and layer.kernel == "int8_pack"  # no probe, no re-decision inside forward


def test_moving_a_packed_layer_unpacks_and_repacks_it():
    layer = quant_layer("int4")
    x = torch.randn(2, 256).bfloat16()
    before, plain = layer(x), layer.plain_weight().clone()
    layer.to("cpu")  # _apply: back to the file layout, "move", pack again for the (same) device
    assert layer.kernel == CPU_INT4
    assert torch.equal(layer.plain_weight(), plain) and torch.equal(layer(x), before)
    layer.prepare(torch.bfloat16)  # preparing again (a second load step) must not pack the packed weight twice
    assert torch.equal(layer.plain_weight(), plain) and torch.equal(layer(x), before)


@NEEDS_CPU_INT4
def test_cpu_packed_layout_is_the_one_unpack_inverts():
    assert quant_int4.cpu_layout_known()
    b, _, _ = quant_int4.quantize(torch.randn(192, 384))
    assert torch.equal(quant_int4.unpack("int4_cpu", quant_int4.pack("int4_cpu", b), 192, 384), b)


# the instruction sets PyTorch can dispatch to on an x86 CPU, lowest first; ATEN_CPU_CAPABILITY picks one at import
X86_LEVELS = ["default", "avx2", "avx512"]
PROBE = """
import torch, nextstep_core.weights.quant as Q
from nextstep_core.weights import quant_int4
b, scale, zero = quant_int4.quantize(torch.randn(192, 384))
layer = Q.make_quant_linear(torch.nn.Linear)(384, 192, bias=False)
layer.weight, layer.weight_scale, layer.weight_zero = torch.nn.Parameter(b, requires_grad=False), scale, zero
layer.prepare(torch.bfloat16)
x = torch.randn(2, 384).bfloat16()
ref = torch.nn.functional.linear(x.float(), quant_int4.dequantize(b, scale, zero, torch.float32))
err = float((layer(x).float() - ref).norm() / ref.norm())
print(torch.backends.cpu.get_cpu_capability(), quant_int4.cpu_layout()[0], layer.kernel,
      torch.equal(layer.plain_weight(), b), err < 1e-2)
"""


@NEEDS_CPU_INT4
@pytest.mark.parametrize("level", X86_LEVELS)
def test_the_cpu_int4_kernel_runs_packed_under_every_instruction_set_this_cpu_dispatches_to(level):
    """Each level packs its own layout (AVX-512: 64-row blocks, AVX2 and plain C++: 32); all must be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("ATEN_CPU_CAPABILITY levels are x86 ones")
    here = torch.backends.cpu.get_cpu_capability().lower()
    if here not in X86_LEVELS or X86_LEVELS.index(level) > X86_LEVELS.index(here):
        pytest.skip(f"this CPU dispatches up to {here}, not {level}")
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       env={**os.environ, "ATEN_CPU_CAPABILITY": level})
    assert r.returncode == 0, r.stderr
    capability, block, kernel, same_codes, close = r.stdout.split()
    assert capability.lower() == level and kernel == "int4_cpu" and same_codes == "True" and close == "True"
    assert int(block) == (64 if level == "avx512" else 32)


def avx512_packer(q: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """PyTorch's AVX-512 CPU packer, from its documented layout: per 64-row block, K-major, byte j of a column
    holding row j in the low nibble and row j + 32 in the high one."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n // 64, 64, k).transpose(1, 2)  # [n / 64, k, 64]
    return (blocks[..., :32] | (blocks[..., 32:] << 4)).reshape(n, k // 2)


@pytest.fixture
def fresh_layout():
    quant_int4.cpu_layout.cache_clear()
    yield
    quant_int4.cpu_layout.cache_clear()


def test_an_avx512_layout_is_read_and_inverted_on_any_cpu(monkeypatch, fresh_layout):
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", avx512_packer, raising=False)
    block, rows = quant_int4.cpu_layout()
    assert block == 64 and rows[:4].tolist() == [0, 32, 1, 33]
    b, _, _ = quant_int4.quantize(torch.randn(192, 384))
    packed = quant_int4.pack("int4_cpu", b)
    assert torch.equal(packed, avx512_packer(quant_int4.unpack_nibbles(b), 1))
    assert torch.equal(quant_int4.unpack("int4_cpu", packed, 192, 384), b)


@NEEDS_CPU_INT4
def test_a_cpu_packer_layout_that_cannot_be_read_leaves_int4_dequantising(monkeypatch, fresh_layout):
    x = torch.randn(2, 256).bfloat16()
    expected = quant_layer("int4")(x)
    Q.kernel_works.cache_clear()
    quant_int4.cpu_layout.cache_clear()
    real = torch._convert_weight_to_int4pack_for_cpu
    monkeypatch.setattr(torch, "_convert_weight_to_int4pack_for_cpu", lambda q, t: real(q, t).flatten().flip(0)
                        .reshape(q.shape[0], -1))  # a permutation across blocks: no block layout
    assert not quant_int4.cpu_layout_known()
    layer = quant_layer("int4")
    assert layer.kernel == "dequant" and rel(layer(x), expected) < PACKED_BOUND


def test_int4_quantisation_error_is_bounded_per_group():
    w = torch.randn(64, 512)
    b, scale, zero = quant_int4.quantize(w)
    assert b.dtype == torch.uint8 and b.shape == (64, 256) and scale.shape == zero.shape == (64, 4)
    err = (quant_int4.dequantize(b, scale, zero, torch.float32) - w).abs()
    step = scale.float().repeat_interleave(128, dim=1)
    assert (err <= 0.5 * step * 1.02 + 1e-6).all()  # round to nearest, against the bf16 scale actually stored


def test_int4_refuses_shapes_it_cannot_take_and_the_file_keeps_them_as_int8():
    with pytest.raises(ValueError, match="divisible by 128"):
        quant_int4.quantize(torch.randn(64, 192))
    assert Q.stored_format("layers.0.mlp.down_proj.weight", (128, 192), "int4") == "int8"
    assert Q.stored_format("layers.0.mlp.up_proj.weight", (192, 128), "int4") == "int4"
    assert Q.stored_format("image_head.net.res_blocks.0.mlp.0.weight", (128, 128), "int4") is None  # head: bf16
    assert Q.stored_format("image_head.net.res_blocks.0.mlp.0.weight", (128, 128), "int8") == "int8"


def test_int4_decoder_weights_take_under_0_3x_of_bf16_at_the_real_geometry():
    h, i, kv = 5120, 13824, 1024
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    bf16 = int4 = 0
    for name, shape in shapes.items():
        bf16 += 2 * shape[0] * shape[1]
        for _, dt, s in Q.stored_plan(f"layers.0.{name}.weight", shape, "int4"):
            int4 += size(dt) * s[0] * s[1]
    assert int4 / bf16 < 0.3


def test_convert_int4_writes_the_device_neutral_layout_and_loads_packed(int4_dir, tmp_path):
    out = convert(int4_dir, str(tmp_path / "m_int4.safetensors"), "int4")
    r = TensorReader(out)
    w = r.get("layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.uint8 and tuple(w.shape) == (256, 64)
    assert r.get("layers.0.mlp.up_proj.weight_scale").shape == (256, 1)
    assert r.get("image_head.net.res_blocks.0.mlp.0.weight").dtype == torch.bfloat16  # the head stays bf16
    # plain nibbles: decoding them by the documented formula gives the original weight to int4 accuracy
    src = ns.load_model(int4_dir, dtype="float32").state_dict()["layers.0.mlp.up_proj.weight"]  # merged at load
    deq = quant_int4.dequantize(w, r.get("layers.0.mlp.up_proj.weight_scale"),
                                r.get("layers.0.mlp.up_proj.weight_zero"), torch.float32)
    assert rel(deq, src) < 0.12
    m = ns.load_model(out, dtype="bfloat16")
    layer = m.layers[0].mlp.gate_up_proj  # gate and up merged at load, then packed as one layer
    assert m.quant == "int4" and layer.kernel == CPU_INT4
    assert torch.equal(layer.plain_weight()[-w.shape[0]:], w)  # what was packed at load is exactly the file's codes


def test_an_int4_model_generates_close_to_bf16(int4_dir, tmp_path):
    out = convert(int4_dir, str(tmp_path / "m_int4.safetensors"), "int4")
    ref, q = ns.load_model(int4_dir, dtype="bfloat16"), ns.load_model(out, dtype="bfloat16")
    cond = ns.Conditioning(["a cat"])
    settings = ns.SamplerSettings(width=32, height=32, steps=4, seed=1, cfg=3.0)
    a, b = ns.sample(ref, cond, settings), ns.sample(q, cond, settings)
    other = ns.sample(ref, cond, settings.replace(seed=2))
    err, scale = rel(b.tokens, a.tokens), rel(other.tokens, a.tokens)
    assert torch.isfinite(b.tokens).all() and 0 < err < 0.5 * scale, (err, scale)


@pytest.mark.parametrize("geometry", [INT4_GEOMETRY, MIXED_GEOMETRY], ids=["all-int4", "down-proj-int8"])
def test_quantising_to_int4_at_load_equals_convert_then_load(tmp_path, geometry):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(str(tmp_path / "ck"), with_vae=False, with_lm_head=False, **geometry)
    a = ns.load_model(d, dtype="bfloat16", quantize="int4")
    b = ns.load_model(convert(d, str(tmp_path / "q.safetensors"), "int4"), dtype="bfloat16")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k].float(), sb[k].float()), k
    down = a.layers[0].mlp.down_proj
    assert down.fmt == ("int4" if geometry is INT4_GEOMETRY else "int8")
    assert a.layers[0].mlp.gate_up_proj.fmt == "int4"


def test_an_int4_file_loads_through_the_fallback_with_the_same_numbers(int4_dir, tmp_path, monkeypatch):
    out = convert(int4_dir, str(tmp_path / "m_int4.safetensors"), "int4")
    packed = ns.load_model(out, dtype="bfloat16")
    Q.kernel_works.cache_clear()
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", _boom)
    plain = ns.load_model(out, dtype="bfloat16")
    monkeypatch.undo()  # the kernel is back, but the fallback model keeps what was decided at its load
    assert plain.layers[0].mlp.gate_up_proj.kernel == "dequant"
    # k/v_proj (32 outputs) are below the CPU kernel's 64-row blocks: those two dequantise in both models, and
    # q/k/v stay apart (32 rows would split a tile of the packed layouts); gate/up merge
    assert [packed.layers[1].get_submodule(n).kernel for n in ("self_attn.q_proj", "self_attn.k_proj")] == \
        [CPU_INT4, "dequant"]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        lp, lf = packed.layers[1].get_submodule(name), plain.layers[1].get_submodule(name)
        x = torch.randn(2, lp.in_features).bfloat16()
        assert rel(lf(x), lp(x)) < PACKED_BOUND, name
    cond = ns.Conditioning(["a cat"])
    settings = ns.SamplerSettings(width=32, height=32, steps=4, seed=1, cfg=3.0)
    assert rel(ns.sample(plain, cond, settings).tokens, ns.sample(packed, cond, settings).tokens) < 0.05


def _boom(*args, **kwargs):
    raise RuntimeError("int4 kernel unavailable")


def test_info_describes_an_int4_file_with_the_unquantised_parameter_count(int4_dir, tmp_path):
    from nextstep_core.frontend.info import describe

    out = convert(int4_dir, str(tmp_path / "m_int4.safetensors"), "int4")
    text, original = describe(out), describe(int4_dir)
    assert "quantised int4" in text
    count = [ln for ln in original.splitlines() if "parameters:" in ln]
    assert count and count[0] in text.splitlines()  # int4's half-byte codes still count as one parameter each
