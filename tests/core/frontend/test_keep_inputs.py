"""Keep inputs from outside the engine: ComfyUI noise_masks, and the command line's init files and masks."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep_core import (Conditioning, NextStepError, SamplerSettings, TokenInit, encode_edit_images,
                           encode_latents, keep_from_noise_mask, keep_rows, sample)
from nextstep_core.generation.prompt import patchify
from nextstep_core.frontend.keep_inputs import check_keep_inputs
from tests.core.frontend.test_cli import cli, one_error_line, run_main


# ---- noise_mask, read as core KSampler reads it ----------------------------------------------------------------

def test_noise_mask_at_latent_resolution_regenerates_tokens_with_any_masked_cell():
    mask = torch.zeros(1, 1, 4, 6)  # 2 x 3 tokens
    mask[0, 0, 3, 5] = 0.25  # one latent cell of the last token, partly masked
    keep = keep_from_noise_mask(mask, 1, 2, 3)
    assert keep.tolist() == [[True, True, True, True, True, False]]


def test_noise_mask_at_pixel_resolution_is_resized_bilinearly_to_the_latent_grid():
    mask = torch.zeros(32, 48)
    mask[16:, 16:32] = 1.0  # exactly the middle token of the bottom row
    assert keep_from_noise_mask(mask, 1, 2, 3).tolist() == [[True, True, True, True, False, True]]
    sliver = torch.zeros(32, 48)
    sliver[:, 0] = 1.0  # a one-pixel column: KSampler's bilinear resize samples between pixels 3 and 4, not 0
    assert keep_from_noise_mask(sliver, 1, 2, 3).all()


def test_noise_masks_repeat_over_the_batch_like_ksampler():
    one = torch.ones(1, 1, 4, 6)
    assert keep_from_noise_mask(one, 3, 2, 3).shape == (3, 6)
    two = torch.stack([torch.zeros(4, 6), torch.ones(4, 6)])[:, None]
    keep = keep_from_noise_mask(two, 3, 2, 3)  # tiled: image 2 takes the first mask again
    assert keep.all(1).tolist() == [True, False, True]


def test_a_noise_mask_that_is_not_an_image_is_an_error():
    with pytest.raises(NextStepError, match="noise_mask"):
        keep_from_noise_mask(torch.ones(5), 1, 2, 2)


# ---- files for the command line, checked before any model loads ------------------------------------------------

def _png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return str(path)


def test_init_image_and_mask_decide_size_and_kept_tokens(tmp_path):
    image = _png(tmp_path / "in.png", np.full((32, 48, 3), 128))
    mask = np.zeros((32, 48))
    mask[20, 40] = 255  # one white pixel in the last token
    mask[5, 5] = 100  # darker than mid-grey (e.g. JPEG noise): kept
    keep = check_keep_inputs(init_image=image, mask=_png(tmp_path / "m.png", mask))
    assert (keep.width, keep.height) == (48, 32) and keep.pixels.shape == (1, 3, 32, 48)
    assert keep.keep.tolist() == [[True, True, True, True, True, False]]
    assert check_keep_inputs(init_image=image, rows=1, width=48, height=32).keep.tolist() == [[True] * 3 + [False] * 3]


def test_init_latents_keep_their_tokens(tmp_path):
    tokens = np.random.default_rng(0).standard_normal((2, 6, 64)).astype(np.float32)
    np.savez(tmp_path / "l.npz", tokens=tokens, latents=np.zeros((2, 16, 4, 6), np.float32))
    keep = check_keep_inputs(init_latents=str(tmp_path / "l.npz"), rows=2)
    assert (keep.width, keep.height) == (48, 32) and torch.equal(keep.tokens, torch.from_numpy(tokens))


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask="m.png"), "add --init-image or --init-latents"),
    (dict(rows=2), "add --init-image or --init-latents"),
    (dict(init_image="in.png", init_latents="l.npz", rows=1), "not both"),
    (dict(init_image="in.png"), "say what to keep"),
    (dict(init_image="in.png", mask="m.png", rows=1), "say what to keep"),
    (dict(init_image="missing.png", rows=1), "--init-image: cannot read the image .* no such file"),
    (dict(init_image="notes.txt", rows=1), "--init-image: cannot read the image"),
    (dict(init_image="odd.png", rows=1), "multiples of 16"),
    (dict(init_image="in.png", rows=1, width=64, height=32), "leave them out or give 48x32"),
    (dict(init_image="in.png", rows=3), "outside the image's 2 token rows"),
    (dict(init_image="in.png", mask="small.png"), "must be the output's size, 48x32"),
    (dict(init_latents="bad.npz", rows=1), "needs 'latents'"),
    (dict(init_latents="mismatch.npz", rows=1), "do not match"),
])
def test_bad_keep_inputs_say_what_to_fix(tmp_path, kwargs, message):
    _png(tmp_path / "in.png", np.zeros((32, 48, 3)))
    _png(tmp_path / "m.png", np.zeros((32, 48)))
    _png(tmp_path / "small.png", np.zeros((16, 16)))
    _png(tmp_path / "odd.png", np.zeros((40, 40, 3)))
    (tmp_path / "notes.txt").write_text("not an image")
    np.savez(tmp_path / "bad.npz", tokens=np.zeros((1, 6, 64), np.float32))
    np.savez(tmp_path / "mismatch.npz", tokens=np.zeros((1, 5, 64), np.float32),
             latents=np.zeros((1, 16, 4, 6), np.float32))
    paths = {k: str(tmp_path / v) if k in ("init_image", "init_latents", "mask") else v for k, v in kwargs.items()}
    with pytest.raises(NextStepError, match=message):
        check_keep_inputs(**paths)


def _npz_declaring(path, shape):
    """An .npz whose 'latents' member declares `shape` (zeros, deflated: a small file for a large array)."""
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("latents.npy", "w", force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
        row = bytes(4 * shape[-1])
        for _ in range(int(np.prod(shape[:-1]))):
            f.write(row)
    return str(path)


def test_an_npz_declaring_more_than_any_image_is_refused_from_its_header(tmp_path, monkeypatch):
    path = _npz_declaring(tmp_path / "huge.npz", (1, 16, 520, 520))  # 4160x4160 pixels: above MAX_SIDE
    assert os.path.getsize(path) < 100_000
    monkeypatch.setattr(np, "frombuffer", lambda *a, **k: pytest.fail("the data was read"))
    with pytest.raises(NextStepError, match=r"'latents' declares shape \[1, 16, 520, 520\], which is not the "
                                            r"latents of images this engine makes \(at most 4096x4096 pixels"):
        check_keep_inputs(init_latents=path, rows=1)


@pytest.mark.parametrize("what,write,message", [
    ("npy", lambda p: np.save(open(p, "wb"), np.zeros((1, 16, 4, 6), np.float32)),
     "is not an .npz file \\(it is a single .npy array; write latents with numpy.savez"),
    ("png", lambda p: Image.new("RGB", (48, 32)).save(p, format="PNG"),
     "is not an .npz file \\(it is an image: give images with --init-image\\)"),
    ("text", lambda p: open(p, "w").write("tokens"), "is not an .npz file: give the .npz"),
    ("objects", lambda p: np.savez(p, latents=np.array([None] * 4, dtype=object)), "holds object values, not numbers"),
])
def test_a_file_that_is_no_latents_npz_is_one_line_without_a_pickle_hint(tmp_path, what, write, message):
    path = str(tmp_path / "l.npz")
    write(path)
    with pytest.raises(NextStepError, match=message) as e:
        check_keep_inputs(init_latents=path, rows=1)
    assert "pickle" not in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("key", ["tokens", "latents"])
def test_nan_in_saved_latents_is_refused_before_the_model_loads(tmp_path, key):
    arrays = dict(tokens=np.zeros((1, 6, 64), np.float32), latents=np.zeros((1, 16, 4, 6), np.float32))
    arrays[key].flat[3] = np.nan
    np.savez(tmp_path / "l.npz", **arrays)
    with pytest.raises(NextStepError, match=f"'{key}' holds 1 NaN or infinite value"):
        check_keep_inputs(init_latents=str(tmp_path / "l.npz"), rows=1)


@pytest.mark.parametrize("arrays,extra,message", [
    (dict(latents=np.zeros((1, 8, 4, 6), np.float32)), [], "the init latents have 8 channels, this model takes 16"),
    (dict(tokens=np.zeros((1, 6, 32), np.float32), latents=np.zeros((1, 16, 4, 6), np.float32)), [],
     "the init tokens have 32 values per token, this model takes 64"),
    (dict(latents=np.zeros((3, 16, 4, 6), np.float32)), ["--images-per-prompt", "2"],
     "the init latents hold 3 images for a batch of 2"),
])
def test_init_latents_that_do_not_fit_the_models_config_are_refused_before_the_load(
        tiny_dir, tmp_path, capsys, no_loading, arrays, extra, message):
    np.savez(tmp_path / "l.npz", **arrays)
    code, _, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "--init-latents",
                            str(tmp_path / "l.npz"), "--keep-rows", "1", *extra, "-o", str(tmp_path / "x.png"))
    assert code == 2 and message in one_error_line(err)


# ---- end to end -------------------------------------------------------------------------------------------------

def _generate(tiny_dir, out, *extra):
    """No --width/--height unless given: with an init, its size is the output's."""
    return cli("generate", "--model", tiny_dir, "--prompt", "a cat", "--steps", "2", "--dtype", "float32",
               "--sampler", "euler", "-o", str(out), *extra)


def test_cli_reroll_from_saved_latents_reproduces_then_varies(tiny_dir, tmp_path):
    _generate(tiny_dir, tmp_path / "a.png", "--seed", "5", "--width", "48", "--height", "32", "--save-latents",
              str(tmp_path / "a.npz"))
    _generate(tiny_dir, tmp_path / "same.png", "--seed", "5", "--init-latents", str(tmp_path / "a.npz"),
              "--keep-rows", "1", "--save-latents", str(tmp_path / "same.npz"))
    _generate(tiny_dir, tmp_path / "b.png", "--seed", "6", "--init-latents", str(tmp_path / "a.npz"),
              "--keep-rows", "1", "--save-latents", str(tmp_path / "b.npz"))
    a, same, b = (np.load(tmp_path / f"{n}.npz")["tokens"] for n in ("a", "same", "b"))
    assert np.array_equal(same, a)  # same seed: the whole image again, bit for bit
    assert np.array_equal(b[:, :3], a[:, :3]) and not np.array_equal(b[:, 3:], a[:, 3:])


def test_cli_denoise_zero_returns_the_init_one_the_fresh_image_and_half_lies_between(tiny_dir, tmp_path):
    _generate(tiny_dir, tmp_path / "a.png", "--seed", "5", "--width", "48", "--height", "32", "--save-latents",
              str(tmp_path / "a.npz"))
    _generate(tiny_dir, tmp_path / "f.png", "--seed", "9", "--width", "48", "--height", "32", "--save-latents",
              str(tmp_path / "fresh.npz"))
    for d in ("0", "0.5", "1"):
        _generate(tiny_dir, tmp_path / f"{d}.png", "--seed", "9", "--init-latents", str(tmp_path / "a.npz"),
                  "--denoise", d, "--save-latents", str(tmp_path / f"d{d}.npz"))
    a, fresh, zero, half, one = (np.load(tmp_path / f"{n}.npz")["tokens"] for n in ("a", "fresh", "d0", "d0.5", "d1"))
    assert np.array_equal(zero, a)  # the init itself
    assert np.array_equal(one, fresh)  # a fresh image of the same seed
    assert 0 < np.abs(half - a).sum() < np.abs(one - a).sum()


def test_cli_denoise_below_one_without_an_init_is_refused_before_loading(tiny_dir, tmp_path, capsys, no_loading):
    code, _, err = run_main(capsys, "generate", "--model", tiny_dir, "--prompt", "x", "--denoise", "0.5",
                            "-o", str(tmp_path / "x.png"))
    assert code == 2 and "needs an init" in one_error_line(err)


def test_cli_inpaints_from_an_image_and_a_mask(tiny_dir, tiny_vae, tmp_path):
    pixels = np.random.default_rng(1).integers(0, 255, (32, 48, 3))
    mask = np.zeros((32, 48))
    mask[16:, 32:] = 255  # the last token
    _generate(tiny_dir, tmp_path / "o.png", "--init-image", _png(tmp_path / "in.png", pixels), "--mask",
              _png(tmp_path / "m.png", mask), "--save-latents", str(tmp_path / "o.npz"))
    assert Image.open(tmp_path / "o.png").size == (48, 32)
    encoded = encode_latents(tiny_vae, torch.from_numpy(pixels / 255.0).float().permute(2, 0, 1)[None])
    expected = patchify(encoded, 2)  # the tiny VAE's latent scale is 1, shift 0
    out = torch.from_numpy(np.load(tmp_path / "o.npz")["tokens"])
    assert torch.allclose(out[:, :5], expected[:, :5], atol=1e-5)
    assert not torch.allclose(out[:, 5], expected[:, 5], atol=1e-2)


def test_editing_keeps_tokens_of_the_edited_output(tiny_model, tiny_vae):
    """The input image stays the edit condition; the keep mask applies to the output canvas."""
    cond = encode_edit_images(tiny_vae, Conditioning(["<image>add a hat"]), [torch.rand(3, 32, 32)])
    settings = SamplerSettings(width=48, height=32, steps=2, cfg=2.0, cfg_img=2.0, sampler="euler", seed=1)
    edited = sample(tiny_model, cond, settings)
    again = sample(tiny_model, cond, settings.replace(seed=2), init=TokenInit(edited.tokens, keep_rows(1, 2, 3)))
    assert torch.equal(again.tokens[:, :3], edited.tokens[:, :3])
    assert not torch.equal(again.tokens[:, 3:], edited.tokens[:, 3:])


def test_cli_refuses_bad_keep_inputs_before_loading_the_model(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "no-model-here"), "--prompt", "x", "--keep-rows", "2",
            "-o", str(tmp_path / "x.png"), check=False)
    assert r.returncode == 2 and "add --init-image or --init-latents" in r.stderr  # not "does not exist"
    assert not os.path.exists(tmp_path / "x.png")
