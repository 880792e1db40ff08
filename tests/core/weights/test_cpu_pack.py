"""Dense weights packed once for the CPU's matmul: the same products as F.linear, invisible to files and hosts,
undone by a move, and never applied to a layer that is not a plain dense Linear."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import nextstep_core as ns
from nextstep_core.weights import cpu_pack
from nextstep_core.weights.convert import convert

pytestmark = pytest.mark.skipif(not cpu_pack.packing_works(torch.float32),
                                reason="this torch build / CPU cannot pack weights (F.linear is used)")
needs_bf16 = pytest.mark.skipif(not cpu_pack.packing_works(torch.bfloat16), reason="no bf16 packing on this CPU")


@pytest.fixture(autouse=True)
def pack_small_fp32_layers_too(monkeypatch):
    """The tiny test layers are below the fp32 size where packing starts to pay; the mechanics are the same."""
    monkeypatch.setattr(cpu_pack, "MIN_FP32_WEIGHT", 0)


@needs_bf16
def test_small_fp32_layers_keep_f_linear_and_bf16_ones_are_packed(monkeypatch):
    monkeypatch.undo()
    small, big = nn.Linear(384, 384), nn.Linear(512, 512)
    layers = nn.ModuleList([small, big, nn.Linear(64, 64).bfloat16()]).requires_grad_(False)
    assert cpu_pack.MIN_FP32_WEIGHT > 384 * 384 and cpu_pack.pack_linears(layers) == 2
    assert not small.weight.is_mkldnn and big.weight.is_mkldnn


def _pair(dtype, bias=True, out_f=96, in_f=64):
    torch.manual_seed(0)
    plain = nn.Linear(in_f, out_f, bias=bias).to(dtype).requires_grad_(False)
    packed = nn.Linear(in_f, out_f, bias=bias).to(dtype).requires_grad_(False)
    packed.load_state_dict(plain.state_dict())
    assert cpu_pack.pack_linears(packed) == 1 and packed.weight.is_mkldnn
    return plain, packed


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (17, 64), (2, 5, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_a_packed_layer_gives_the_dense_product(shape, bias):
    _, packed = _pair(torch.float32, bias)
    x = torch.randn(*shape)
    want = F.linear(x, packed.weight.to_dense(), packed.bias)
    got = packed(x)
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()  # fp32: summation order only


@needs_bf16
def test_in_bf16_the_packed_product_is_bit_identical():
    plain, packed = _pair(torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    assert torch.equal(packed(x), plain(x))


def test_the_packed_weight_replaces_the_dense_one_and_state_dict_gives_it_back():
    plain, packed = _pair(torch.float32)
    assert [n for n, _ in packed.named_parameters()] == ["weight", "bias"]  # no second copy
    state = packed.state_dict()
    assert not state["weight"].is_mkldnn and torch.equal(state["weight"], plain.weight)
    fresh = nn.Linear(64, 96)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, plain.weight)


@needs_bf16
def test_a_move_unpacks_and_the_layer_packs_again_where_it_lands():
    plain, packed = _pair(torch.bfloat16)
    packed.float()
    assert packed.weight.is_mkldnn and packed.weight.dtype == torch.float32
    assert torch.equal(packed.weight.to_dense(), plain.weight.float())
    packed.to("meta")  # stands in for a GPU: not the CPU, so it stays dense
    assert not packed.weight.is_mkldnn and packed.weight.device.type == "meta"


def test_only_plain_dense_linears_are_packed():
    class HostLinear(nn.Linear):  # a host's own class (ComfyUI's weight-streaming Linear) keeps its forward
        pass

    layers = nn.ModuleList([HostLinear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8).half()]).requires_grad_(False)
    trainable = nn.Linear(8, 8)
    assert cpu_pack.pack_linears(layers) == 1 and cpu_pack.pack_linears(trainable) == 0
    assert [m.weight.is_mkldnn for m in layers] == [False, True, False]


def test_nothing_is_packed_where_the_probe_says_no(monkeypatch):
    monkeypatch.setattr(cpu_pack, "packing_works", lambda dtype: False)
    assert cpu_pack.pack_linears(nn.Linear(8, 8).requires_grad_(False)) == 0


def test_a_loaded_model_packs_every_dense_linear_and_still_gives_the_published_tensors(tiny_dir):
    model = ns.load_model(tiny_dir, dtype="float32")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(m.weight.is_mkldnn for m in linears)  # merged q/k/v and gate/up included
    plain = ns.load_model(tiny_dir, dtype="float32")
    cpu_pack.unpack_linears(plain)
    state, want = model.state_dict(), plain.state_dict()
    assert state.keys() == want.keys() and "layers.0.self_attn.q_proj.weight" in state
    assert all(not t.is_mkldnn and torch.equal(t, want[k]) for k, t in state.items())


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=needs_bf16)])
def test_a_packed_model_generates_the_unpacked_tokens(tiny_dir, dtype):
    packed = ns.load_model(tiny_dir, dtype=dtype)
    plain = ns.load_model(tiny_dir, dtype=dtype)
    assert cpu_pack.unpack_linears(plain) > 0 and not any(p.is_mkldnn for p in plain.parameters())
    cond = ns.Conditioning(["a red fox"], negative_prompt="blurry")
    for fast in ("eager", "static"):
        settings = ns.SamplerSettings(width=32, height=32, steps=6, cfg=4.0, seed=3, fast=fast)
        a, b = ns.sample(packed, cond, settings).tokens, ns.sample(plain, cond, settings).tokens
        if dtype == "bfloat16":
            assert torch.equal(a, b)
        else:
            assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_an_int4_model_packs_its_dense_head_and_leaves_quantised_layers_alone(tiny_dir, tmp_path):
    path = str(tmp_path / "int4.safetensors")
    convert(tiny_dir, path, "int4")
    model = ns.load_model(path, dtype="bfloat16" if cpu_pack.packing_works(torch.bfloat16) else "float32")
    quantised = [m for m in model.modules() if getattr(m, "weight_scale", None) is not None]
    head = [m for m in model.image_head.modules() if isinstance(m, nn.Linear)]
    assert quantised and not any(m.weight.is_mkldnn for m in quantised)
    assert all(m.weight.is_mkldnn for m in head)
