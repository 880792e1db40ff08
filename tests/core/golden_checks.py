"""The comparison both parity tests make between one generation and a reference golden case."""
import numpy as np
import torch


def assert_matches_golden(golden, name: str, latents_key: str, cond, res, images) -> None:
    """Tokens and raw latents within 1e-4, PNG pixels within 2/255, edit latents within 1e-4."""
    tokens = golden[f"{name}/tokens"]
    assert res.tokens.shape == tokens.shape
    assert np.abs(res.tokens.numpy() - tokens).max() < 1e-4
    assert np.abs(res.latents.numpy() - golden[f"{name}/{latents_key}"]).max() < 1e-4
    pixels = (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy().astype(int)
    assert np.abs(pixels - golden[f"{name}/images"].astype(int)).max() <= 2
    if cond.is_edit:
        ours = np.stack([lat.numpy() for lat in cond.edit_latents])
        theirs = golden[f"{name}/edit_latents"][: len(ours)]  # the reference also encodes the image+negative rows
        assert np.abs(ours - theirs).max() < 1e-4


def assert_same_prompt_ids(golden, case: dict, model, input_sizes=None) -> None:
    """The padded token ids and attention mask of every guidance row equal the reference's.

    `input_sizes`: (width, height) of each edit input image; stand-in latents of that size carry the grid."""
    import nextstep_core as ns
    from nextstep_core.generation.loop import prompt_batch

    cond = ns.Conditioning(case["captions"], case["positive_prompt"], case["negative_prompt"])
    if input_sizes:
        cond.edit_latents = [torch.zeros(16, h // 8, w // 8) for w, h in input_sizes]
    h, w = case["hw"]
    batch = prompt_batch(model, cond, w, h, case["num_images_per_caption"],
                         ns.guidance_branches(cond, case["cfg"], case["cfg_img"]))
    assert batch.input_ids.tolist() == golden[f"{case['name']}/input_ids"].tolist()
    assert batch.real.long().tolist() == golden[f"{case['name']}/attention_mask"].tolist()


def settings_of(case: dict, **changes):
    """The SamplerSettings of a golden case (the reference pipeline's arguments, under our names)."""
    import nextstep_core as ns

    h, w = case["hw"]
    s = ns.SamplerSettings(width=w, height=h, images_per_prompt=case["num_images_per_caption"], cfg=case["cfg"],
                           cfg_img=case["cfg_img"], cfg_schedule=case["cfg_schedule"],
                           timesteps_shift=case["timesteps_shift"], steps=case["num_sampling_steps"],
                           sampler=case.get("sampler"), use_norm=case["use_norm"], seed=case["seed"])
    return s.replace(**changes)
