"""Keeping part of an image in the nodes: the NextStep Sampler's LATENT input with core noise_masks, Keep Rows."""
from __future__ import annotations

import pytest
import torch

W, H = 32, 48  # 2 x 3 tokens; latents 4 x 6


def node(pack, name):
    return pack[0].NODE_CLASS_MAPPINGS[name]()


@pytest.fixture
def t2i(pack):
    model = node(pack, "NextStepModelLoader").load("NextStep-1.1", "fp32", "sdpa", False)[0]
    cond = node(pack, "NextStepTextEncode").encode("a cat", "", "")[0]
    sampler = node(pack, "NextStepSampler")

    def run(seed=3, latent=None, batch=1, width=W, height=H, conditioning=cond):
        return sampler.sample(model, conditioning, seed, width, height, batch, 3.0, 1.0, "constant", 1.0, 2, "auto",
                              True, latent=latent)[0]["samples"]
    return run


def token_rows(latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, H/8, W/8] -> [B, rows, 16, 2, W/8]: one entry per row of tokens."""
    b, c, h, w = latent.shape
    return latent.reshape(b, c, h // 2, 2, w).permute(0, 2, 1, 3, 4)


def set_latent_noise_mask(samples, mask):
    """What core Set Latent Noise Mask returns (a copy of the LATENT with the MASK as [B, 1, H, W])."""
    return {"samples": samples, "noise_mask": mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1])}


def test_keep_rows_with_the_same_seed_reproduces_the_image(pack, t2i):
    original = t2i(seed=3)
    for rows in (0, 1, 2, 3):
        kept = node(pack, "NextStepKeepRows").keep({"samples": original}, rows)[0]
        assert torch.equal(t2i(seed=3, latent=kept), original), rows


def test_keep_rows_with_another_seed_keeps_the_top_and_rerolls_the_rest(pack, t2i):
    original = t2i(seed=3)
    rerolled = t2i(seed=4, latent=node(pack, "NextStepKeepRows").keep({"samples": original}, 1)[0])
    assert torch.equal(token_rows(rerolled)[:, :1], token_rows(original)[:, :1])
    assert not torch.equal(token_rows(rerolled)[:, 1:], token_rows(original)[:, 1:])


def test_keep_rows_mask_is_a_core_noise_mask(pack):
    keep_rows = node(pack, "NextStepKeepRows")
    latent = {"samples": torch.zeros(2, 16, 6, 4), "batch_index": [0, 1], "noise_mask": torch.zeros(1, 1, 6, 4)}
    out = keep_rows.keep(latent, 2)[0]
    assert out["batch_index"] == [0, 1] and out["samples"] is latent["samples"]
    assert out["noise_mask"].shape == (1, 1, 6, 4)
    assert out["noise_mask"][..., :4, :].eq(0).all() and out["noise_mask"][..., 4:, :].eq(1).all()
    assert keep_rows.keep(latent, 99)[0]["noise_mask"].eq(0).all()  # more rows than the image has: keep it all
    assert keep_rows.keep(latent, 0)[0]["noise_mask"].eq(1).all()


def test_a_latent_without_a_mask_only_sets_the_canvas(t2i):
    assert torch.equal(t2i(seed=5, latent={"samples": torch.randn(1, 16, H // 8, W // 8)}), t2i(seed=5))


@pytest.mark.parametrize("resolution", ["pixel", "latent"])
def test_set_latent_noise_mask_regenerates_only_the_masked_tokens(t2i, resolution):
    original = t2i(seed=3)
    scale = 1 if resolution == "pixel" else 8
    mask = torch.zeros(1, H // scale, W // scale)  # a MASK from Load Image or a mask node
    mask[:, 16 // scale:32 // scale, 16 // scale:] = 1.0  # the middle row's right token
    out = t2i(seed=4, latent=set_latent_noise_mask(original, mask))
    changed = (out != original)[0].any(0).reshape(3, 2, 2, 2).any(3).any(1)  # [token rows, token columns]
    assert changed.tolist() == [[False, False], [False, True], [False, False]]


def test_vae_encode_for_inpainting_masks_follow_ksampler_resizing(pack, t2i):
    """VAE Encode (for Inpainting) gives a rounded, grown pixel mask [B, 1, H, W]; KSampler resizes it bilinearly to
    the latent grid, where a 1-pixel sliver can vanish. The sampler regenerates exactly the tokens with any latent
    cell above 0 after that resize."""
    original = t2i(seed=3)
    mask = torch.zeros(1, 1, H, W)
    mask[..., 32:, :] = 1.0  # the bottom token row
    mask[..., 0, 0] = 1.0  # a single pixel: bilinear sampling at latent cell centres does not see it
    out = t2i(seed=4, latent={"samples": original, "noise_mask": mask})
    assert torch.equal(token_rows(out)[:, :2], token_rows(original)[:, :2])
    assert not torch.equal(token_rows(out)[:, 2], token_rows(original)[:, 2])


def test_batches_share_one_latent_or_take_one_each(pack, t2i):
    one = t2i(seed=3)
    two = t2i(seed=3, batch=2)
    shared = node(pack, "NextStepKeepRows").keep({"samples": one}, 2)[0]
    out = t2i(seed=3, batch=2, latent=shared)
    assert torch.equal(token_rows(out)[:, :2], token_rows(one)[:, :2].expand(2, -1, -1, -1, -1))
    per_image = node(pack, "NextStepKeepRows").keep({"samples": two}, 2)[0]
    assert torch.equal(t2i(seed=3, batch=2, latent=per_image), two)


def test_previews_show_the_kept_tokens_from_the_first_one(pack, t2i):
    from nextstep_pack.nodes import comfy_glue as glue

    original = t2i(seed=3)
    rec = pack[1]
    rec.progress.clear()
    t2i(seed=4, latent=node(pack, "NextStepKeepRows").keep({"samples": original}, 2)[0])
    canvas = original[0].clone()
    canvas[:, 4:] = 0  # the two kept token rows, the third not yet sampled (the tiny VAE's latent scale is 1)
    first = rec.progress[0]
    assert first[0] == 1  # after one token of six
    assert list(first[2][1].getdata()) == list(glue.latent_preview_image(canvas).getdata())


def test_edit_conditioning_keeps_rows_of_the_edited_output(pack, t2i):
    vae = node(pack, "NextStepVAELoader").load("NextStep-1.1/vae", False)[0]
    cond = node(pack, "NextStepTextEncode").encode("add a hat", "", "Copy original image.")[0]
    cond = node(pack, "NextStepEditEncode").encode(cond, vae, torch.rand(1, 32, 32, 3))[0]
    edited = t2i(seed=1, conditioning=cond)
    rerolled = t2i(seed=2, conditioning=cond, latent=node(pack, "NextStepKeepRows").keep({"samples": edited}, 1)[0])
    assert torch.equal(token_rows(rerolled)[:, :1], token_rows(edited)[:, :1])
    assert not torch.equal(rerolled, edited)


@pytest.mark.parametrize("latent,message", [
    ({"samples": torch.zeros(1, 16, 8, 8)}, "width 64 and height 64"),
    ({"samples": torch.zeros(1, 4, 6, 4)}, "4 channels"),
    ({"samples": torch.zeros(1, 16, 5, 4)}, "multiples of 16"),
    ({"samples": torch.zeros(3, 16, 6, 4)}, "3 images for 2"),
])
def test_unusable_latents_are_clear_errors(pack, t2i, latent, message):
    err = pack[0].nodes.common.NextStepNodeError
    with pytest.raises(err, match=message):
        t2i(batch=2, latent=latent)
