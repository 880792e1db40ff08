"""The token-embedding table stays on the host: only the embedded prompt goes to the device, tokens are unchanged."""
import pytest
import torch

import nextstep_core as ns
from nextstep_core import Conditioning, SamplerSettings, sample


def test_moving_the_model_leaves_the_table_on_the_host_and_casts_it(tiny_dir):
    m = ns.load_model(tiny_dir, dtype="float32")
    table = m.embed_tokens.weight
    m.to("meta")  # stands in for a GPU: every other weight moves
    assert m.norm.weight.device.type == "meta" and m.layers[0].mlp.down_proj.weight.device.type == "meta"
    assert m.embed_tokens.weight.device.type == "cpu" and m.embed_tokens.weight is table
    m2 = ns.load_model(tiny_dir, dtype="float32").to(torch.bfloat16)
    assert m2.embed_tokens.weight.dtype == torch.bfloat16 and m2.norm.weight.dtype == torch.bfloat16
    assert list(m2.state_dict())[0] == "embed_tokens.weight"  # the published keys as they were
    m.embed_tokens.to("meta")  # a host moving module by module (ComfyUI) cannot move it either
    assert m.embed_tokens.weight.device.type == "cpu"


def test_tokens_are_unchanged_with_the_table_on_the_host(tiny_dir, monkeypatch):
    m = ns.load_model(tiny_dir, dtype="float32")
    settings = SamplerSettings(width=48, height=32, steps=3, cfg=3.0, seed=4)
    host = sample(m, Conditioning(["a cat"]), settings).tokens
    seen = []
    real = m.embed_tokens.forward
    monkeypatch.setattr(m.embed_tokens, "forward", lambda ids: seen.append(ids.device) or real(ids))
    again = sample(m, Conditioning(["a cat"]), settings).tokens
    assert seen and all(d.type == "cpu" for d in seen)
    assert torch.equal(host, again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_table_is_not_in_device_memory(tiny_dir):
    m = ns.load_model(tiny_dir, dtype="float32", device="cuda")
    assert m.embed_tokens.weight.device.type == "cpu" and m.norm.weight.is_cuda
    ref = ns.load_model(tiny_dir, dtype="float32")
    s = SamplerSettings(width=32, height=32, steps=3, seed=1, fast="eager")
    assert torch.allclose(sample(m, Conditioning(["a"]), s).tokens, sample(ref, Conditioning(["a"]), s).tokens,
                          atol=1e-4)
