"""The per-token step on fixed shapes: kept between calls, on CUDA replayed as a graph, and checked on first use.

Every input of one image token lives in a static buffer:

    c         [rows, hidden]                 the condition for the next token (decoder output, final-normed)
    noise     [chunk + spare, draws, B, D]   the noise of up to `NOISE_CHUNK` tokens, staged in one copy
    guide     [chunk + spare, 2]             their guidance scales (cfg, cfg_img): a linear schedule needs no recapture
    init      [chunk + spare, B, D] or None  their init tokens, where a variation (denoise < 1) starts from them
    slot      [1] long                       the row of `noise` / `guide` the next token reads
    pos       [1] long                       the cache slot its feed-back goes to
    k_idx     [1] long                       the token's index (selects its gen_pos_embed row)
    rows      RowSlots                       each row's real (non-pad) slots
    token     [B, D]                         the sampled token

`_static_token` gathers them into the arguments of `step.token_step` — the function the plain loop calls — with the
whole cache under a mask, writes the results back and advances the counters. On CUDA that call is captured once per
head step count (step annealing captures each count when it first reaches it, into one memory pool) and replayed
per token, so a token costs one host call instead of thousands of kernel launches and nothing waits on the host
inside the loop. Elsewhere (`fast="static"`, which is how the CPU tests run this path) it runs as it is.

What a step bakes in is declared once (`step_key`): the fields `settings.GRAPH_BAKED` names, the plan's shapes, the
dtype, the device, and where every weight lives. The prompt is not: the cache has room for a prompt of up to
`prompt_slots` tokens (a multiple of PROMPT_BUCKET), so a prompt of another length reuses the step.

Self-check: the first token a step runs for each head step count is computed by the fixed step and again by the
plain step on the same inputs (`length = pos + 1`, as the plain loop attends). A difference beyond the dtype's
tolerance, or an error in warm-up, capture or replay, switches the rest of the generation to the plain step on the
same caches and noise, with one warning; the step is remembered as broken for its key, so later generations take
the plain loop at once. `SampleResult.path` says which path ran and `SampleResult.fallback` why it changed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from ..model.attention import RowSlots
from . import compile as compiling
from .memory import check_fits
from .settings import graph_baked
from .step import Slot, TokenInputs, TokenSpec, token_step

log = logging.getLogger("nextstep")

NOISE_CHUNK = 1024  # tokens of noise staged at once: a 512x512 image in one copy, bounded memory for huge ones
WARMUP_STEPS = 2  # eager steps before a capture (they allocate the workspaces outside the graph)
PROMPT_BUCKET = 64  # prompt slots are rounded up to this, so prompts of other lengths share one step
# How far the fixed step may be from the plain one on its first token (relative L2 of the token and of the next
# condition). They differ only in the round-off of attending over the whole masked cache instead of the filled slots:
# measured on random checkpoints on the CPU (tiny, small, medium; both families; cfg 1 and 3), the token agreed
# exactly and the next condition to at most 1e-6 in fp32, 1.8e-3 in fp16 and 1.4e-2 in bf16. A wrong graph (stale
# addresses, a broken kernel) is off by order 1.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 0.1}
REPORT = ("please report it with the output of `python -m nextstep_core doctor --json report.json` "
          "(attach report.json)")


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.cuda, "CUDAGraph")


def _capture(fn, restore, pool):
    """Warm `fn()` up on a side stream (its workspaces are allocated outside the graph), `restore()` the state it
    changed, and record `fn()` as a CUDA graph in memory `pool` (None: a new one). Returns (graph, pool);
    `graph.replay()` runs it again. The one CUDA-specific function here: tests stand in for it on the CPU."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_STEPS):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    restore()
    pool = pool if pool is not None else torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    try:  # other threads of the host process (a UI server) may touch CUDA meanwhile: only ours is checked
        ctx = torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local")
    except TypeError:  # torch without capture_error_mode
        ctx = torch.cuda.graph(graph, pool=pool)
    with ctx:
        fn()
    return graph, pool


def prompt_slots(prompt_len: int) -> int:
    return -(-prompt_len // PROMPT_BUCKET) * PROMPT_BUCKET


def cache_len(plan) -> int:
    """KV slots of the fixed-shape path: the prompt's bucket, every image token's feed-back (the last one's too,
    as a replayed step always runs the decoder) and room for a warm-up run at the last token."""
    return prompt_slots(plan.prompt_len) + plan.total + WARMUP_STEPS


def step_key(model, plan, capture: bool) -> tuple:
    """What a kept step bakes in. A weight packed for the CPU (`cpu_pack`) has no data pointer; it is a new tensor
    whenever it is packed again. A host that moves the model off the device and back (ComfyUI) gets a new step."""
    where = hash(tuple(id(t) if t.is_mkldnn else t.data_ptr() for t in (*model.parameters(), *model.buffers())))
    shapes = (plan.rows, plan.n_img, plan.branches, plan.h, plan.w, prompt_slots(plan.prompt_len))
    return (graph_baked(plan.settings), plan.family.name, shapes, model.dtype, str(model.device), where, capture)


@dataclass
class StepCache:
    """The kept step of one key."""
    key: tuple
    step: "FixedStep"


class Fallback(Exception):
    """The fixed step cannot be trusted for this key (the message says why)."""


class FixedStep:
    def __init__(self, model, plan, capture: bool):
        dev, dtype, cfg = model.device, model.dtype, model.config
        self.model, self.capture = model, capture
        self.compiled = compiling.wanted(plan.settings.compile, dev)  # its blocks through torch.compile
        self.max_len = cache_len(plan)
        model.rope_rows(self.max_len, dtype, dev)  # grown now, not under a graph that would keep reading the old one
        self.caches = model.setup_caches(plan.rows, self.max_len)
        self.chunk = max(WARMUP_STEPS, min(plan.total, NOISE_CHUNK))
        self.c = torch.zeros(plan.rows, cfg.hidden_size, device=dev, dtype=dtype)
        self.noise = torch.zeros(self.chunk + WARMUP_STEPS, plan.draws, plan.n_img, cfg.token_dim, device=dev)
        self.guide = torch.ones(self.chunk + WARMUP_STEPS, 2, device=dev)
        self.init = None if plan.settings.denoise == 1 else torch.zeros_like(self.noise[:, 0])  # [chunk + spare, B, D]
        self.slot, self.pos, self.k_idx = (torch.zeros(1, dtype=torch.long, device=dev) for _ in range(3))
        self.rows = RowSlots(torch.zeros(plan.rows, dtype=torch.long, device=dev), self.max_len, dtype)
        self.token = torch.zeros(plan.n_img, cfg.token_dim, device=dev, dtype=dtype)
        self.pos_rows = plan.pos_rows(model, spare=WARMUP_STEPS)
        self.specs: dict[int, TokenSpec] = {}  # per head step count; a graph reads its head plan's tensors
        self.graphs: dict[int, object] = {}
        self.checked: set[tuple] = set()  # (step count, graph or not) whose first token was checked
        self.pool = None  # the memory pool all of this step's graphs share
        self.plan, self.key = plan, step_key(model, plan, capture)
        self.staged = None  # the host copies of the current chunk's noise, guidance and inits (alive until copied)
        self.fallback: str | None = None

    @property
    def path(self) -> str:
        """graph or static, with "+compile" while its blocks ran compiled; eager after a fallback."""
        if self.fallback is not None:
            return "eager"
        return ("graph" if self.capture else "static") + ("+compile" if self.compiled and compiling.active() else "")

    def begin(self, plan, c: torch.Tensor, start: torch.Tensor, noise_src, inits=None) -> None:
        """Start a generation on this (possibly kept) step: `c` is the prefill's last condition per row, `inits`
        [B, T, D] (host) the tokens a variation starts from (denoise < 1, baked into the key), else None."""
        self.plan, self.noise_src, self.fallback, self.inits = plan, noise_src, None, inits
        self.c.copy_(c)
        self.rows.refill(start)
        self.pos.fill_(plan.prompt_len)
        self.k_idx.zero_()

    def run(self, k: int, forced=None) -> torch.Tensor:
        """Sample token k and advance the decoder; returns the static token buffer (read it before the next run).

        `forced` = (keep [B] bool, tokens [B, D]): kept images take the given token (such a token runs uncaptured);
        after the last token the decoder runs only inside a graph replay (a spare slot nobody reads)."""
        if k % self.chunk == 0:
            self._stage(k)
        spec = self._spec(k)
        feed = k + 1 < self.plan.total
        if self.fallback is None:
            try:
                self._fixed(k, spec, forced, feed)  # on Fallback it has left the state where token k starts
                return self.token
            except Fallback as e:
                self._fall_back(str(e))
        return self._plain_token(k, spec, forced, feed)

    # ---- the fixed step

    def _spec(self, k: int) -> TokenSpec:
        steps = self.plan.steps_at(k)
        if steps not in self.specs:
            spec = self.plan.token_spec(self.model, k)
            head = replace(spec.head, compiled=self.compiled and head_compiles(self.model.image_head, spec.head))
            self.specs[steps] = TokenSpec(head, spec.branches, spec.use_norm, compiled=self.compiled)
        return self.specs[steps]

    def _static_token(self, spec: TokenSpec, forced=None, feed: bool = True) -> None:
        """One token on the static buffers: what a graph captures (with `forced=None, feed=True`)."""
        noise = self.noise.index_select(0, self.slot)[0]
        guide = self.guide.index_select(0, self.slot)[0]
        row = None if self.pos_rows is None else self.pos_rows.index_select(0, self.k_idx)
        mask = self.rows.decode_mask(self.pos, self.max_len, self.model.group)
        init = None if self.init is None else self.init.index_select(0, self.slot)[0]
        x = TokenInputs(self.c, noise, guide[0], guide[1], row, init)
        tok, c = token_step(self.model, spec, x, Slot(self.pos, mask, self.max_len), forced, feed)
        self._commit(tok, c)

    def _plain_token(self, k: int, spec: TokenSpec, forced=None, feed: bool = True) -> torch.Tensor:
        """Token k by the plain loop's step on this step's caches and staged noise (attention over pos + 1 slots),
        uncompiled: it is the reference the fixed step is checked against."""
        model, plan = self.model, self.plan
        spec = replace(spec, head=replace(spec.head, compiled=False), compiled=False)
        dev = self.c.device
        row = None if self.pos_rows is None else self.pos_rows[k]
        init = None if self.init is None else self.staged[2][k % self.chunk].to(dev)
        x = TokenInputs(self.c.clone(), self.staged[0][k % self.chunk].to(dev), *plan.guidance(k), row, init)
        p = plan.prompt_len + k
        pos = torch.tensor([p], device=dev)
        slot = Slot(pos, self.rows.decode_mask(pos, p + 1, model.group), p + 1)
        tok, c = token_step(model, spec, x, slot, forced, feed)
        self._commit(tok, c)
        return self.token

    def _commit(self, tok: torch.Tensor, c: torch.Tensor | None) -> None:
        self.token.copy_(tok)
        if c is not None:
            self.c.copy_(c)
        self.pos.add_(1)
        self.k_idx.add_(1)
        self.slot.add_(1)

    # ---- capture and self-check

    def _graph(self, steps: int, spec: TokenSpec):
        if steps in self.graphs:
            return self.graphs[steps]
        saved = self._state()
        try:
            graph, self.pool = _capture(lambda: self._static_token(spec), lambda: self._restore(saved), self.pool)
        except Exception as e:  # a driver, kernel or op that cannot run or be captured here
            raise Fallback(f"CUDA graph capture failed ({compiling.first_line(e)})") from None
        finally:
            self._restore(saved)
        self.graphs[steps] = graph
        return graph

    def _fixed(self, k: int, spec: TokenSpec, forced, feed: bool) -> None:
        """Token k on the fixed step (a graph replay where one applies); its first token per step count checked."""
        steps = len(spec.head.grid) - 1
        replay = forced is None and self.capture
        fixed = self._graph(steps, spec).replay if replay else lambda: self._static_token(spec, forced, feed)
        if (steps, replay) in self.checked:
            # nothing is saved per token: a replay fails before it runs, and the static step writes its results
            # and counters last, after everything that can raise
            _guarded(fixed, self.path)
            return
        saved = self._state()
        self._plain_token(k, spec, forced, feed)
        want = self.token.clone(), self.c.clone()
        self._restore(saved)
        try:
            _guarded(fixed, self.path)
            err = max(_rel_err(self.token, want[0]), _rel_err(self.c, want[1]) if feed else 0.0)
            tol = TOLERANCE.get(self.model.dtype, 0.1)
            if not err <= tol:
                raise Fallback(f"its first token differs from the plain step's by {err:.3g} (tolerance {tol:g} in "
                               f"{self.model.dtype})")
        except Fallback:
            self._restore(saved)
            raise
        self.checked.add((steps, replay))

    def _fall_back(self, why: str) -> None:
        self.fallback = why
        self.model.broken_steps[self.key] = why  # later calls of this key take the plain loop at once
        self.model.step_cache = None  # freed once this generation ends
        log.warning("NextStep: the %s per-token path is not used on %s: %s. This generation continues on the "
                    "plain path (slower, same results); %s.", "CUDA-graph" if self.capture else "fixed-shape",
                    self.model.device, why, REPORT)

    def _state(self):
        return self.c.clone(), self.pos.clone(), self.k_idx.clone(), self.slot.clone(), self.token.clone()

    def _restore(self, saved) -> None:
        for buf, value in zip((self.c, self.pos, self.k_idx, self.slot, self.token), saved):
            buf.copy_(value)

    def _stage(self, k: int) -> None:
        """Draw the noise and guidance of tokens k.. (one chunk) and copy them to the device in one go each."""
        plan = self.plan
        n = min(self.chunk, plan.total - k)
        noise = torch.stack([self.noise_src.next(plan.draws) for _ in range(n)])
        guide = torch.tensor([plan.guidance(j) for j in range(k, k + n)], dtype=torch.float32)
        init = self.inits[:, k:k + n].transpose(0, 1).contiguous() if self.init is not None else None
        if self.noise.is_cuda:
            noise, guide = noise.pin_memory(), guide.pin_memory()
            init = init.pin_memory() if init is not None else None
        self.staged = (noise, guide, init)  # a non-blocking copy reads them after this returns
        self.noise[:n].copy_(noise, non_blocking=True)
        self.guide[:n].copy_(guide, non_blocking=True)
        if init is not None:
            self.init[:n].copy_(init, non_blocking=True)
        self.slot.zero_()


def head_compiles(head, plan) -> bool:
    """The head's step compiles only in the fused loop and with dense weights: quantised head layers dequantise once
    per token outside the step (`quant.expanded_weights`)."""
    if plan.loop != "fused":
        return False
    if any(getattr(m, "weight_scale", None) is not None for m in head.modules()):
        compiling.warn_once("quantised head", "NextStep: the head has quantised layers; its step runs uncompiled "
                                              "(the decoder layers are still compiled).")
        return False
    return True


def _guarded(fn, path: str) -> None:
    try:
        fn()
    except Exception as e:  # whatever a kernel or a graph replay raises here
        raise Fallback(f"the {path} step raised {compiling.first_line(e)}") from None


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def fixed_step(model, plan, capture: bool) -> FixedStep | None:
    """The kept step for this plan (its caches installed), a new one, or None when this key is known to be broken.

    A kept step of another key is released first, so its memory counts as free when the new one is allocated."""
    if compiling.wanted(plan.settings.compile, model.device):
        compiling.prepare(model)  # before the key: it changes where the weights live
    key = step_key(model, plan, capture)
    if key in model.broken_steps:
        return None
    kept = model.step_cache
    if kept is not None and kept.key == key:
        model.install_caches(kept.step.caches)
        return kept.step
    model.release_step_cache()
    check_fits(model, plan.rows, cache_len(plan), plan=plan)
    step = FixedStep(model, plan, capture)
    model.step_cache = StepCache(step.key, step)
    return step


def broken_reason(model, plan, capture: bool) -> str | None:
    """Why this plan's key runs the plain loop, if an earlier generation found its fixed step wrong."""
    return model.broken_steps.get(step_key(model, plan, capture))
