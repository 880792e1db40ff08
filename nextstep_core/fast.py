"""The per-token fast path: fixed shapes, and on CUDA one graph per token.

Everything one image token needs — the head's whole sampling loop with guidance, the optional per-token norm,
feeding the token back through `image_in_projector` and one decoder step — runs on static buffers:

    c        [rows, hidden]   the condition for the next token (decoder output, final-normed)
    noise    [draws, B, D]    this token's noise, copied in before each step
    cfg_t, cfg_img_t          this token's guidance scales (device scalars, so a linear schedule needs no recapture)
    pos      [1] long         the cache slot the fed-back token goes to
    k_idx    [1] long         the index of the token being sampled (selects its gen_pos_embed row)
    token    [B, D]           the sampled token

On CUDA the step is captured once with `torch.cuda.CUDAGraph` (no Triton, no torch.compile needed) and replayed per
token, so a token costs a few host calls instead of thousands of kernel launches, and nothing synchronises with the
host inside the loop. Elsewhere the same step runs eagerly, which is how the CPU tests check it against the plain
loop.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .sampling import Guidance, sample_token

log = logging.getLogger("nextstep")


class StaticTokenStep:
    def __init__(self, model, cache, plan, capture: bool):
        dev, dtype, cfg = model.device, model.dtype, model.config
        self.model, self.cache, self.plan = model, cache, plan
        self.head = plan.head_plan(model, plan.settings.steps)  # its time embeddings: fixed, outside the graph
        self.c = torch.zeros(plan.rows, cfg.hidden_size, device=dev, dtype=dtype)
        self.noise = torch.zeros(self.head.draws, plan.n_img, cfg.token_dim, device=dev)
        self.cfg_t = torch.ones((), device=dev)
        self.cfg_img_t = torch.ones((), device=dev)
        self.pos = torch.full((1,), plan.prompt_len, dtype=torch.long, device=dev)
        self.k_idx = torch.zeros(1, dtype=torch.long, device=dev)
        self.token = torch.zeros(plan.n_img, cfg.token_dim, device=dev, dtype=dtype)
        self.pos_rows = _pos_rows(model, plan.total, plan.h, plan.w)
        cache.real[:, plan.prompt_len:] = True  # every slot after the prompt will hold a real image token
        self.graph = None
        if capture:
            saved = (self.c.clone(), self.pos.clone(), self.k_idx.clone())
            try:
                self._capture()
            except RuntimeError as e:  # a driver or kernel that cannot be captured: same results, without a graph
                log.warning("CUDA graph capture failed (%s); continuing without graphs.", str(e).splitlines()[0])
                self.graph = None
                self._restore(saved)

    def _sample(self):
        model = self.model
        c = self.c if self.pos_rows is None else self.c + self.pos_rows.index_select(0, self.k_idx)
        cc = model.image_out_projector(c)
        guide = Guidance(self.plan.branches, self.cfg_t, self.cfg_img_t)
        tok = sample_token(model.image_head, cc, self.noise, self.head, guide).to(self.token.dtype)
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

    def _step(self):
        self._sample()
        self._advance()

    def _capture(self):
        saved = (self.c.clone(), self.pos.clone(), self.k_idx.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up runs allocate their workspaces outside the graph
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self._restore(saved)  # capture records without running, but keep the state exact regardless

    def _restore(self, saved):
        self.c.copy_(saved[0])
        self.pos.copy_(saved[1])
        self.k_idx.copy_(saved[2])

    def run(self, noise: torch.Tensor, cfg: float, cfg_img: float, last: bool = False, forced=None) -> torch.Tensor:
        """Sample one token and advance the decoder; returns the static token buffer (read it before the next run).

        With `last`, only the head runs: nothing reads the decoder after the final token. `forced` = (keep [B] bool,
        tokens [B, D]): kept images take the given token, and when every image keeps it the head does not run.
        """
        self.noise.copy_(noise, non_blocking=True)
        self.cfg_t.fill_(cfg)
        self.cfg_img_t.fill_(cfg_img)
        if forced is None and self.graph is not None and not last:
            self.graph.replay()
            return self.token
        keep = None if forced is None else forced[0].to(self.token.device)
        if keep is None or not bool(keep.all()):
            self._sample()
        if keep is not None:
            self.token.copy_(torch.where(keep[:, None], forced[1].to(self.token.device, self.token.dtype), self.token))
        if not last:
            self._advance()
        return self.token


def _pos_rows(model, total: int, h: int, w: int):
    """The gen_pos_embed row for each token index (plus one spare), or None when the model has no table."""
    if model.gen_pos_embed is None:
        return None
    rows = [model.pos_embed_for(k, h, w) for k in range(total)]
    rows.append(torch.zeros_like(rows[0]))
    return torch.stack(rows).to(model.device, model.dtype)


def graphs_available(device: torch.device) -> bool:
    return device.type == "cuda" and hasattr(torch.cuda, "CUDAGraph")

