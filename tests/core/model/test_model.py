"""The decoder: cached decoding equals the full-sequence forward; padding is invisible to real tokens."""
import pytest
import torch

from nextstep_core.model.attention import decode_mask, prefill_mask
from nextstep_core.model.decoder import NextStep, rope_cos_sin
from nextstep_core.model.kv_cache import KVCache
from nextstep_core.weights.testing import random_model_state, tiny_config


def _model(**over):
    cfg = tiny_config("tiny", **over)
    m = NextStep(cfg).eval()
    m.load_state_dict(random_model_state(cfg, seed=3, with_lm_head=False))
    return m


def prefill(m, x, real=None, slots=None):
    """x [B, S, H] at slots 0..S-1 of fresh caches (of `slots` slots, default S), as the loop's prefill runs it."""
    b, n, _ = x.shape
    m.setup_caches(b, slots or n)
    real = torch.ones(b, n, dtype=torch.bool) if real is None else real
    return m(x, torch.arange(n), prefill_mask(real, x.dtype), n)


def decode(m, x, p, start=None, length=None):
    """One token x [B, 1, H] at slot p, attending over `length` slots (default p + 1) from each row's `start`."""
    start = torch.zeros(x.shape[0], dtype=torch.long) if start is None else start
    pos = torch.tensor([p])
    length = length or p + 1
    return m(x, pos, decode_mask(start, pos, length, x.dtype, m.group), length)


def test_decode_with_cache_equals_full_forward():
    torch.manual_seed(0)
    m = _model()
    x = torch.randn(2, 12, m.config.hidden_size)
    full = prefill(m, x)
    steps = [prefill(m, x[:, :5], slots=12)]
    for i in range(5, 12):
        steps.append(decode(m, x[:, i:i + 1], i))
    cached = torch.cat(steps, dim=1)
    rel = (cached - full).norm() / full.norm()
    assert rel < 1e-5, rel


def test_the_whole_cache_under_a_mask_equals_the_filled_slots():
    """The fixed-shape path attends over every slot with the unwritten ones masked: the same result."""
    torch.manual_seed(6)
    m = _model()
    x = torch.randn(2, 9, m.config.hidden_size)
    real = torch.ones(2, 9, dtype=torch.bool)
    real[1, :3] = False
    start = (~real).sum(1)
    prefill(m, x[:, :8], real[:, :8], slots=32)
    m.layers[0].self_attn.kv_cache.k[:, :, 9:] = 1e4  # stale slots from an earlier, longer generation
    a = decode(m, x[:, 8:], 8, start)
    prefill(m, x[:, :8], real[:, :8], slots=32)
    b = decode(m, x[:, 8:], 8, start, length=32)
    assert torch.allclose(a, b, atol=1e-6)


def test_left_padding_does_not_reach_real_tokens():
    torch.manual_seed(1)
    m = _model()
    x = torch.randn(1, 10, m.config.hidden_size)
    real = torch.ones(1, 10, dtype=torch.bool)
    real[:, :3] = False
    start = torch.tensor([3])
    a = prefill(m, x, real, slots=11)
    nxt = torch.randn(1, 1, m.config.hidden_size)
    c_a = decode(m, nxt, 10, start)
    x2 = x.clone()
    x2[:, :3] = torch.randn(1, 3, m.config.hidden_size) * 5  # different pad embeddings
    b = prefill(m, x2, real, slots=11)
    assert torch.isfinite(b).all()
    assert torch.allclose(a[:, 3:], b[:, 3:], atol=1e-6)
    # and a decode step after the padded prefill sees no pad either
    assert torch.allclose(c_a, decode(m, nxt, 10, start), atol=1e-6)


def test_positions_are_slot_indices_and_rope_makes_padding_harmless():
    """Pads occupy slots (the reference's positions), and since RoPE is relative the real tokens see no change."""
    torch.manual_seed(2)
    m = _model()
    x = torch.randn(1, 6, m.config.hidden_size)
    plain = prefill(m, x)
    padded_x = torch.cat([torch.zeros(1, 2, m.config.hidden_size), x], dim=1)
    real = torch.tensor([[False, False] + [True] * 6])
    shifted = prefill(m, padded_x, real)[:, 2:]
    assert torch.allclose(plain, shifted, atol=1e-5)


def test_rope_is_rotate_half_with_float32_angles():
    cos, sin = rope_cos_sin(torch.tensor([0, 1, 7]), 8, 10000.0, torch.float32)
    assert torch.allclose(cos[0], torch.ones(8)) and torch.allclose(sin[0], torch.zeros(8))
    inv = 1 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    assert torch.allclose(cos[2, :4], torch.cos(7 * inv)) and torch.allclose(cos[2, 4:], cos[2, :4])


def test_grouped_query_attention_matches_repeated_heads():
    from nextstep_core.model.attention import attention

    torch.manual_seed(4)
    q, k, v = torch.randn(2, 8, 3, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
    assert torch.allclose(attention(q, k, v, None, "sdpa"), ref, atol=1e-6)


def test_kv_cache_size_formula_matches_the_real_model():
    from nextstep_core.weights.config import ModelConfig

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


def test_merged_projections_equal_the_separate_ones():
    torch.manual_seed(5)
    separate, merged = _model(), _model()
    assert merged.fuse_projections() == 2 * merged.config.num_hidden_layers
    attn, mlp = merged.layers[0].self_attn, merged.layers[0].mlp
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj") and mlp.gate_up_proj is not None
    x = torch.randn(2, 7, merged.config.hidden_size)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[0, :2] = False
    a = prefill(separate, x, real)
    b = prefill(merged, x, real)
    assert torch.allclose(a, b, atol=1e-5)
    # the published keys stay: state_dict splits the merged layers back, load_state_dict takes the parts
    published = separate.state_dict()
    assert set(merged.state_dict()) == set(published)
    assert all(torch.equal(v, published[k]) for k, v in merged.state_dict().items())
    again = _model()
    again.fuse_projections()
    again.load_state_dict({k: v + 1 for k, v in published.items()})
    v_bias = published["layers.1.self_attn.v_proj.bias"]
    assert torch.equal(again.layers[1].self_attn.qkv_proj.bias[-len(v_bias):], v_bias + 1)


def test_rms_norm_is_the_reference_float32_formula():
    """fp32: the reference's formula. bf16: float32 statistics as the reference, the weight applied before the one
    rounding (the reference rounds before and after it), so at most one bf16 step apart."""
    from nextstep_core.model.decoder import RMSNorm

    torch.manual_seed(6)
    norm = RMSNorm(64, 1e-5)
    norm.weight.data = 1 + 0.2 * torch.randn(64)
    x = 3 * torch.randn(4, 5, 64)
    assert torch.allclose(norm(x), norm.reference(x), atol=1e-6, rtol=1e-6)
    n, xb = norm.to(torch.bfloat16), x.to(torch.bfloat16)
    fast, ref = n(xb), n.reference(xb)
    xf = xb.float()
    once = (n.weight.float() * xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert fast.dtype == torch.bfloat16 and torch.equal(fast, once)
    assert ((fast.float() - ref.float()).abs() <= ref.float().abs() * 2 ** -7).all()  # one bf16 step at most


def test_table_rope_equals_rotate_half():
    from nextstep_core.model.decoder import apply_rope, rope, rope_table

    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 16)  # [B, S, H, D]
    positions = torch.tensor([4, 9, 30])
    cos, sin = rope_cos_sin(positions, 16, 1e6, torch.float32)
    ref = apply_rope(x.transpose(1, 2), cos, sin).transpose(1, 2)
    out = rope(x, rope_table(40, 16, 1e6, torch.float32, "cpu")[positions])
    assert torch.allclose(out, ref, atol=1e-6)


@pytest.mark.parametrize("masked", [False, True])
def test_single_token_grouped_attention_equals_repeated_heads(masked):
    """One query token: the group's heads become query rows against their K/V head (no repeat, no math fallback)."""
    from nextstep_core.model.attention import attention

    torch.manual_seed(8)
    q, k, v = torch.randn(3, 8, 1, 16), torch.randn(3, 2, 11, 16), torch.randn(3, 2, 11, 16)
    mask = torch.rand(3, 1, 1, 11) > 0.3 if masked else None
    if masked:
        mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1),
                                                           attn_mask=mask)
    assert torch.allclose(attention(q, k, v, mask, "sdpa"), ref, atol=1e-6)
    if masked:  # the fixed-shape path's additive mask (0 / -inf) is the same mask
        bias = torch.where(mask, 0.0, float("-inf"))
        assert torch.allclose(attention(q, k, v, bias, "sdpa"), ref, atol=1e-6)
