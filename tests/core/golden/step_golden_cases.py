"""The generations whose eager tokens `step_goldens.npz` holds (see `make_step_goldens.py`).

Both families, every sampler, linear guidance, the reference noise order, batches of several prompts and images,
editing with three guidance rows, a position table, step annealing, every head loop, and kept tokens (reroll and
an inpainting mask).
"""
from __future__ import annotations

import os

import torch

BASE = dict(width=64, height=48, steps=5, cfg=3.0, seed=11)
V1, V11 = "nextstep-1", "nextstep-1.1"

# name -> (family, checkpoint extras, prompts, settings changes, edit, keep)
CASES = {
    "v1_em_batch": (V1, {}, ["a cat", "the dog on the mat"], dict(images_per_prompt=2, sampler="euler_maruyama"),
                    False, None),
    "v1_euler_linear": (V1, {}, ["a cat"], dict(sampler="euler", cfg_schedule="linear", use_norm=False), False, None),
    "v1_reference_noise": (V1, {}, ["a cat", "the dog"], dict(noise="reference", images_per_prompt=2), False, None),
    "v1_no_guidance": (V1, {}, ["a cat"], dict(cfg=1.0), False, None),
    "v1_annealed": (V1, {}, ["a cat"], dict(steps=8, steps_end=2), False, None),
    "v1_hoisted": (V1, {}, ["a cat"], dict(head_loop="hoisted"), False, None),
    "v1_plain": (V1, {}, ["a cat"], dict(head_loop="plain"), False, None),
    "v1_edit_3way": (V1, {}, ["<image>add a hat"], dict(cfg_img=2.0, timesteps_shift=3.2), True, None),
    "v1_keep_rows": (V1, {}, ["a cat"], dict(images_per_prompt=2), False, "rows"),
    "v1_keep_mask": (V1, {}, ["a cat"], dict(), False, "mask"),
    "v11_sde": (V11, {}, ["a cat", "the dog"], dict(sampler="flow_sde", use_norm=False), False, None),
    "v11_cps_linear": (V11, {}, ["a cat"], dict(sampler="flow_cps", cfg_schedule="linear"), False, None),
    "v11_euler": (V11, {}, ["a cat"], dict(sampler="euler"), False, None),
    "v11_em": (V11, {}, ["a cat"], dict(sampler="euler_maruyama", noise="reference"), False, None),
    "v11_pos_embed_edit": (V11, dict(use_gen_pos_embed=True, base_image_grid_size=4), ["<image>make it red"],
                           dict(cfg_img=2.0, sampler="flow_sde"), True, None),
    "v11_keep_rows_annealed": (V11, {}, ["a cat"], dict(steps=6, steps_end=3), False, "rows"),
}


def _model(family: str, extras: dict, tmp: str):
    import nextstep_core as ns
    from nextstep_core.weights.testing import make_tiny_checkpoint

    name = f"{family}-{'-'.join(f'{k}{v}' for k, v in sorted(extras.items()))}"
    path = os.path.join(tmp, name)
    if not os.path.isdir(path):
        make_tiny_checkpoint(path, family=family, with_vae=True, **extras)
    return ns.load_model(path, dtype="float32"), ns.load_vae(os.path.join(path, "vae"))


def run_case(name: str, tmp: str) -> torch.Tensor:
    """The eager tokens [B, T, 64] of case `name` (fp32, CPU, one thread: the caller sets the thread count)."""
    import nextstep_core as ns

    family, extras, prompts, changes, edit, keep = CASES[name]
    model, vae = _model(family, extras, tmp)
    settings = ns.family_defaults(family, edit=edit).replace(**BASE).replace(**changes, fast="eager")
    cond = ns.Conditioning(prompts, negative_prompt="blurry")
    if edit:
        g = torch.Generator().manual_seed(3)
        cond = ns.encode_edit_images(vae, cond, [torch.rand(3, 32, 48, generator=g) for _ in prompts])
    init = None
    if keep is not None:
        h, w = settings.height // 16, settings.width // 16
        full = ns.sample(model, cond, settings.replace(seed=settings.seed + 100))
        mask = ns.keep_rows(1, h, w) if keep == "rows" else torch.tensor([1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1] * 4)[
            :h * w].bool()
        init = ns.TokenInit(full.tokens, mask)
    return ns.sample(model, cond, settings, init=init).tokens
