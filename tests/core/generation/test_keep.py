"""Teacher forcing: kept tokens are fed back exactly as given, skip the head and still consume their noise."""
import pytest
import torch

import nextstep_core as ns
import nextstep_core.generation.step as G
from nextstep_core import Conditioning, NextStepError, SamplerSettings, TokenInit, keep_from_mask, keep_rows, sample

# 64x48 pixels: a 3-row x 4-column token grid
BASE = SamplerSettings(width=64, height=48, steps=4, cfg=3.0, seed=5)
H, W = 3, 4


def count_head_calls(monkeypatch) -> list:
    calls = []
    real = G.sample_token

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(G, "sample_token", spy)
    return calls


@pytest.mark.parametrize("fast", ["eager", "static"])
def test_keep_everything_returns_the_init_tokens_and_never_runs_the_head(tiny_model, monkeypatch, fast):
    init = torch.randn(1, H * W, 64)
    calls = count_head_calls(monkeypatch)
    res = sample(tiny_model, Conditioning(["a cat"]), BASE.replace(fast=fast),
                 init=TokenInit(init, torch.ones(H * W, dtype=torch.bool)))
    assert torch.equal(res.tokens, init)
    assert calls == []


@pytest.mark.parametrize("family", ["nextstep-1", "nextstep-1.1"])
@pytest.mark.parametrize("fast", ["eager", "static"])
def test_rerolling_the_bottom_with_the_same_seed_reproduces_the_image_bit_for_bit(tmp_path, family, fast):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    model = ns.load_model(make_tiny_checkpoint(str(tmp_path / family), family=family, with_vae=False),
                          dtype="float32")
    settings = ns.family_defaults(family).replace(width=64, height=48, steps=4, cfg=3.0, seed=5, fast=fast,
                                                  images_per_prompt=2)
    cond = Conditioning(["a cat"], negative_prompt="blurry")
    full = sample(model, cond, settings)
    for k in range(H + 1):
        again = sample(model, cond, settings, init=TokenInit(full.tokens, keep_rows(k, H, W)))
        assert torch.equal(again.tokens, full.tokens), k  # kept tokens consumed their draws: the same stream


def test_another_seed_keeps_the_rows_and_changes_the_rest(tiny_model):
    cond = Conditioning(["a cat"])
    full = sample(tiny_model, cond, BASE)
    keep = keep_rows(1, H, W)
    other = sample(tiny_model, cond, BASE.replace(seed=6), init=TokenInit(full.tokens, keep))
    assert torch.equal(other.tokens[:, keep], full.tokens[:, keep])
    assert not torch.allclose(other.tokens[:, ~keep], full.tokens[:, ~keep], atol=1e-3)


def test_kept_tokens_skip_the_head(tiny_model, monkeypatch):
    full = sample(tiny_model, Conditioning(["a cat"]), BASE)
    keep = keep_rows(2, H, W)
    calls = count_head_calls(monkeypatch)
    sample(tiny_model, Conditioning(["a cat"]), BASE, init=TokenInit(full.tokens, keep))
    assert len(calls) == int((~keep).sum())  # one head call per regenerated token, none for the kept ones


def test_nothing_runs_after_the_last_regenerated_token(tiny_model, monkeypatch):
    """A hole in the middle: the kept tokens after it are copied, with no head call and no decoder step."""
    full = sample(tiny_model, Conditioning(["a cat"]), BASE)
    keep = torch.ones(H * W, dtype=torch.bool)
    keep[5] = False
    calls = count_head_calls(monkeypatch)
    steps = []
    real = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda *a, **k: steps.append(1) or real(*a, **k))
    res = sample(tiny_model, Conditioning(["a cat"]), BASE, init=TokenInit(full.tokens, keep))
    assert torch.equal(res.tokens, full.tokens)
    assert len(calls) == 1 and len(steps) == 1 + 6  # the prefill, then tokens 0..5 fed back


def test_kept_tokens_are_seen_by_the_tokens_after_them(tiny_model):
    """Teacher forcing, not pasting: changing a kept token changes what is generated after it."""
    cond = Conditioning(["a cat"])
    full = sample(tiny_model, cond, BASE)
    keep = keep_rows(1, H, W)
    edited = full.tokens.clone()
    edited[:, 0] += 1.0
    res = sample(tiny_model, cond, BASE, init=TokenInit(edited, keep))
    assert torch.equal(res.tokens[:, keep], edited[:, keep])
    assert not torch.allclose(res.tokens[:, ~keep], full.tokens[:, ~keep], atol=1e-4)


def test_each_image_can_have_its_own_mask(tiny_model):
    settings = BASE.replace(images_per_prompt=2)
    cond = Conditioning(["a cat"])
    full = sample(tiny_model, cond, settings)
    init = torch.randn(2, H * W, 64)
    keep = torch.stack([torch.ones(H * W, dtype=torch.bool), torch.zeros(H * W, dtype=torch.bool)])
    res = sample(tiny_model, cond, settings, init=TokenInit(init, keep))
    assert torch.equal(res.tokens[0], init[0])  # image 0 kept whole
    assert torch.allclose(res.tokens[1], full.tokens[1], atol=1e-5)  # image 1 generated as if alone


def test_previews_show_the_kept_tokens_from_the_start(tiny_model):
    full = sample(tiny_model, Conditioning(["a cat"]), BASE)
    seen = []
    keep = keep_rows(2, H, W)
    sample(tiny_model, Conditioning(["a cat"]), BASE, init=TokenInit(full.tokens, keep),
           progress=lambda done, total, tokens: seen.append(tokens.clone()))
    assert torch.equal(seen[0][:, keep], full.tokens[:, keep])


def test_init_from_latents_round_trips_the_samplers_own_output(tiny_model, tiny_vae):
    affine = (tiny_vae.config.scaling_factor, tiny_vae.config.shift_factor)
    res = sample(tiny_model, Conditioning(["a cat"]), BASE, latent_affine=affine)
    init = TokenInit.from_latents(res.latents, tiny_model.config, affine, keep=keep_rows(H, H, W))
    assert torch.allclose(init.tokens, res.tokens, atol=1e-5)


def test_editing_keeps_and_regenerates_the_edited_output(tiny_model, tiny_vae):
    cond = ns.encode_edit_images(tiny_vae, Conditioning(["<image>make it red"]), [torch.rand(3, 48, 64)])
    settings = BASE.replace(cfg_img=2.0, timesteps_shift=3.2)
    edited = sample(tiny_model, cond, settings)
    again = sample(tiny_model, cond, settings, init=TokenInit(edited.tokens, keep_rows(1, H, W)))
    assert torch.equal(again.tokens, edited.tokens)
    other = sample(tiny_model, cond, settings.replace(seed=9), init=TokenInit(edited.tokens, keep_rows(1, H, W)))
    assert torch.equal(other.tokens[:, :W], edited.tokens[:, :W])


def test_pixel_masks_become_token_masks():
    mask = torch.zeros(48, 64)
    mask[20, 40] = 1.0  # one pixel in token row 1, column 2
    keep = keep_from_mask(mask, H, W)
    assert keep.shape == (1, H * W) and int((~keep).sum()) == 1 and not keep[0, 1 * W + 2]
    half = torch.zeros(48, 64)
    half[16:24, 0:16] = 1.0  # half of token (1, 0)
    assert not keep_from_mask(half, H, W)[0, W]
    assert keep_from_mask(half, H, W, threshold=0.5)[0, W]  # at most half masked: kept
    latent_res = torch.zeros(1, 1, 6, 8)  # a mask at latent resolution (H/8, W/8) is resized first
    latent_res[..., 4:, :] = 1.0
    assert torch.equal(keep_from_mask(latent_res, H, W)[0], keep_rows(2, H, W))


def test_keep_rows_and_bad_inputs(tiny_model):
    assert keep_rows(0, H, W).sum() == 0 and keep_rows(H, H, W).all()
    with pytest.raises(NextStepError, match="outside the image's 3 token rows"):
        keep_rows(4, H, W)
    with pytest.raises(NextStepError, match="needs \\[batch, 12, 64\\]"):
        sample(tiny_model, Conditioning(["a"]), BASE, init=TokenInit(torch.zeros(1, 6, 64), keep_rows(1, H, W)))
    with pytest.raises(NextStepError, match="keep mask has shape"):
        sample(tiny_model, Conditioning(["a"]), BASE, init=TokenInit(torch.zeros(1, 12, 64), torch.ones(5)))
    with pytest.raises(NextStepError, match="3 init tokens for 2 images"):
        sample(tiny_model, Conditioning(["a"]), BASE.replace(images_per_prompt=2),
               init=TokenInit(torch.zeros(3, 12, 64), keep_rows(1, H, W)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_init_is_refused_before_it_spreads_into_every_later_token(tiny_model, bad):
    res = sample(tiny_model, Conditioning(["a"]), BASE)
    tokens = res.tokens.clone()
    tokens[0, 1, 5] = bad
    with pytest.raises(NextStepError, match="the init tokens hold 1 NaN or infinite value"):
        TokenInit(tokens, keep_rows(1, H, W))
    latents = res.latents.clone()
    latents[0, 3, 0, 0] = bad
    with pytest.raises(NextStepError, match="the init latents hold 1 NaN or infinite value"):
        TokenInit.from_latents(latents, tiny_model.config, tiny_model.latent_affine, keep_rows(1, H, W))


def test_an_init_of_the_wrong_type_says_what_to_pass():
    np = pytest.importorskip("numpy")
    with pytest.raises(NextStepError, match="TokenInit's tokens must be a torch tensor, got ndarray: convert it "
                                            "with torch.from_numpy"):
        TokenInit(np.zeros((1, H * W, 64), np.float32), keep_rows(1, H, W))
    with pytest.raises(NextStepError, match="TokenInit's keep mask must be a torch tensor, got list"):
        TokenInit(torch.zeros(1, H * W, 64), [True] * (H * W))
    with pytest.raises(NextStepError, match="init tokens must be floating point"):
        TokenInit(torch.zeros(1, H * W, 64, dtype=torch.long), keep_rows(1, H, W))
    with pytest.raises(NextStepError, match="init latents must be a torch tensor, got ndarray"):
        TokenInit.from_latents(np.zeros((1, 16, 6, 8), np.float32), None)


@pytest.mark.parametrize("k", [1.5, 1.0, "1", None, True])
def test_keep_rows_takes_a_whole_number_of_rows(k):
    with pytest.raises(NextStepError, match="keep_rows takes a whole number of token rows"):
        keep_rows(k, H, W)


def test_empty_or_non_tensor_masks_say_what_to_pass():
    with pytest.raises(NextStepError, match="the mask is empty"):
        keep_from_mask(torch.zeros(0, 0), H, W)
    with pytest.raises(NextStepError, match="the mask is empty"):
        keep_from_mask(torch.zeros(1, 0, 64), H, W)
    with pytest.raises(NextStepError, match="a mask must be a torch tensor, got list"):
        keep_from_mask([[0.0] * 64] * 48, H, W)
    with pytest.raises(NextStepError, match="token grid must be whole numbers"):
        keep_from_mask(torch.zeros(48, 64), 0, W)
    with pytest.raises(NextStepError, match="a noise_mask must be a torch tensor"):
        ns.keep_from_noise_mask(None, 1, H, W)
