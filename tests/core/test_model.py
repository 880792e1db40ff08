"""The decoder: cached decoding equals the full-sequence forward; padding is invisible to real tokens."""
import torch

from nextstep_core.model import KVCache, NextStep, rope_cos_sin
from nextstep_core.testing import random_model_state, tiny_config


def _model(**over):
    cfg = tiny_config("tiny", **over)
    m = NextStep(cfg).eval()
    m.load_state_dict(random_model_state(cfg, seed=3, with_lm_head=False))
    return m


def test_decode_with_cache_equals_full_forward():
    torch.manual_seed(0)
    m = _model()
    x = torch.randn(2, 12, m.config.hidden_size)
    full = m.forward_embeds(x, m.new_cache(2, 12))
    cache = m.new_cache(2, 12)
    steps = [m.forward_embeds(x[:, :5], cache)]
    for i in range(5, 12):
        steps.append(m.forward_embeds(x[:, i:i + 1], cache))
    cached = torch.cat(steps, dim=1)
    assert cache.length == 12
    rel = (cached - full).norm() / full.norm()
    assert rel < 1e-5, rel


def test_left_padding_does_not_reach_real_tokens():
    torch.manual_seed(1)
    m = _model()
    x = torch.randn(1, 10, m.config.hidden_size)
    real = torch.ones(1, 10, dtype=torch.bool)
    real[:, :3] = False
    a = m.forward_embeds(x, m.new_cache(1, 11), real)
    x2 = x.clone()
    x2[:, :3] = torch.randn(1, 3, m.config.hidden_size) * 5  # different pad embeddings
    cache = m.new_cache(1, 11)
    b = m.forward_embeds(x2, cache, real)
    assert torch.isfinite(b).all()
    assert torch.allclose(a[:, 3:], b[:, 3:], atol=1e-6)
    # and a decode step after the padded prefill sees no pad either
    nxt = torch.randn(1, 1, m.config.hidden_size)
    c1 = m.forward_embeds(nxt, cache)
    cache_a = m.new_cache(1, 11)
    m.forward_embeds(x, cache_a, real)
    assert torch.allclose(c1, m.forward_embeds(nxt, cache_a), atol=1e-6)


def test_positions_are_slot_indices_and_rope_makes_padding_harmless():
    """Pads occupy slots (the reference's positions), and since RoPE is relative the real tokens see no change."""
    torch.manual_seed(2)
    m = _model()
    x = torch.randn(1, 6, m.config.hidden_size)
    plain = m.forward_embeds(x, m.new_cache(1, 6))
    padded_x = torch.cat([torch.zeros(1, 2, m.config.hidden_size), x], dim=1)
    real = torch.tensor([[False, False] + [True] * 6])
    cache = m.new_cache(1, 8)
    shifted = m.forward_embeds(padded_x, cache, real)[:, 2:]
    assert cache.length == 8
    assert torch.allclose(plain, shifted, atol=1e-5)


def test_rope_is_rotate_half_with_float32_angles():
    cos, sin = rope_cos_sin(torch.tensor([0, 1, 7]), 8, 10000.0, torch.float32)
    assert torch.allclose(cos[0], torch.ones(8)) and torch.allclose(sin[0], torch.zeros(8))
    inv = 1 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(cos[2, :4], torch.cos(7 * inv)) and torch.allclose(cos[2, 4:], cos[2, :4])


def test_grouped_query_attention_matches_repeated_heads():
    from nextstep_core.model import attention

    torch.manual_seed(4)
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
    assert torch.allclose(attention(q, k, v, None, "sdpa"), ref, atol=1e-6)


def test_kv_cache_size_formula_matches_the_real_model():
    from nextstep_core.config import ModelConfig

    assert KVCache.bytes_per_token(ModelConfig(head_dim=128), torch.bfloat16) == 196608  # 192 KiB per token and row


def test_layer_classes_are_injectable():
    from types import SimpleNamespace

    made = []

    class CountingLinear(torch.nn.Linear):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            made.append(self)

    ops = SimpleNamespace(Linear=CountingLinear, Embedding=torch.nn.Embedding, LayerNorm=torch.nn.LayerNorm)
    with torch.device("meta"):
        m = NextStep(tiny_config("tiny"), operations=ops)
    assert made and all(isinstance(m.layers[0].self_attn.q_proj, CountingLinear) for _ in [0])
    assert isinstance(m.image_head.net.res_blocks[0].adaLN_modulation[1], CountingLinear)
