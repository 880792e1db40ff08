"""The autoregressive loop: prefill once, then per token sample with the head and feed the token back.

    cond = Conditioning(["a red fox in snow"], negative_prompt="lowres")
    res = sample(model, cond, SamplerSettings(width=512, height=512, seed=42))   # res.tokens, res.latents
    images = decode_latents(vae, res.latents)                                     # [B,3,H,W] in 0..1

Per token k: the head samples the token on every guidance row's condition (or, for a token kept by a `TokenInit`,
the given token is taken as is), and the token goes back into every row's KV cache: `step.token_step`, the one
per-token function. Two steppers call it: `PlainStep` here (caches of the exact size, attention over the filled
slots) and the fixed-shape `FixedStep` of `graph.py` (static buffers, a CUDA graph on CUDA, checked against the plain
step on first use). Noise: `noise.py`.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from dataclasses import dataclass

import torch

from ..errors import GenerationCancelled, NextStepError
from ..model.attention import RowSlots, prefill_mask
from ..model.family import family_of
from . import graph
from .keep import TokenInit, check_variation
from .memory import check_fits
from .noise import NoiseSource
from .plan import GenerationPlan
from .prompt import IMAGE_MARKER, build_rows, check_text, grid_size, patchify, tokenize_rows, unpatchify
from .settings import SamplerSettings
from .step import Slot, TokenInputs, token_step


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
    fallback: str | None = None  # why the fixed-shape path was left for the plain one, when it was


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
    x = model.embed_text(batch.input_ids)
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


class PlainStep:
    """The plain loop: caches of exactly the size needed, attention over the slots filled so far."""

    path = "eager"
    fallback = None

    def __init__(self, model, plan: GenerationPlan):
        check_fits(model, plan.rows, plan.prompt_len + plan.total, plan=plan)
        self.model, self.plan = model, plan
        model.setup_caches(plan.rows, plan.prompt_len + plan.total - 1)  # the last token is never fed back
        self.pos_rows = plan.pos_rows(model)

    def begin(self, plan, c: torch.Tensor, start: torch.Tensor, noise_src: NoiseSource, inits=None) -> None:
        """`inits` [B, T, D] (host): the tokens a variation (denoise < 1) starts each token from, or None."""
        self.c, self.noise_src, self.inits = c, noise_src, inits
        # no padding: attend to every filled slot, no mask
        self.rows = RowSlots(start, plan.prompt_len + plan.total, c.dtype) if bool(start.any()) else None

    def run(self, k: int, forced=None) -> torch.Tensor:
        """Token k for every image [B, D] (float32, CPU); `forced` = (keep [B] bool, tokens [B, D]) or None."""
        model, plan = self.model, self.plan
        noise = self.noise_src.next(plan.draws)  # kept tokens draw their noise too: the stream of a full run
        row = None if self.pos_rows is None else self.pos_rows[k]
        init = None if self.inits is None else self.inits[:, k].to(model.device)
        x = TokenInputs(self.c, noise.to(model.device), *plan.guidance(k), row, init)
        p = plan.prompt_len + k
        pos = torch.tensor([p], device=model.device)
        mask = None if self.rows is None else self.rows.decode_mask(pos, p + 1, model.group)
        tok, c = token_step(model, plan.token_spec(model, k), x, Slot(pos, mask, p + 1), forced,
                            feed=k + 1 < plan.total)
        self.c = self.c if c is None else c
        return tok.float().cpu()


_guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (lock, the thread generating)
_guards_lock = threading.Lock()


@contextlib.contextmanager
def _one_caller(model):
    """One generation at a time per model (its layers own the KV caches): a second thread waits for the first; the
    same thread coming back in (a progress callback that samples) is refused instead of corrupting the first."""
    with _guards_lock:
        guard = _guards.setdefault(model, [threading.Lock(), None])
    if guard[1] == threading.get_ident():
        raise NextStepError("this model is already generating on this thread (a callback called sample() again): "
                            "wait for the first call to finish, or load a second copy of the model.")
    with guard[0]:
        guard[1] = threading.get_ident()
        try:
            yield
        finally:
            guard[1] = None
            model.install_caches(None)  # a kept fixed-shape step holds its own; the plain loop's are freed


def _path(fast: str, device: torch.device) -> str:
    if fast == "auto":
        return "graph" if graph.graphs_available(device) else "eager"
    if fast == "graph" and not graph.graphs_available(device):
        raise NextStepError(f"CUDA graphs need a CUDA device; this model is on {device}. Use fast='auto'.")
    return fast


def _stepper(model, plan: GenerationPlan, path: str):
    """The per-token stepper for `path`: a kept or new fixed-shape step, or the plain loop (also where this key's
    fixed step was found wrong before: the warning was given then)."""
    if path != "eager":
        capture = path == "graph"
        step = graph.fixed_step(model, plan, capture)
        if step is not None:
            return step
        plain = PlainStep(model, plan)
        plain.fallback = graph.broken_reason(model, plan, capture)
        return plain
    model.release_step_cache()  # its memory counts as free for the plain loop's caches
    return PlainStep(model, plan)


def _prefill(model, batch, cond: Conditioning, n_per_prompt: int) -> torch.Tensor:
    """Run the prompts of every guidance row through the decoder; the last position's condition [rows, hidden]."""
    x = _embed(model, batch, cond, n_per_prompt, model.device).to(model.dtype)
    n = x.shape[1]
    real = batch.real.to(model.device)
    pos = torch.arange(n, device=model.device)
    return model(x, pos, prefill_mask(real, model.dtype), n)[:, -1]


def sample(model, cond: Conditioning, settings: SamplerSettings | None = None, progress=None, should_cancel=None,
           init: TokenInit | None = None, latent_affine=None) -> SampleResult:
    """Generate image tokens for every prompt x images_per_prompt (see the module docstring).

    `progress(done, total, tokens)` runs once per token with the tokens so far [B, done, D] (with an `init`, the
    whole canvas [B, T, D]: kept tokens from the start, the rest zero until sampled); on the model's device in the
    fast paths. `should_cancel()` is checked before every token. `init` keeps tokens (teacher forcing, `keep.py`).
    `latent_affine` (scale, shift) converts tokens to the VAE's raw latents (default: the model's own).
    One model runs one generation at a time: other threads wait for it.
    """
    mcfg = model.config
    s = _validate(model, cond, settings, init)
    h, w = grid_size(s.width, s.height, mcfg)
    branches = guidance_branches(cond, s.cfg, s.cfg_img)
    batch = prompt_batch(model, cond, s.width, s.height, s.images_per_prompt, branches)
    plan = GenerationPlan(s, family_of(mcfg), h, w, branches, batch.input_ids.shape[1],
                          len(cond.prompts) * s.images_per_prompt)
    forced = init.resolve(plan.n_img, h, w, mcfg.token_dim) if init is not None else None
    check_variation(s.denoise, forced is not None)
    if forced is not None and s.denoise == 0:  # nothing to regenerate: every token is its init, exactly
        forced = (forced[0], torch.ones_like(forced[1]))
    inits = forced[0] if forced is not None and s.denoise < 1 else None
    edit_shape = (len(batch.rows_with_image), *cond.edit_latents[0].shape) if batch.rows_with_image else None
    noise_src = NoiseSource(s.noise, s.seed, len(cond.prompts), s.images_per_prompt, mcfg.token_dim, plan.family,
                            edit_shape)
    path = _path(s.fast, model.device)
    with _one_caller(model), torch.inference_mode():
        stepper = _stepper(model, plan, path)
        c = _prefill(model, batch, cond, s.images_per_prompt)
        stepper.begin(plan, c, (~batch.real).sum(1).to(model.device), noise_src, inits)
        tokens = torch.zeros(plan.n_img, plan.total, mcfg.token_dim, device="cpu" if path == "eager" else model.device)
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
                tokens[:, k] = stepper.run(k, (forced[1][:, k], forced[0][:, k]) if kept else None)
            if progress is not None:
                progress(k + 1, plan.total, tokens if forced is not None else tokens[:, :k + 1])
    tokens = tokens.float().cpu()
    scale, shift = latent_affine or model.latent_affine
    latents = unpatchify(tokens, h, w, mcfg.latent_patch_size) / scale + shift
    return SampleResult(tokens, latents, s.width, s.height, stepper.path, stepper.fallback)


def tokens_to_latents(tokens: torch.Tensor, width: int, height: int, cfg, latent_affine=(1.0, 0.0)) -> torch.Tensor:
    """Latents for a (possibly partial) token sequence: missing tokens are zero (for previews)."""
    h, w = grid_size(width, height, cfg)
    full = torch.zeros(tokens.shape[0], h * w, tokens.shape[-1])
    full[:, :tokens.shape[1]] = tokens
    scale, shift = latent_affine
    return unpatchify(full, h, w, cfg.latent_patch_size) / scale + shift
