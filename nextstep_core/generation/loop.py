"""The autoregressive loop: prefill once, then per token sample with the head and feed the token back.

    cond = Conditioning(["a red fox in snow"], negative_prompt="lowres")
    res = sample(model, cond, SamplerSettings(width=512, height=512, seed=42))   # res.tokens, res.latents
    images = decode_latents(vae, res.latents)                                     # [B,3,H,W] in 0..1

Per token k: the head samples the token on every guidance row's condition (or, for a token kept by a `TokenInit`,
the given token is taken as is), and the token goes back into every row's KV cache. Two steppers do that work: the
plain loop here, and the fixed-shape step of `fast.py` (a CUDA graph on CUDA). Noise: `noise.py`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import GenerationCancelled, NextStepError
from ..model.family import family_of
from .keep import TokenInit
from .memory import check_fits
from .noise import NoiseSource
from .plan import GenerationPlan
from .prompt import IMAGE_MARKER, build_rows, check_text, grid_size, patchify, tokenize_rows, unpatchify
from .sampling import Guidance, sample_token
from .settings import SamplerSettings


@dataclass
class Conditioning:
    """Prompts (and, for editing, one encoded input image per prompt) ready for `sample`.

    `prompts` is one str or a list of them; the prompts' text is checked by `sample`."""
    prompts: list
    positive_prompt: str = ""
    negative_prompt: str = ""
    edit_latents: list | None = None  # per prompt: AR-space latent [C, h, w] of its input image

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        if not isinstance(self.prompts, (list, tuple)):
            raise NextStepError(f"prompts must be a str or a list of str, got {type(self.prompts).__name__}: e.g. "
                                "Conditioning(['a red fox in the snow']).")
        self.prompts = list(self.prompts)
        self.positive_prompt = "" if self.positive_prompt is None else self.positive_prompt
        self.negative_prompt = "" if self.negative_prompt is None else self.negative_prompt

    @property
    def is_edit(self) -> bool:
        return self.edit_latents is not None


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [B, T, token_dim] float32, as fed back to the model
    latents: torch.Tensor  # [B, C, H/8, W/8] raw VAE space (what the VAE decoder takes)
    width: int
    height: int
    path: str = "eager"  # which per-token path ran: "graph", "static" or "eager"


def _validate(model, cond: Conditioning, settings: SamplerSettings | None, init=None) -> SamplerSettings:
    """The settings resolved against the model, after every argument of `sample` is checked (NextStepError)."""
    cfg = model.config
    settings = SamplerSettings() if settings is None else settings
    checks = [("cond", cond, Conditioning, "Conditioning(['a red fox'])"),
              ("settings", settings, SamplerSettings, "family_defaults(model.config.family).replace(seed=1); for a "
                                                      "dict d, SamplerSettings(**d)")]
    if init is not None:
        checks.append(("init", init, TokenInit, "TokenInit(tokens, keep) or TokenInit.from_latents(...)"))
    for name, value, cls, example in checks:
        if not isinstance(value, cls):
            raise NextStepError(f"{name} must be a {cls.__name__}, got {type(value).__name__}: pass e.g. {example}.")
    settings = settings.with_family(cfg.family).validate(cfg)
    if not cond.prompts:
        raise NextStepError("no prompt given: pass at least one prompt.")
    check_text("the positive prompt", cond.positive_prompt)
    check_text("the negative prompt", cond.negative_prompt)
    for i, p in enumerate(cond.prompts):
        check_text(f"prompt {i}", p)
        n = p.count(IMAGE_MARKER)
        if cond.is_edit and n != 1:
            raise NextStepError(f"prompt {i} must contain exactly one {IMAGE_MARKER} marker for its input image "
                                f"(found {n}).")
        if not cond.is_edit and n:
            raise NextStepError(f"prompt {i} contains {IMAGE_MARKER} but no input image was given: encode one with "
                                "the edit encoder, or remove the marker.")
    if cond.is_edit:
        lats = cond.edit_latents
        if not isinstance(lats, (list, tuple)) or len(lats) != len(cond.prompts) or \
                not all(isinstance(lat, torch.Tensor) and lat.ndim == 3 for lat in lats):
            raise NextStepError(f"edit_latents must hold one latent [{cfg.latent_channels}, h, w] per prompt "
                                f"({len(cond.prompts)}): make the conditioning with encode_edit_images.")
        for lat in lats:
            if lat.shape[0] != cfg.latent_channels:
                raise NextStepError(f"the input image was encoded to {lat.shape[0]} latent channels, the model needs "
                                    f"{cfg.latent_channels}: use the NextStep f8ch16 VAE.")
            if not torch.isfinite(lat).all():
                raise NextStepError("an input image's latents hold NaN or infinite values: encode the image again.")
    return settings


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
                                  branches, edit_grids)
    h, w = grid_size(width, height, cfg)
    return tokenize_rows(model.tokenizer, cfg, rows, h, w, image_rows)


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


class _EagerStepper:
    """Per token: the head samples on all guidance rows, the guided token goes back into every row's cache."""

    path = "eager"

    def __init__(self, model, plan: GenerationPlan, cache, c: torch.Tensor, noise_src: NoiseSource):
        self.model, self.plan, self.cache, self.c, self.noise_src = model, plan, cache, c, noise_src

    def step(self, k: int, forced=None) -> torch.Tensor:
        """Token k for every image [B, D] (float32, CPU); `forced` = (keep [B] bool, tokens [B, D]) or None."""
        model, plan = self.model, self.plan
        # kept tokens draw their noise too, so the rest of the image keeps the stream of a full run
        noise = self.noise_src.next(plan.draws)
        if forced is None or not bool(forced[0].all()):
            tok = self._sample(k, noise)
        else:
            tok = torch.zeros(plan.n_img, model.config.token_dim, device=model.device, dtype=model.dtype)
        if forced is not None:
            keep, given = forced[0].to(tok.device), forced[1].to(tok.device, tok.dtype)
            tok = torch.where(keep[:, None], given, tok)
        if k + 1 < plan.total:  # nothing reads the model after the last token
            emb = model.image_in_projector(tok).repeat(plan.branches, 1)[:, None]
            self.c = model.forward_embeds(emb, self.cache)[:, -1]
        return tok.float().cpu()

    def _sample(self, k: int, noise: torch.Tensor) -> torch.Tensor:
        model, plan = self.model, self.plan
        pos = model.pos_embed_for(k, plan.h, plan.w)
        cc = model.image_out_projector(self.c if pos is None else self.c + pos.to(self.c.dtype))
        head = plan.head_plan(model, plan.steps_at(k))
        noise = noise[:head.draws].to(model.device)
        tok = sample_token(model.image_head, cc, noise, head, Guidance(plan.branches, *plan.guidance(k)))
        tok = tok.to(model.dtype)
        return F.layer_norm(tok, (tok.shape[-1],), eps=1e-6) if plan.settings.use_norm else tok


class _StaticStepper:
    """The same per-token work on fixed shapes (fast.py): a CUDA graph when `capture`, kept on the model for the
    next generation of the same shape, with its KV cache (`cache` is that cache when `fixed` is a kept step)."""

    def __init__(self, model, plan: GenerationPlan, cache, c: torch.Tensor, noise_src: NoiseSource, fixed, capture):
        from .graph import new_static_step

        self.fixed = fixed if fixed is not None else new_static_step(model, plan, cache, capture)
        self.fixed.begin(plan, c, noise_src)
        self.path = self.fixed.path

    def step(self, k: int, forced=None) -> torch.Tensor:
        return self.fixed.run(k, forced=forced)


def _fast_mode(fast: str, device: torch.device, annealing: bool) -> str:
    from .graph import graphs_available

    if fast == "auto":
        return "graph" if graphs_available(device) and not annealing else "eager"
    if fast == "graph" and not graphs_available(device):
        raise NextStepError(f"CUDA graphs need a CUDA device; this model is on {device}. Use fast='auto'.")
    return fast


def _cache_for(model, plan: GenerationPlan, mode: str):
    """(KV cache, kept fixed-shape step or None): a kept step of this shape brings its own cache; otherwise the
    kept one is released first, so its memory counts as free when the new cache is checked against the device."""
    from .graph import cache_slots, static_step

    if mode == "eager":
        model.release_step_cache()
        check_fits(model, plan.rows, plan.prompt_len + plan.total)
        return model.new_cache(plan.rows, plan.prompt_len + plan.total - 1), None
    fixed = static_step(model, plan, capture=mode == "graph")
    if fixed is not None:
        return fixed.cache, fixed
    check_fits(model, plan.rows, cache_slots(plan))
    return model.new_cache(plan.rows, cache_slots(plan)), None


def sample(model, cond: Conditioning, settings: SamplerSettings | None = None, progress=None, should_cancel=None,
           init: TokenInit | None = None, latent_affine=None) -> SampleResult:
    """Generate image tokens for every prompt x images_per_prompt (see the module docstring).

    `progress(done, total, tokens)` runs once per token with the tokens so far [B, done, D] (with an `init`, the
    whole canvas [B, T, D]: kept tokens from the start, the rest zero until sampled); on the model's device in the
    fast paths. `should_cancel()` is checked before every token. `init` keeps tokens (teacher forcing, `keep.py`).
    `latent_affine` (scale, shift) converts tokens to the VAE's raw latents (default: the model's own).
    """
    mcfg = model.config
    s = _validate(model, cond, settings, init)
    h, w = grid_size(s.width, s.height, mcfg)
    branches = guidance_branches(cond, s.cfg, s.cfg_img)
    batch = prompt_batch(model, cond, s.width, s.height, s.images_per_prompt, branches)
    plan = GenerationPlan(s, family_of(mcfg), h, w, branches, batch.input_ids.shape[1],
                          len(cond.prompts) * s.images_per_prompt)
    forced = init.resolve(plan.n_img, h, w, mcfg.token_dim) if init is not None else None
    edit_shape = (len(batch.rows_with_image), *cond.edit_latents[0].shape) if batch.rows_with_image else None
    noise_src = NoiseSource(s.noise, s.seed, len(cond.prompts), s.images_per_prompt, mcfg.token_dim, plan.family,
                            edit_shape)
    mode = _fast_mode(s.fast, model.device, s.steps_end is not None)
    with torch.inference_mode():
        cache, fixed = _cache_for(model, plan, mode)
        x = _embed(model, batch, cond, s.images_per_prompt, model.device).to(model.dtype)
        c = model.forward_embeds(x, cache, batch.real.to(model.device))[:, -1]
        stepper = _EagerStepper(model, plan, cache, c, noise_src) if mode == "eager" else \
            _StaticStepper(model, plan, cache, c, noise_src, fixed, capture=mode == "graph")
        tokens = torch.zeros(plan.n_img, plan.total, mcfg.token_dim, device="cpu" if mode == "eager" else model.device)
        last_free = plan.total - 1
        if forced is not None:  # the canvas starts with the kept tokens, so previews show them from the start
            tokens.copy_(torch.where(forced[1][..., None], forced[0], 0.0))
            free = (~forced[1]).any(0).nonzero()
            last_free = int(free[-1]) if len(free) else -1  # kept tokens after it need neither head nor decoder
        for k in range(plan.total):
            if should_cancel is not None and should_cancel():
                raise GenerationCancelled(f"cancelled after {k} of {plan.total} tokens")
            if k <= last_free:  # a token no image keeps takes the plain step (on CUDA: the captured graph)
                kept = forced is not None and bool(forced[1][:, k].any())
                tokens[:, k] = stepper.step(k, (forced[1][:, k], forced[0][:, k]) if kept else None)
            if progress is not None:
                progress(k + 1, plan.total, tokens if forced is not None else tokens[:, :k + 1])
    tokens = tokens.float().cpu()
    scale, shift = latent_affine or model.latent_affine
    latents = unpatchify(tokens, h, w, mcfg.latent_patch_size) / scale + shift
    return SampleResult(tokens, latents, s.width, s.height, stepper.path)


def tokens_to_latents(tokens: torch.Tensor, width: int, height: int, cfg, latent_affine=(1.0, 0.0)) -> torch.Tensor:
    """Latents for a (possibly partial) token sequence: missing tokens are zero (for previews)."""
    h, w = grid_size(width, height, cfg)
    full = torch.zeros(tokens.shape[0], h * w, tokens.shape[-1])
    full[:, :tokens.shape[1]] = tokens
    scale, shift = latent_affine
    return unpatchify(full, h, w, cfg.latent_patch_size) / scale + shift
