"""The per-token fast path: fixed shapes, and on CUDA one graph per token, captured once and kept between calls.

Everything one image token needs — the head's whole sampling loop with guidance, the optional per-token norm,
feeding the token back through `image_in_projector` and one decoder step — runs on static buffers:

    c        [rows, hidden]          the condition for the next token (decoder output, final-normed)
    noise    [chunk, draws, B, D]    the noise of up to `NOISE_CHUNK` tokens, drawn and copied in one go
    guide    [chunk, 2]              their guidance scales (cfg, cfg_img), so a linear schedule needs no recapture
    slot     [1] long                the row of `noise` / `guide` the next token reads
    pos      [1] long                the cache slot the fed-back token goes to
    k_idx    [1] long                the index of the token being sampled (selects its gen_pos_embed row)
    token    [B, D]                  the sampled token

On CUDA the step is captured once with `torch.cuda.CUDAGraph` (no Triton, no torch.compile needed) and replayed per
token — the last one too, whose decoder step writes a spare cache slot nobody reads — so a token costs one host
call instead of thousands of kernel launches, and nothing synchronises with the host inside the loop. Elsewhere the
same step runs eagerly, which is how the CPU tests check it against the plain loop.

The step, its buffers and its KV cache stay on the model (`model.step_cache`) for the next generation of the same
shape (`step_key`): a new prompt only refills the cache and the buffers. `model.release_step_cache()` frees them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import Guidance, sample_token

log = logging.getLogger("nextstep")

NOISE_CHUNK = 1024  # tokens of noise staged at once: a 512x512 image in one copy, bounded memory for huge ones
WARMUP_STEPS = 2  # eager steps before capture (they allocate the workspaces outside the graph)


def step_key(model, plan) -> tuple:
    """What a captured step bakes in: shapes, the head's time grid and sampler, the dtype, and where every weight
    lives (a host that moves the model off the device and back, as ComfyUI does, gets a fresh capture). A weight
    packed for the CPU (`cpu_pack`) has no data pointer; it is a new tensor whenever it is packed again."""
    s = plan.settings
    where = hash(tuple(id(t) if t.is_mkldnn else t.data_ptr() for t in (*model.parameters(), *model.buffers())))
    return (plan.rows, plan.n_img, plan.branches, plan.prompt_len, plan.h, plan.w, s.steps, s.timesteps_shift,
            s.sampler, s.use_norm, s.head_loop, s.compile_head, plan.family.name, model.dtype, str(model.device), where)


def cache_slots(plan) -> int:
    """KV slots of the fixed-shape path: the prompt, every image token's feed-back (the last one's included, as
    the captured step always runs the decoder), at least the warm-up's steps, rounded up to 16 so the mask rows
    are aligned for the fused attention kernels. Spare slots are masked until written."""
    n = plan.prompt_len + max(plan.total, WARMUP_STEPS)
    return -(-n // 16) * 16


@dataclass
class StepCache:
    key: tuple
    step: "StaticTokenStep"


class StaticTokenStep:
    def __init__(self, model, cache, plan, capture: bool):
        dev, dtype, cfg = model.device, model.dtype, model.config
        self.model, self.cache, self.plan = model, cache, plan
        self.head = plan.head_plan(model, plan.settings.steps)  # its time embeddings: fixed, outside the graph
        self.head = self.head.for_graph_capture() if capture else self.head  # no torch.compile under capture
        self.chunk = max(WARMUP_STEPS, min(plan.total, NOISE_CHUNK))
        self.c = torch.zeros(plan.rows, cfg.hidden_size, device=dev, dtype=dtype)
        self.noise = torch.zeros(self.chunk, self.head.draws, plan.n_img, cfg.token_dim, device=dev)
        self.guide = torch.ones(self.chunk, 2, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.full((1,), plan.prompt_len, dtype=torch.long, device=dev)
        self.k_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.token = torch.zeros(plan.n_img, cfg.token_dim, device=dev, dtype=dtype)
        self.pos_rows = _pos_rows(model, plan.total, plan.h, plan.w)
        self.staged = None  # the pinned host copy of the current noise chunk (alive until its copy is done)
        self.noise_src = None
        cache.real[:, plan.prompt_len:] = True  # every slot after the prompt will hold a real image token
        self.graph = None
        self.capture_error: str | None = None
        if capture:
            saved = self._state()
            try:
                self._capture()
            except RuntimeError as e:  # a driver or kernel that cannot be captured: same results, without a graph
                self.capture_error = str(e).splitlines()[0] if str(e) else type(e).__name__
                log.warning("CUDA graph capture failed (%s); continuing without graphs (slower, same results).",
                            self.capture_error)
                self.graph = None
            self._restore(saved)

    @property
    def path(self) -> str:
        return "graph" if self.graph is not None else "static"

    def begin(self, plan, c: torch.Tensor, noise_src) -> None:
        """Start a generation on this (possibly kept) step: `c` is the prefill's last condition per row."""
        self.plan, self.noise_src = plan, noise_src
        self.cache.real[:, plan.prompt_len:] = True
        self.c.copy_(c)
        self.pos.fill_(plan.prompt_len)
        self.k_idx.zero_()

    def _sample(self):
        model = self.model
        noise = self.noise.index_select(0, self.slot)[0]
        guide = self.guide.index_select(0, self.slot)[0]
        c = self.c if self.pos_rows is None else self.c + self.pos_rows.index_select(0, self.k_idx)
        cc = model.image_out_projector(c)
        tok = sample_token(model.image_head, cc, noise, self.head, Guidance(self.plan.branches, guide[0], guide[1]))
        tok = tok.to(self.token.dtype)
        if self.plan.settings.use_norm:
            tok = F.layer_norm(tok, (tok.shape[-1],), eps=1e-6)
        self.token.copy_(tok)

    def _advance(self):
        """Feed `token` back through the decoder at slot `pos`: the condition for the next token."""
        model = self.model
        emb = model.image_in_projector(self.token).repeat(self.plan.branches, 1)[:, None]
        self.c.copy_(model.forward_static(emb, self.cache, self.pos)[:, -1])
        self.pos.add_(1)
        self.k_idx.add_(1)
        self.slot.add_(1)

    def _step(self):
        self._sample()
        self._advance()

    def _capture(self):
        saved = self._state()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs allocate their workspaces outside the graph
            for _ in range(WARMUP_STEPS):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        graph = torch.cuda.CUDAGraph()
        try:  # other threads of the host process (a UI server) may touch CUDA meanwhile: only ours is checked
            ctx = torch.cuda.graph(graph, capture_error_mode="thread_local")
        except TypeError:  # torch without capture_error_mode
            ctx = torch.cuda.graph(graph)
        with ctx:
            self._step()
        self.graph = graph

    def _state(self):
        return self.c.clone(), self.pos.clone(), self.k_idx.clone(), self.slot.clone()

    def _restore(self, saved):
        for buf, value in zip((self.c, self.pos, self.k_idx, self.slot), saved):
            buf.copy_(value)

    def _stage(self, k: int) -> None:
        """Draw the noise and guidance of tokens k.. (one chunk) and copy them to the device in one go each."""
        n = min(self.chunk, self.plan.total - k)
        noise = torch.stack([self.noise_src.next(self.plan.draws) for _ in range(n)])
        guide = torch.tensor([self.plan.guidance(j) for j in range(k, k + n)], dtype=torch.float32)
        if self.noise.is_cuda:
            noise, guide = noise.pin_memory(), guide.pin_memory()
        self.staged = (noise, guide)  # a non-blocking copy reads them after this returns
        self.noise[:n].copy_(noise, non_blocking=True)
        self.guide[:n].copy_(guide, non_blocking=True)
        self.slot.zero_()

    def run(self, k: int, forced=None) -> torch.Tensor:
        """Sample token k and advance the decoder; returns the static token buffer (read it before the next run).

        `forced` = (keep [B] bool, tokens [B, D]): kept images take the given token, and when every image keeps it
        the head does not run; after the last token the decoder does not run either (nothing reads it).
        """
        if k % self.chunk == 0:
            self._stage(k)
        last = k + 1 == self.plan.total
        if forced is None and self.graph is not None:
            self.graph.replay()
            return self.token
        if forced is None or not bool(forced[0].all()):  # decided on the host copy: no device sync per token
            self._sample()
        if forced is not None:
            keep = forced[0].to(self.token.device)
            self.token.copy_(torch.where(keep[:, None], forced[1].to(self.token.device, self.token.dtype), self.token))
        if not last:
            self._advance()
        return self.token


def static_step(model, plan, capture: bool):
    """The kept step for this plan's shape, or None; a kept step of another shape is released first."""
    kept = model.step_cache
    if kept is not None and kept.key == step_key(model, plan) + (capture,) and \
            (kept.step.graph is not None or not capture):
        kept.step.cache.reset()
        return kept.step
    model.release_step_cache()
    return None


def new_static_step(model, plan, cache, capture: bool) -> StaticTokenStep:
    step = StaticTokenStep(model, cache, plan, capture)
    model.step_cache = StepCache(step_key(model, plan) + (capture,), step)
    return step


def _pos_rows(model, total: int, h: int, w: int):
    """The gen_pos_embed row for each token index (plus one spare), or None when the model has no table."""
    if model.gen_pos_embed is None:
        return None
    rows = [model.pos_embed_for(k, h, w) for k in range(total)]
    rows.append(torch.zeros_like(rows[0]))
    return torch.stack(rows).to(model.device, model.dtype)


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.cuda, "CUDAGraph")
