"""The autoregressive loop: determinism, batching, hooks, cancellation, bad input, editing."""
import re

import pytest
import torch

import nextstep_core as ns
from nextstep_core import Conditioning, GenerationCancelled, NextStepError, SamplerSettings, sample

FAST = dict(width=32, height=32, steps=4, cfg=3.0)


def test_same_seed_is_bit_identical(tiny_model):
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=7, **FAST))
    b = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=7, **FAST))
    c = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=8, **FAST))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.latents, b.latents)
    assert not torch.allclose(a.tokens, c.tokens)


def test_a_batch_equals_single_runs_with_their_seeds(tiny_model):
    batch = sample(tiny_model, Conditioning(["a cat", "the dog"]),
                   SamplerSettings(images_per_prompt=2, seed=10, **FAST))
    order = [("a cat", 10), ("a cat", 11), ("the dog", 12), ("the dog", 13)]
    for i, (p, s) in enumerate(order):
        single = sample(tiny_model, Conditioning([p]), SamplerSettings(seed=s, **FAST))
        assert torch.allclose(batch.tokens[i], single.tokens[0], atol=1e-4), i


def test_prompts_and_guidance_change_the_result(tiny_model):
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=1, **FAST)).tokens
    for other in (Conditioning(["the dog"]), Conditioning(["a cat"], negative_prompt="blurry")):
        assert not torch.allclose(a, sample(tiny_model, other, SamplerSettings(seed=1, **FAST)).tokens, atol=1e-3)


@pytest.mark.parametrize("w,h", [(64, 32), (16, 48)])
def test_non_square_sizes(tiny_model, tiny_vae, w, h):
    r = ns.generate(tiny_model, tiny_vae, ["a wide view"], ns.SamplerSettings(width=w, height=h, steps=3, seed=0))
    assert r.tokens.shape == (1, (w // 16) * (h // 16), 64)
    assert r.latents.shape == (1, 16, h // 8, w // 8) and r.images.shape == (1, 3, h, w)
    assert r.pil()[0].size == (w, h)


def test_progress_fires_once_per_token_with_the_partial_tokens(tiny_model):
    seen = []
    r = sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=48, height=32, steps=2),
               progress=lambda d, t, tok: seen.append((d, t, tok.shape[1])))
    assert seen == [(k, 6, k) for k in range(1, 7)]
    assert r.tokens.shape[1] == 6


def test_cancel_midway_then_the_model_is_reusable(tiny_model):
    calls = []

    def cancel_after_three():
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(GenerationCancelled):
        sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=3, **FAST),
               should_cancel=cancel_after_three)
    assert len(calls) == 4
    fresh = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=3, **FAST))
    again = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(seed=3, **FAST), should_cancel=lambda: False)
    assert torch.equal(fresh.tokens, again.tokens)


def test_all_samplers_and_families_run(tiny_model):
    for s in ns.SAMPLERS:
        r = sample(tiny_model, Conditioning(["x"]), SamplerSettings(sampler=s, **FAST))
        assert torch.isfinite(r.tokens).all(), s


def test_use_norm_normalises_every_token(tiny_model):
    r = sample(tiny_model, Conditioning(["x"]), SamplerSettings(use_norm=True, **FAST))
    assert torch.allclose(r.tokens.mean(-1), torch.zeros(1, 4), atol=1e-5)


def test_editing_three_branch_and_the_cfg1_fix(tiny_model, tiny_vae):
    img = torch.rand(3, 32, 48)
    cond = ns.encode_edit_images(tiny_vae, Conditioning(["<image>make it red"]), [img])
    assert cond.edit_latents[0].shape == (16, 4, 6)
    a = sample(tiny_model, cond, SamplerSettings(cfg=3.0, cfg_img=2.0, width=32, height=32, steps=3, seed=1))
    # cfg = 1 with cfg_img != 1: the reference crashes with a shape error; here it is three-branch guidance
    b = sample(tiny_model, cond, SamplerSettings(cfg=1.0, cfg_img=2.0, width=32, height=32, steps=3, seed=1))
    assert torch.isfinite(b.tokens).all() and not torch.allclose(a.tokens, b.tokens)
    # the input image matters
    other = ns.encode_edit_images(tiny_vae, Conditioning(["<image>make it red"]), [1 - img])
    c = sample(tiny_model, other, SamplerSettings(cfg=3.0, cfg_img=2.0, width=32, height=32, steps=3, seed=1))
    assert not torch.allclose(a.tokens, c.tokens, atol=1e-4)


def test_edit_marker_is_added_when_missing(tiny_vae):
    cond = ns.encode_edit_images(tiny_vae, Conditioning(["make it red"]), [torch.rand(3, 16, 16)])
    assert cond.prompts == ["<image>make it red"]


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=40), "width 40 is not supported.*multiple of 16"),
    (dict(height=0), "height 0"),
    (dict(width=8192), "width 8192"),
    (dict(steps=0), "steps must be a whole number from 1"),
    (dict(cfg=float("nan")), "cfg must be a finite number above 0"),
    (dict(timesteps_shift=0.0), "timesteps_shift must be a finite number above 0"),
    (dict(seed=2**64), "seed must be a whole number from 0"),
    (dict(images_per_prompt=0), "images per prompt"),
    (dict(sampler="dpm"), "unknown sampler"),
    (dict(cfg_schedule="cosine"), "unknown cfg schedule"),
    (dict(noise="shared"), "unknown noise mode"),
])
def test_bad_settings_fail_before_any_compute(tiny_model, kwargs, match):
    args = dict(FAST, **kwargs)
    with pytest.raises(NextStepError, match=match):
        sample(tiny_model, Conditioning(["a"]), SamplerSettings(**args))


@pytest.mark.parametrize("kwargs,match", [
    (dict(use_norm="no"), "use_norm must be True or False, got 'no'"),  # a non-empty string once meant True
    (dict(use_norm=1), "use_norm must be True or False, got 1"),
    (dict(compile=True), "unknown compile mode True"),
    (dict(width=32.0), "width must be a whole number of pixels, got 32.0"),
    (dict(steps=2.5), "steps must be a whole number from 1"),
    (dict(steps_end="2"), "steps_end must be a whole number"),
    (dict(seed=1.0), "seed must be a whole number"),
    (dict(cfg="7.5"), "cfg must be a finite number above 0, got '7.5'"),
    (dict(cfg=True), "cfg must be a finite number above 0, got True"),
    (dict(sampler=["euler"]), "unknown sampler \\['euler'\\]"),
])
def test_settings_of_the_wrong_type_are_refused_with_what_to_pass(tiny_model, kwargs, match):
    with pytest.raises(NextStepError, match=match):
        SamplerSettings(**dict(FAST, **kwargs)).validate()
    with pytest.raises(NextStepError, match=match):
        sample(tiny_model, Conditioning(["a"]), SamplerSettings(**dict(FAST, **kwargs)))


def test_numpy_numbers_are_taken_as_the_python_numbers_they_equal(tiny_model):
    np = pytest.importorskip("numpy")
    given = SamplerSettings(width=np.int64(32), height=np.int32(32), steps=np.int64(4), cfg=np.float32(3.0),
                            seed=np.uint64(7))
    checked = given.validate()
    assert type(checked.width) is int and type(checked.seed) is int and type(checked.cfg) is float
    want = sample(tiny_model, Conditioning(["a"]), SamplerSettings(seed=7, **FAST)).tokens
    assert torch.equal(sample(tiny_model, Conditioning(["a"]), given).tokens, want)


@pytest.mark.parametrize("call,match", [
    (lambda m: sample(m, Conditioning(["a"]), dict(FAST)), "settings must be a SamplerSettings, got dict.*"
                                                           "SamplerSettings\\(\\*\\*d\\)"),
    (lambda m: sample(m, Conditioning(["a"]), {}), "settings must be a SamplerSettings, got dict"),  # not defaults
    (lambda m: sample(m, "a cat", SamplerSettings(**FAST)), "cond must be a Conditioning, got str"),
    (lambda m: sample(m, Conditioning(None), SamplerSettings(**FAST)), "prompts must be a str or a list of str, "
                                                                        "got NoneType"),
    (lambda m: sample(m, Conditioning(["a"]), SamplerSettings(**FAST), init=[torch.zeros(1, 4, 64)]),
     "init must be a TokenInit, got list"),
])
def test_arguments_of_the_wrong_type_say_what_to_pass(tiny_model, call, match):
    with pytest.raises(NextStepError, match=match):
        call(tiny_model)


@pytest.mark.parametrize("token", ["<|image_placeholder|>", "<|begin_of_image|>", "<|end_of_image|>",
                                   "<|image_area|>"])
def test_the_image_layouts_own_tokens_are_refused_in_every_prompt(tiny_model, token):
    """One would open a second image area or add placeholders that no image fills (they break the layout)."""
    for cond, name in ((Conditioning([f"a {token} cat"]), "prompt 0"),
                       (Conditioning(["a cat"], negative_prompt=token), "the negative prompt"),
                       (Conditioning(["a cat"], positive_prompt=f"{token}4*4"), "the positive prompt")):
        with pytest.raises(NextStepError, match=f"{name} contains {re.escape(token)}: the image layout's own "
                                                "tokens cannot be part of a prompt"):
            sample(tiny_model, cond, SamplerSettings(**FAST))


def test_other_special_tokens_are_tokenised_as_the_reference_does(tiny_model):
    res = sample(tiny_model, Conditioning(["a cat<|endoftext|>"]), SamplerSettings(**FAST))
    assert torch.isfinite(res.tokens).all()


def test_bad_prompts_and_images(tiny_model, tiny_vae):
    with pytest.raises(NextStepError, match="no prompt"):
        sample(tiny_model, Conditioning([]), SamplerSettings(**FAST))
    with pytest.raises(NextStepError, match="contains <image> but no input image"):
        sample(tiny_model, Conditioning(["<image>edit"]), SamplerSettings(**FAST))
    with pytest.raises(NextStepError, match="prompt 0 is not valid UTF-8 text \\(byte 0xe9"):
        sample(tiny_model, Conditioning(["caf\udce9"]), SamplerSettings(**FAST))
    with pytest.raises(NextStepError, match="negative prompt is a int, not text"):
        sample(tiny_model, Conditioning(["a"], negative_prompt=3), SamplerSettings(**FAST))
    with pytest.raises(NextStepError, match="2 input image\\(s\\) for 1 prompt"):
        ns.encode_edit_images(tiny_vae, Conditioning(["a"]), [torch.rand(3, 16, 16)] * 2)
    with pytest.raises(NextStepError, match="input image 0 is 20x16.*multiples of 16"):
        ns.encode_edit_images(tiny_vae, Conditioning(["a"]), [torch.rand(3, 16, 20)])
    with pytest.raises(NextStepError, match="cannot read the image photo.png: there is no such file"):
        ns.encode_edit_images(tiny_vae, Conditioning(["a"]), ["photo.png"])  # a path is read by images.read_image
    cond = ns.encode_edit_images(tiny_vae, Conditioning(["<image> <image> twice"]), [torch.rand(3, 16, 16)])
    with pytest.raises(NextStepError, match="exactly one <image>"):
        sample(tiny_model, cond, SamplerSettings(**FAST))
