"""Merged projections: one layer computing what its parts compute, of the parts' own class, quantised ones included,
while `state_dict()` still gives every part's published tensors exactly as an unmerged model holds them."""
import pytest
import torch

import nextstep_core as ns
import nextstep_core.weights.quant as Q
from nextstep_core.weights.convert import convert
from nextstep_core.model.merge import merge_linears
from nextstep_core.model.decoder import NextStep
from tests.core.weights.test_quant_packed import CPU_INT4

# every decoder projection a whole number of int4's 64-row tiles: q 256, k / v 64 (4 heads, 1 kv head of 64)
TILED = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_key_value_heads=1)


class HostLinear(torch.nn.Linear):
    pass


QuantLinear = Q.make_quant_linear(torch.nn.Linear)  # one class, as a loaded model has


def quant_parts(fmt, rows=(128, 64, 64), in_f=256, seed=0):
    """QuantLinear layers holding `fmt` weights in the file layout, as the loader leaves them before preparing."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in rows:
        layer = QuantLinear(in_f, n, bias=True, device="meta")
        for key, t in Q.quantized_tensors("layers.0.self_attn.q_proj.weight", torch.randn(n, in_f, generator=g), fmt):
            name = key.rsplit(".", 1)[-1]
            setattr(layer, name, torch.nn.Parameter(t, requires_grad=False) if name == "weight" else t)
        layer.bias = torch.nn.Parameter(torch.randn(n, generator=g).bfloat16(), requires_grad=False)
        out.append(layer)
    return out


def test_plain_layers_merge_into_the_host_class():
    parts = [HostLinear(8, 4), HostLinear(8, 6)]
    merged = merge_linears(parts)
    x = torch.randn(3, 8)
    assert type(merged) is HostLinear and merged.weight.shape == (10, 8)
    assert torch.allclose(merged(x), torch.cat([p(x) for p in parts], -1), atol=1e-6)
    assert merge_linears([torch.nn.Linear(8, 4), HostLinear(8, 4)]) is None
    assert merge_linears([torch.nn.Linear(8, 4), torch.nn.Linear(8, 4, bias=False)]) is None


@pytest.mark.parametrize("fmt,kernel", [("int8", "int8_pack"), ("int4", CPU_INT4), ("fp8", "dequant")])
def test_quantised_parts_merge_and_multiply_as_the_parts_do(fmt, kernel):
    parts, copies = quant_parts(fmt), quant_parts(fmt)
    merged = merge_linears(copies)
    assert merged is not None and merged.out_features == 256 and merged.weight_scale.shape[0] == 256
    for layer in (*parts, merged):
        layer.prepare(torch.bfloat16)
    assert merged.kernel == kernel and all(p.kernel == kernel for p in parts)
    for rows in (1, 2, 24):  # decoding rows on the packed kernel; a prefill's rows dequantise
        x = torch.randn(rows, 256).bfloat16()
        want = torch.cat([p(x) for p in parts], -1)
        assert torch.allclose(merged(x).float(), want.float(), rtol=1e-2, atol=1e-2), rows
    assert merge_linears(parts) is None  # once a kernel is chosen the weights are in its layout: no more merging


def test_quantised_parts_that_cannot_share_a_layout_stay_apart():
    assert merge_linears(quant_parts("int4", rows=(128, 32, 32))) is None  # 32 rows split an int4 tile
    assert merge_linears(quant_parts("int8", rows=(128, 32, 32))) is not None  # int8 keeps rows whole
    assert merge_linears([*quant_parts("int4", rows=(128,)), *quant_parts("int8", rows=(64,))]) is None
    dense = QuantLinear(256, 64, bias=True)
    assert merge_linears([*quant_parts("int8", rows=(64,)), dense]) is None


@pytest.fixture(scope="module")
def tiled_dir(tmp_path_factory):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("ck") / "tiled"), with_vae=False, with_lm_head=False,
                                **TILED)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_a_quantised_model_merges_and_keeps_the_published_tensors(tiled_dir, tmp_path, monkeypatch, fmt, device):
    """On CUDA this checks that int4's packed tiles (8 rows) split at the parts' rows as the CPU's blocks do."""
    path = convert(tiled_dir, str(tmp_path / f"m_{fmt}.safetensors"), fmt)
    merged = ns.load_model(path, dtype="bfloat16", device=device)
    monkeypatch.setattr(NextStep, "fuse_projections", lambda self: 0)
    apart = ns.load_model(path, dtype="bfloat16", device=device)
    monkeypatch.undo()
    kernel = apart.layers[0].self_attn.q_proj.kernel  # what this device offers (probed at load)
    assert device != "cpu" or kernel == {"int8": "int8_pack", "int4": CPU_INT4}[fmt]
    attn, mlp = merged.layers[0].self_attn, merged.layers[0].mlp
    assert attn.qkv_proj.kernel == kernel and mlp.gate_up_proj.kernel == kernel and not hasattr(attn, "q_proj")
    want = apart.state_dict()
    for model in (merged, merged.to(device)):  # a move unpacks, moves and packs the merged layers again
        got = model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k].float(), want[k].float()) for k in want), fmt
    cond = ns.Conditioning(["a cat"])
    settings = ns.SamplerSettings(width=32, height=32, steps=4, seed=1, cfg=3.0)
    a, b = ns.sample(apart, cond, settings).tokens, ns.sample(merged, cond, settings).tokens
    assert float((a - b).norm() / a.norm()) < 1e-2
