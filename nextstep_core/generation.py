"""The autoregressive loop: prefill once, then per token sample with the head and feed the token back.

    cond = Conditioning(["a red fox in snow"], negative_prompt="lowres")
    res = sample(model, cond, width=512, height=512, seed=42)        # res.tokens, res.latents
    images = decode_latents(vae, res.latents)                          # [B,3,H,W] in 0..1

Noise modes:
- "independent" (default): image b of a batch has its own generator seeded with seed + b, so a batch of N equals
  N single runs with seeds seed..seed+N-1, on every device (noise is drawn on the CPU).
- "reference": the official pipeline's draws: one generator seeded with `seed`. NextStep-1: for editing first one
  draw the size of the input latents (the reference's VAE posterior sample, unused since the VAE is deterministic);
  then per token one [n, 64] draw per noise use, n = images per prompt, shared by all prompts (the reference tiles
  it). NextStep-1.1: one [images, 64] draw per noise use, nothing before (it seeds after the VAE encode).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import FAMILY_V1_1
from .errors import GenerationCancelled, NextStepError
from .memory import check_fits
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


def prompt_batch(model, cond: Conditioning, width: int, height: int, images_per_prompt: int, branches: int):
    """The left-padded token ids of every guidance row, laid out as the reference lays them out."""
    cfg = model.config
    edit_grids = None
    if cond.is_edit:
        edit_grids = [(lat.shape[1] // cfg.latent_patch_size, lat.shape[2] // cfg.latent_patch_size)
                      for lat in cond.edit_latents]
    rows, image_rows = build_rows(cond.prompts, cond.positive_prompt, cond.negative_prompt, images_per_prompt,
                                  branches, edit_grids, cfg.family)
    h, w = grid_size(width, height, cfg)
    return tokenize_rows(model.tokenizer, cfg, rows, h, w, cfg.family, image_rows)


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


@dataclass
class _Plan:
    """The settings of one generation that the per-token steppers need."""
    total: int
    h: int
    w: int
    branches: int
    cfg: float
    cfg_img: float
    schedule: str
    family: str
    sampler: str
    steps: int
    steps_end: int | None
    shift: float
    use_norm: bool
    hoist: bool
    prompt_len: int
    n_img: int

    def guidance(self, k: int) -> tuple[float, float]:
        return (cfg_at(k, self.total, self.cfg, self.schedule, self.family),
                cfg_at(k, self.total, self.cfg_img, self.schedule, self.family))


def _eager_stepper(model, plan: _Plan, cache, c):
    """Per token: the head samples on all guidance rows, the guided token goes back into every row's cache."""
    grids, state = {}, {"c": c}
    dev, dtype = model.device, model.dtype

    def next_token(k: int, noise: torch.Tensor) -> torch.Tensor:
        pos = model.pos_embed_for(k, plan.h, plan.w)
        c = state["c"]
        cc = model.image_out_projector(c if pos is None else c + pos.to(c.dtype))
        n_steps = annealed_steps(k, plan.total, plan.steps, plan.steps_end)
        if n_steps not in grids:  # the grid, on the device, and its time embeddings: once per generation
            t = time_grid(n_steps, plan.shift, plan.family)
            grids[n_steps] = (t, t.to(dev), model.image_head.time_embeddings(t[:-1].to(dev), dtype))
        grid, grid_dev, temb = grids[n_steps]
        noise = noise[:draws_needed(n_steps, plan.sampler, plan.family)].to(dev)
        tok = sample_token(model.image_head, cc, noise, grid, Guidance(plan.branches, *plan.guidance(k)),
                           plan.sampler, plan.family, plan.hoist, grid_dev, temb).to(dtype)
        if plan.use_norm:
            tok = F.layer_norm(tok, (tok.shape[-1],), eps=1e-6)
        if k + 1 < plan.total:  # nothing reads the model after the last token
            emb = model.image_in_projector(tok).repeat(plan.branches, 1)[:, None]
            state["c"] = model.forward_embeds(emb, cache)[:, -1]
        return tok.float().cpu()

    return next_token


def _static_stepper(model, plan: _Plan, cache, c, capture: bool):
    """The same per-token work on fixed shapes (fast.py); captured as one CUDA graph when `capture`."""
    from .fast import StaticTokenStep

    step = StaticTokenStep(model, cache, plan.prompt_len, plan.total, plan.h, plan.w, plan.n_img, plan.branches,
                           time_grid(plan.steps, plan.shift, plan.family),
                           draws_needed(plan.steps, plan.sampler, plan.family), plan.sampler, plan.use_norm, capture)
    step.c.copy_(c)
    pin = model.device.type == "cuda"

    def next_token(k: int, noise: torch.Tensor) -> torch.Tensor:
        return step.run(noise.pin_memory() if pin else noise, *plan.guidance(k), last=k + 1 == plan.total)

    return next_token


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
    def __init__(self, mode, seed, n_prompts, n_per_prompt, edit_rows_shape, dim, family):
        self.mode, self.n_prompts, self.n, self.dim = mode, n_prompts, n_per_prompt, dim
        # NextStep-1's pipeline tiles one draw over the prompts; NextStep-1.1's draws one row per image
        self.tiled = family != FAMILY_V1_1
        if mode == "reference":
            self.gen = [torch.Generator().manual_seed(seed)]
            if edit_rows_shape is not None and self.tiled:  # 1.1 seeds after the VAE encode, so only 1 draws here
                torch.randn(edit_rows_shape, generator=self.gen[0])  # the reference's VAE posterior draw
        else:
            self.gen = [torch.Generator().manual_seed(seed + b) for b in range(n_prompts * n_per_prompt)]

    def next(self, draws: int) -> torch.Tensor:
        """Noise for one token: [draws, B, D] float32 (CPU)."""
        if self.mode == "reference":
            if not self.tiled:
                return torch.randn((draws, self.n_prompts * self.n, self.dim), generator=self.gen[0])
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
    batch = prompt_batch(model, cond, width, height, images_per_prompt, branches)
    rows, image_rows = batch.input_ids.shape[0], batch.rows_with_image
    check_fits(model, rows, batch.input_ids.shape[1] + total)
    edit_shape = None
    if cond.is_edit and image_rows:
        edit_shape = (len(image_rows), *cond.edit_latents[0].shape)
    noise_src = _Noise(noise, seed, len(cond.prompts), images_per_prompt, edit_shape, mcfg.token_dim, family)
    plan = _Plan(total, h, w, branches, cfg, cfg_img, cfg_schedule, family, sampler, steps, steps_end,
                 timesteps_shift, use_norm, hoist, batch.input_ids.shape[1], len(cond.prompts) * images_per_prompt)
    mode = _fast_mode(fast, dev, steps_end)
    with torch.inference_mode():
        cache = model.new_cache(rows, plan.prompt_len + total - 1, dtype, dev)
        x = _embed(model, batch, cond, images_per_prompt, dev).to(dtype)
        c = model.forward_embeds(x, cache, batch.real.to(dev))[:, -1]
        next_token = _eager_stepper(model, plan, cache, c) if mode == "eager" else \
            _static_stepper(model, plan, cache, c, capture=mode == "graph")
        tokens = torch.zeros(plan.n_img, total, mcfg.token_dim, device="cpu" if mode == "eager" else dev)
        for k in range(total):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {k} of {total} tokens")
            # always draw for the full step count: annealing then keeps the noise stream of the un-annealed run
            tokens[:, k] = next_token(k, noise_src.next(draws_needed(steps, sampler, family)))
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
