"""Variation strength (`denoise`): with an init, each regenerated token's flow starts part-way along the family's time
grid, from its init token mixed with its own noise; 1 is a fresh generation, 0 the init itself."""
import pytest
import torch

import nextstep_core as ns
from nextstep_core import Conditioning, NextStepError, TokenInit, keep_rows, sample
from nextstep_core.generation.sampling import start_step

H, W = 3, 4  # a 64x48 image


def settings(family="nextstep-1", **kw):
    return ns.family_defaults(family).replace(**{**dict(width=64, height=48, steps=8, cfg=3.0, seed=5), **kw})


@pytest.fixture(scope="module")
def init_tokens(tiny_model):
    """Tokens of another image, as a variation's starting point."""
    return sample(tiny_model, Conditioning(["a dog"]), settings(seed=99)).tokens


def test_denoise_one_is_the_fresh_generation_bit_for_bit(tiny_model, init_tokens):
    fresh = sample(tiny_model, Conditioning(["a cat"]), settings())
    with_init = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=1.0),
                       init=TokenInit(init_tokens, torch.zeros(H * W, dtype=torch.bool)))
    assert torch.equal(fresh.tokens, with_init.tokens)


def test_denoise_zero_returns_the_init_tokens_exactly_and_runs_no_head(tiny_model, init_tokens, monkeypatch):
    import nextstep_core.generation.step as S

    calls = []
    real = S.sample_token
    monkeypatch.setattr(S, "sample_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    res = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=0.0),
                 init=TokenInit(init_tokens, torch.zeros(H * W, dtype=torch.bool)))
    assert torch.equal(res.tokens, init_tokens) and not calls


@pytest.mark.parametrize("family,sampler", [("nextstep-1", "euler_maruyama"), ("nextstep-1", "euler"),
                                            ("nextstep-1.1", "flow_sde"), ("nextstep-1.1", "flow_cps")])
def test_the_distance_from_the_init_grows_with_strength(tmp_path, family, sampler):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    model = ns.load_model(make_tiny_checkpoint(str(tmp_path / family), family=family, with_vae=False),
                          dtype="float32")
    init = sample(model, Conditioning(["a dog"]), settings(family, seed=99, sampler=sampler)).tokens
    start = TokenInit(init, torch.zeros(H * W, dtype=torch.bool))
    dist = [float((sample(model, Conditioning(["a cat"]), settings(family, denoise=d, sampler=sampler),
                          init=start).tokens - init).norm()) for d in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert dist[0] == 0.0
    assert all(a < b for a, b in zip(dist, dist[1:])), dist


def test_kept_tokens_stay_exact_at_any_strength(tiny_model, init_tokens):
    keep = keep_rows(1, H, W)
    for d in (0.3, 0.7):
        res = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=d), init=TokenInit(init_tokens, keep))
        assert torch.equal(res.tokens[:, keep], init_tokens[:, keep])
        assert not torch.equal(res.tokens[:, ~keep], init_tokens[:, ~keep])


def test_a_variation_consumes_the_noise_of_a_full_run_and_reproduces(tiny_model, init_tokens, monkeypatch):
    from nextstep_core.generation import noise

    draws = []
    real = noise.NoiseSource.next
    monkeypatch.setattr(noise.NoiseSource, "next", lambda self, n: draws.append(n) or real(self, n))
    start = TokenInit(init_tokens, torch.zeros(H * W, dtype=torch.bool))
    a = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=0.5), init=start)
    full = list(draws)
    draws.clear()
    sample(tiny_model, Conditioning(["a cat"]), settings(), init=start)
    assert full == draws  # the same draws per token as a fresh generation: the stream after it is unchanged
    b = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=0.5), init=start)
    assert torch.equal(a.tokens, b.tokens)


def test_the_start_is_where_the_strength_says_on_the_grid():
    assert [start_step(d, 8) for d in (1.0, 0.75, 0.5, 0.25, 0.0)] == [0, 2, 4, 6, 8]


def test_the_fixed_shape_path_varies_the_same_way(tiny_model, init_tokens):
    start = TokenInit(init_tokens, keep_rows(1, H, W))
    a = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=0.6, fast="eager"), init=start)
    b = sample(tiny_model, Conditioning(["a cat"]), settings(denoise=0.6, fast="static"), init=start)
    assert b.path == "static" and torch.allclose(a.tokens, b.tokens, atol=1e-4)
    tiny_model.release_step_cache()


def test_strength_below_one_needs_an_init_and_a_number_from_zero_to_one(tiny_model):
    with pytest.raises(NextStepError, match="needs an init"):
        sample(tiny_model, Conditioning(["a cat"]), settings(denoise=0.5))
    for bad in (-0.1, 1.5, float("nan"), "half", True):
        with pytest.raises(NextStepError, match="denoise must be a number from 0 to 1"):
            settings(denoise=bad).validate()
