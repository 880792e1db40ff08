"""The autoregressive loop: prefill once, then per token sample with the head and feed the token back.

    cond = Conditioning(["a red fox in snow"], negative_prompt="lowres")
    res = sample(model, cond, width=512, height=512, seed=42)        # res.tokens, res.latents
    images = decode_latents(vae, res.latents)                          # [B,3,H,W] in 0..1

Noise modes:
- "independent" (default): image b of a batch has its own generator seeded with seed + b, so a batch of N equals
  N single runs with seeds seed..seed+N-1, on every device (noise is drawn on the CPU).
- "reference": the official pipeline's draws: one generator seeded with `seed`; for editing first one draw the
  size of the input latents (the reference's VAE posterior sample, unused since the VAE is deterministic); then
  per token one [n, 64] draw per noise use, n = images per prompt, shared by all prompts (the reference tiles it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import FAMILY_V1_1
from .errors import GenerationCancelled, NextStepError
from .prompt import IMAGE_MARKER, build_rows, grid_size, patchify, tokenize_rows, unpatchify
from .sampling import CFG_SCHEDULES, SAMPLERS, Guidance, cfg_at, draws_needed, sample_token, time_grid

NOISE_MODES = ("independent", "reference")
MAX_SIDE = 4096


@dataclass
class Conditioning:
    """Prompts (and, for editing, one encoded input image per prompt) ready for `sample`."""
    prompts: list
    positive_prompt: str = ""
    negative_prompt: str = ""
    edit_latents: list | None = None  # per prompt: AR-space latent [C, h, w] of its input image

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        self.prompts = list(self.prompts)
        self.positive_prompt = self.positive_prompt or ""
        self.negative_prompt = self.negative_prompt or ""

    @property
    def is_edit(self) -> bool:
        return self.edit_latents is not None


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, T, token_dim] float32, as fed back to the model
    latents: torch.Tensor  # [B, C, H/8, W/8] raw VAE space (what the VAE decoder takes)
    width: int
    height: int


def family_defaults(family: str) -> dict:
    """The settings of the reference's shipped examples for this family (reference notes §5.9, §14.9)."""
    negative = ("lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, "
                "worst quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry.")
    if family == FAMILY_V1_1:
        return dict(cfg=7.5, cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, steps=28, sampler="flow_sde",
                    use_norm=False, width=512, height=512, positive_prompt="", negative_prompt=negative)
    return dict(cfg=7.5, cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, steps=50,
                sampler="euler_maruyama", use_norm=True, width=512, height=512,
                positive_prompt="masterpiece, film grained, best quality.", negative_prompt=negative)


EDIT_DEFAULTS = dict(cfg=7.5, cfg_img=2.0, timesteps_shift=3.2, negative_prompt="Copy original image.")


def to_pixels(image) -> torch.Tensor:
    """PIL image or [3,H,W] / [H,W,3] tensor in 0..1 -> float [3,H,W]."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
            t = t.permute(2, 0, 1)
        if t.ndim != 3:
            raise NextStepError(f"an input image must be [3,H,W] or [H,W,3], got shape {list(image.shape)}")
        return t[:3] if t.shape[0] >= 3 else t.expand(3, -1, -1)
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise NextStepError(f"cannot use {type(image).__name__} as an image; pass a PIL image or a tensor")
    if image.mode == "RGBA":  # as the reference: transparent pixels become white
        bg = Image.new("RGB", image.size, (255, 255, 255))
        bg.paste(image, mask=image.split()[3])
        image = bg
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def encode_edit_images(vae, cond: Conditioning, images) -> Conditioning:
    """Encode one input image per prompt with the VAE; returns a Conditioning for editing."""
    images = list(images) if not isinstance(images, torch.Tensor) or images.ndim != 4 else list(images)
    if len(images) != len(cond.prompts):
        raise NextStepError(f"{len(images)} input image(s) for {len(cond.prompts)} prompt(s): editing needs exactly "
                            "one image per prompt.")
    latents = []
    for i, img in enumerate(images):
        px = to_pixels(img)
        _, h, w = px.shape
        if h % 16 or w % 16:
            raise NextStepError(f"input image {i} is {w}x{h}; editing needs sides that are multiples of 16. Resize "
                                f"or crop it first (e.g. to {max(16, w // 16 * 16)}x{max(16, h // 16 * 16)}).")
        with torch.inference_mode():
            latents.append(vae.to_ar(vae.encode_mean(px[None]))[0].float().cpu())
    prompts = [p if IMAGE_MARKER in p else IMAGE_MARKER + p for p in cond.prompts]
    return replace(cond, prompts=prompts, edit_latents=latents)


def _validate(model, cond: Conditioning, width, height, images_per_prompt, steps, sampler, cfg_schedule, noise,
              steps_end=None):
    cfg = model.config
    if not cond.prompts:
        raise NextStepError("no prompt given: pass at least one prompt.")
    f = cfg.down_factor
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, int) or v % f or not f <= v <= MAX_SIDE:
            raise NextStepError(f"{name} {v} is not supported: use a multiple of {f} between {f} and {MAX_SIDE} "
                                f"(512 is what the model was trained at).")
    if steps < 1 or (steps_end is not None and steps_end < 1):
        raise NextStepError(f"steps must be at least 1, got {min(steps, steps_end or steps)}.")
    if images_per_prompt < 1:
        raise NextStepError(f"images per prompt must be at least 1, got {images_per_prompt}.")
    if sampler not in SAMPLERS:
        raise NextStepError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    if cfg_schedule not in CFG_SCHEDULES:
        raise NextStepError(f"unknown cfg schedule {cfg_schedule!r}; choose one of {', '.join(CFG_SCHEDULES)}.")
    if noise not in NOISE_MODES:
        raise NextStepError(f"unknown noise mode {noise!r}; choose one of {', '.join(NOISE_MODES)}.")
    for i, p in enumerate(cond.prompts):
        n = p.count(IMAGE_MARKER)
        if cond.is_edit and n != 1:
            raise NextStepError(f"prompt {i} must contain exactly one {IMAGE_MARKER} marker for its input image "
                                f"(found {n}).")
        if not cond.is_edit and n:
            raise NextStepError(f"prompt {i} contains {IMAGE_MARKER} but no input image was given: encode one with "
                                "the edit encoder, or remove the marker.")
    if cond.is_edit:
        for lat in cond.edit_latents:
            if lat.shape[0] != cfg.latent_channels:
                raise NextStepError(f"the input image was encoded to {lat.shape[0]} latent channels, the model needs "
                                    f"{cfg.latent_channels}: use the NextStep f8ch16 VAE.")
    h, w = grid_size(width, height, cfg)
    if cfg.use_gen_pos_embed and (h > cfg.base_image_grid_size or w > cfg.base_image_grid_size):
        g = cfg.base_image_grid_size * f
        raise NextStepError(f"this model's position table covers at most {g}x{g} pixels; pick a smaller size.")


def guidance_branches(cond: Conditioning, cfg: float, cfg_img: float) -> int:
    if cond.is_edit:
        if cfg_img != 1.0:
            return 3  # includes cfg == 1, which the reference cannot run (it builds too few rows)
        return 2 if cfg != 1.0 else 1
    return 2 if cfg != 1.0 else 1


def _embed(model, batch, cond: Conditioning, n_per_prompt: int, device):
    x = model.embed_text(batch.input_ids.to(device))
    if not batch.rows_with_image:
        return x
    p = model.config.latent_patch_size
    per_prompt = [patchify(lat[None], p)[0] for lat in cond.edit_latents]
    images = [per_prompt[(i % (len(cond.prompts) * n_per_prompt)) // n_per_prompt] for i in batch.rows_with_image]
    ph = batch.input_ids == model.config.image_placeholder_id
    for row, tokens in zip(batch.rows_with_image, images):
        idx = ph[row].nonzero().flatten().to(device)
        if len(idx) != len(tokens):
            raise NextStepError(f"row {row} has {len(idx)} image placeholders for {len(tokens)} image tokens")
        x[row, idx] = model.image_in_projector(tokens.to(device, x.dtype))
    return x


def _fast_mode(fast: str, device: torch.device, steps_end) -> str:
    from .fast import graphs_available

    if fast not in ("auto", "graph", "static", "eager"):
        raise NextStepError(f"unknown fast mode {fast!r}; use auto, graph, static or eager.")
    if fast == "auto":
        return "graph" if graphs_available(device) and steps_end is None else "eager"
    if fast != "eager" and steps_end is not None:
        raise NextStepError("step annealing changes the head's step count per token, which the fixed-shape fast path "
                            "cannot; use fast='eager' (or 'auto') with steps_end.")
    if fast == "graph" and not graphs_available(device):
        raise NextStepError(f"CUDA graphs need a CUDA device; this model is on {device}. Use fast='auto'.")
    return fast


def annealed_steps(k: int, total: int, steps: int, steps_end: int | None) -> int:
    if steps_end is None or total == 1:
        return steps
    return int(round(steps + (steps_end - steps) * k / (total - 1)))


class _Noise:
    def __init__(self, mode, seed, n_prompts, n_per_prompt, edit_rows_shape, dim):
        self.mode, self.n_prompts, self.n, self.dim = mode, n_prompts, n_per_prompt, dim
        if mode == "reference":
            self.gen = [torch.Generator().manual_seed(seed)]
            if edit_rows_shape is not None:
                torch.randn(edit_rows_shape, generator=self.gen[0])  # the reference's VAE posterior draw
        else:
            self.gen = [torch.Generator().manual_seed(seed + b) for b in range(n_prompts * n_per_prompt)]

    def next(self, draws: int) -> torch.Tensor:
        """Noise for one token: [draws, B, D] float32 (CPU)."""
        if self.mode == "reference":
            z = torch.randn((draws, self.n, self.dim), generator=self.gen[0])
            return z.repeat(1, self.n_prompts, 1)
        return torch.stack([torch.randn((draws, self.dim), generator=g) for g in self.gen], dim=1)


def sample(model, cond: Conditioning, width: int = 512, height: int = 512, images_per_prompt: int = 1,
           cfg: float = 7.5, cfg_img: float = 1.0, cfg_schedule: str = "constant", timesteps_shift: float = 1.0,
           steps: int = 50, sampler: str | None = None, use_norm: bool = True, seed: int = 42,
           noise: str = "independent", progress=None, should_cancel=None, latent_affine=None,
           hoist: bool = True, steps_end: int | None = None, fast: str = "auto") -> SampleResult:
    """Generate image tokens for every prompt × images_per_prompt; see the module docstring.

    `steps_end` turns on step annealing: head steps go linearly from `steps` at the first token to `steps_end` at
    the last (off by default; early tokens set the layout, later ones mostly fill in detail).
    `fast`: "auto" (CUDA graphs on CUDA, the plain loop elsewhere), "graph", "static" (fixed shapes, no graph) or
    "eager". `progress(done, total, tokens)` gets the tokens so far, on the model's device in the fast paths.
    """
    mcfg = model.config
    family = mcfg.family
    sampler = sampler or family_defaults(family)["sampler"]
    _validate(model, cond, width, height, images_per_prompt, steps, sampler, cfg_schedule, noise, steps_end)
    dev, dtype = model.device, model.dtype
    h, w = grid_size(width, height, mcfg)
    total = h * w
    branches = guidance_branches(cond, cfg, cfg_img)
    edit_grids = None
    if cond.is_edit:
        edit_grids = [(lat.shape[1] // mcfg.latent_patch_size, lat.shape[2] // mcfg.latent_patch_size)
                      for lat in cond.edit_latents]
    rows, image_rows = build_rows(cond.prompts, cond.positive_prompt, cond.negative_prompt, images_per_prompt,
                                  branches, edit_grids, family)
    batch = tokenize_rows(model.tokenizer, mcfg, rows, h, w, family, image_rows)
    check_fits(model, len(rows), batch.input_ids.shape[1] + total)
    edit_shape = None
    if cond.is_edit and image_rows:
        edit_shape = (len(image_rows), *cond.edit_latents[0].shape)
    noise_src = _Noise(noise, seed, len(cond.prompts), images_per_prompt, edit_shape, mcfg.token_dim)
    grids = {}
    n_img = len(cond.prompts) * images_per_prompt
    tokens = torch.zeros(n_img, total, mcfg.token_dim)
    mode = _fast_mode(fast, dev, steps_end)
    with torch.inference_mode():
        cache = model.new_cache(len(rows), batch.input_ids.shape[1] + total - 1, dtype, dev)
        x = _embed(model, batch, cond, images_per_prompt, dev).to(dtype)
        c = model.forward_embeds(x, cache, batch.real.to(dev))[:, -1]
        if mode != "eager":
            from .fast import StaticTokenStep

            grid = time_grid(steps, timesteps_shift, family)
            draws = draws_needed(steps, sampler, family)
            step = StaticTokenStep(model, cache, batch.input_ids.shape[1], total, h, w, n_img, branches, grid, draws,
                                   sampler, use_norm, capture=mode == "graph")
            step.c.copy_(c)
            tokens = tokens.to(dev)
            pin = dev.type == "cuda"
        for k in range(total if mode == "eager" else 0):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {k} of {total} tokens")
            pos = model.pos_embed_for(k, h, w)
            cc = model.image_out_projector(c if pos is None else c + pos.to(c.dtype))
            guide = Guidance(branches, cfg_at(k, total, cfg, cfg_schedule, family),
                             cfg_at(k, total, cfg_img, cfg_schedule, family))
            n_steps = annealed_steps(k, total, steps, steps_end)
            grid = grids.get(n_steps)
            if grid is None:
                grid = grids[n_steps] = time_grid(n_steps, timesteps_shift, family)
            # always draw for the full step count: annealing then keeps the noise stream of the un-annealed run
            noise_k = noise_src.next(draws_needed(steps, sampler, family))[:draws_needed(n_steps, sampler, family)]
            noise_k = noise_k.to(dev)
            tok = sample_token(model.image_head, cc, noise_k, grid, guide, sampler, family, hoist).to(dtype)
            if use_norm:
                tok = F.layer_norm(tok, (tok.shape[-1],), eps=1e-6)
            tokens[:, k] = tok.float().cpu()
            if progress is not None:
                progress(k + 1, total, tokens[:, :k + 1])
            if k + 1 < total:  # nothing reads the model after the last token
                emb = model.image_in_projector(tok).repeat(branches, 1)[:, None]
                c = model.forward_embeds(emb, cache)[:, -1]
        for k in range(total if mode != "eager" else 0):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {k} of {total} tokens")
            noise_k = noise_src.next(draws)
            tok = step.run(noise_k.pin_memory() if pin else noise_k,
                           cfg_at(k, total, cfg, cfg_schedule, family), cfg_at(k, total, cfg_img, cfg_schedule, family),
                           last=k + 1 == total)
            tokens[:, k].copy_(tok)
            if progress is not None:
                progress(k + 1, total, tokens[:, :k + 1])
    tokens = tokens.float().cpu()
    scale, shift = latent_affine or getattr(model, "latent_affine", (1.0, 0.0))
    latents = unpatchify(tokens, h, w, mcfg.latent_patch_size) / scale + shift
    return SampleResult(tokens, latents, width, height)


def tokens_to_latents(tokens: torch.Tensor, width: int, height: int, cfg, latent_affine=(1.0, 0.0)) -> torch.Tensor:
    """Latents for a (possibly partial) token sequence: missing tokens are zero (for previews)."""
    h, w = grid_size(width, height, cfg)
    full = torch.zeros(tokens.shape[0], h * w, tokens.shape[-1])
    full[:, :tokens.shape[1]] = tokens
    scale, shift = latent_affine
    return unpatchify(full, h, w, cfg.latent_patch_size) / scale + shift


def estimate_memory_bytes(model, width: int, height: int, rows: int, prompt_tokens: int = 128) -> int:
    """Weights + KV cache + working memory of the prefill for `rows` guidance rows."""
    from .model import KVCache

    cfg = model.config
    h, w = grid_size(width, height, cfg)
    seq = prompt_tokens + h * w
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    elem = torch.empty((), dtype=model.dtype).element_size()
    kv = KVCache.bytes_per_token(cfg, model.dtype) * rows * seq
    act = rows * prompt_tokens * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * elem
    return int(weights + kv + act)


def check_fits(model, rows: int, seq: int) -> None:
    """Refuse, before any compute, a cache that cannot fit in the device's free memory."""
    from .model import KVCache

    need = KVCache.bytes_per_token(model.config, model.dtype) * rows * seq
    dev = model.device
    free = None
    if dev.type == "cuda":
        free = torch.cuda.mem_get_info(dev)[0]
    elif dev.type == "cpu":
        try:
            import psutil

            free = psutil.virtual_memory().available
        except ImportError:
            free = None
    if free is not None and need > 0.9 * free:
        raise NextStepError(f"this batch needs {need / 2**30:.1f} GiB for its KV cache ({rows} rows × {seq} tokens) but "
                            f"only {free / 2**30:.1f} GiB is free on {dev}: use fewer images or a smaller size.")


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Raw VAE latents [B,C,h,w] -> images [B,3,H,W] float32 in 0..1 (CPU)."""
    if latents.shape[1] != vae.config.z_channels:
        raise NextStepError(f"these latents have {latents.shape[1]} channels but the VAE takes "
                            f"{vae.config.z_channels}: decode them with the VAE they were made for.")
    with torch.inference_mode():
        return vae.decode(latents).cpu()


def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images [B,3,H,W] in 0..1 -> raw VAE latents [B,C,H/8,W/8] (float32, CPU)."""
    if images.shape[-1] % 8 or images.shape[-2] % 8:
        raise NextStepError(f"image size {images.shape[-1]}x{images.shape[-2]} is not a multiple of 8.")
    with torch.inference_mode():
        return vae.encode_mean(images).float().cpu()
