"""Parity with the official NextStep-1.1 pipeline: same checkpoint, prompts, settings and noise -> the same image.

The reference is StepFun's GitHub inference code for 1.1 (`inference/gen_pipeline.py` + `inference/nextstep_model.py`
at commit d6759c2, "L-GH" in the reference notes §14), run once on this project's tiny NextStep-1.1 checkpoint (see
golden/README.md). Its samplers draw fresh noise inside the flow-matching head, so the golden file records every draw
in order and these tests feed exactly those draws to our engine instead of its own generator.

What the official 1.1 pipeline does, and therefore what is asserted here:
- rows: [cond × B] + [image + negative × B if cfg_img != 1] + [negative × B if cfg != 1], B = prompts × images per
  prompt, caption-major; BOS is prepended to every row iff the tokenizer has a bos_token, and the prefix
  "<|image_area|>h*w" loses its first id in that case; then <|begin_of_image|>. Left padding.
- per token k of T: guidance scale `constant`, or 1.1's `linear` = max(cfg/2, 1 + (cfg-1)·k/T) (rising);
- time grid t_j = S_s(j/N), j < N, then 1.0; N updates, each on noise of shape [B, 64] drawn per row:
  x0 first, then one draw per update for "sde" (Flow-GRPO, noise level 0.8) and "cps" (Flow-CPS), none for the ODE
  (any other sde_type, our "euler");
- optional per-token LayerNorm (use_norm), the normalised token is fed back; unpatchify with (h, w), so non-square
  sizes work; edits encode the input with the VAE (posterior mean, per-token LayerNorm) and put it on the
  placeholders of the cond and image+negative rows.
Round-off between the two float32 implementations is ~1e-6 on tokens; the gates are 1e-4 and 2/255 per pixel.
"""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import nextstep_core as ns
from tests.core.golden_checks import assert_matches_golden, assert_same_prompt_ids, settings_of
from nextstep_core.generation import loop as generation

HERE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "golden")
CASES = json.load(open(os.path.join(HERE, "cases_v11.json")))
IDS = [c["name"] for c in CASES]


@pytest.fixture(scope="module")
def golden():
    return np.load(os.path.join(HERE, "reference_v11_tiny.npz"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The tiny 1.1 checkpoint, and the same with a tokenizer that has a BOS token (for the BOS case)."""
    from nextstep_core.weights.testing import make_tiny_checkpoint

    cache = {}

    def get(bos):
        if bos not in cache:
            d = make_tiny_checkpoint(str(tmp_path_factory.mktemp("golden_v11") / "ckpt"), size="tiny", seed=0,
                                     family="nextstep-1.1")
            if bos is not None:  # the reference run used a copy whose tokenizer_config.json names this bos_token
                path = os.path.join(d, "tokenizer_config.json")
                cfg = json.load(open(path))
                cfg["bos_token"] = bos
                json.dump(cfg, open(path, "w"), indent=1)
            cache[bos] = ns.load_model(d, dtype="float32"), ns.load_vae(d + "/vae")
        return cache[bos]

    return get


def _images(case):
    out = []
    for spec in case.get("images") or []:
        path, flip = (spec["path"], spec.get("flip")) if isinstance(spec, dict) else (spec, False)
        img = Image.open(os.path.join(HERE, path)).convert("RGB")
        out.append(img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img)
    return out


class _RecordedNoise:
    """Stands in for generation.NoiseSource: hands out the reference's draws, token by token, as [draws, B, 64]."""

    def __init__(self, noise):
        self.noise, self.k = noise, 0

    def next(self, draws):
        assert draws == self.noise.shape[1], f"engine wants {draws} draws per token, the reference made " \
                                             f"{self.noise.shape[1]}"
        z = torch.from_numpy(self.noise[self.k].copy())
        self.k += 1
        return z


def _run(checkpoints, case, noise, monkeypatch):
    model, vae = checkpoints(case.get("tokenizer_bos"))
    cond = ns.Conditioning(case["captions"], case["positive_prompt"], case["negative_prompt"])
    if case.get("images"):
        cond = ns.encode_edit_images(vae, cond, _images(case))
    replay = _RecordedNoise(noise)
    monkeypatch.setattr(generation, "NoiseSource", lambda *a, **k: replay)
    res = ns.sample(model, cond, settings_of(case))
    assert replay.k == noise.shape[0], "every recorded token's noise must be consumed"
    return cond, res, ns.decode_latents(vae, res.latents)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_the_official_v11_pipeline(checkpoints, golden, case, monkeypatch):
    n = case["name"]
    cond, res, images = _run(checkpoints, case, golden[f"{n}/noise"], monkeypatch)
    assert_matches_golden(golden, n, "latents", cond, res, images)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_same_rows_token_ids_and_padding(checkpoints, golden, case):
    model, _ = checkpoints(case.get("tokenizer_bos"))
    assert_same_prompt_ids(golden, case, model, [img.size for img in _images(case)] if case.get("images") else None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_guidance_schedule_and_noise_shape(golden, case):
    from nextstep_core.model.family import NEXTSTEP_1_1
    from nextstep_core.generation.sampling import cfg_at

    n = case["name"]
    noise = golden[f"{n}/noise"]
    T = noise.shape[0]
    ours = [(cfg_at(k, T, case["cfg"], case["cfg_schedule"], NEXTSTEP_1_1),
             cfg_at(k, T, case["cfg_img"], case["cfg_schedule"], NEXTSTEP_1_1)) for k in range(T)]
    np.testing.assert_allclose(np.array(ours), golden[f"{n}/cfg_per_step"], rtol=0, atol=1e-6)
    # one draw per row (not per image index, not tiled over prompts): B = prompts × images per prompt
    B = len(case["captions"]) * case["num_images_per_caption"]
    draws = NEXTSTEP_1_1.draws_needed(case["num_sampling_steps"], stochastic=case["sampler"] != "euler")
    assert noise.shape[1:] == (draws, B, 64)


def test_official_noise_is_one_seeded_stream(golden):
    """The reference seeds torch's global generator with `seed` right before tokenising (after any VAE encode) and
    then draws randn([B, 64]) per use, so a token's draws are consecutive slices of one stream."""
    for case in CASES:
        assert bool(golden[f"{case['name']}/noise_is_seeded_stream"]), case["name"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_reference_noise_mode_reproduces_the_official_v11_draws(checkpoints, golden, case):
    """Without injected noise: noise="reference" with the same seed must give the official tokens.

    NextStep-1.1 draws one noise row per image (untiled) and seeds after the VAE encode, unlike NextStep-1."""
    model, vae = checkpoints(case.get("tokenizer_bos"))
    cond = ns.Conditioning(case["captions"], case["positive_prompt"], case["negative_prompt"])
    if case.get("images"):
        cond = ns.encode_edit_images(vae, cond, _images(case))
    res = ns.sample(model, cond, settings_of(case, noise="reference"))
    assert np.abs(res.tokens.numpy() - golden[f"{case['name']}/tokens"]).max() < 1e-4
