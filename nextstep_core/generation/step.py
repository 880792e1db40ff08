"""One image token, the gpt-fast way: one plain function that every per-token path runs.

    tok, c = decode_one_token(model, spec, inputs, slot)

From the previous token's condition `c` (the decoder's output at the last slot, one row per guidance branch), the
flow-matching head samples the token on every guidance row and combines them (`sample_image_token`); the guided
token goes back through `image_in_projector` into every row's KV cache at `slot`, and the decoder's output there is
the condition of the next token (`feed_back`). The plain loop (`loop.py`) calls it with the slot's position as a
tensor and `length = pos + 1`; the fixed-shape path (`graph.py`) calls it on static buffers with the whole cache
under a mask and captures that call as a CUDA graph. Both go through `token_step`, which also handles tokens kept
by a `TokenInit` (no head, the given token fed back) and the last token (nothing reads the decoder after it).

Nothing here reads a tensor's value on the host, so the function can be captured or compiled as it stands.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sampling import Guidance, HeadPlan, sample_token


@dataclass(frozen=True)
class TokenSpec:
    """What every token of a generation shares (a captured graph bakes it in)."""
    head: HeadPlan  # the head's time grid and sampler for this token's step count
    branches: int  # guidance rows per image: 1, 2 or 3
    use_norm: bool  # layer-normalise the sampled token


@dataclass
class TokenInputs:
    """What one token reads; on the fixed-shape path, views of static buffers."""
    c: torch.Tensor  # [rows, hidden] the previous token's condition
    noise: torch.Tensor  # [draws, B, D] float32, x0 first (only the first `head.draws` are read)
    cfg: float | torch.Tensor
    cfg_img: float | torch.Tensor
    pos_row: torch.Tensor | None  # the gen_pos_embed row added to c, for models that have the table
    init: torch.Tensor | None = None  # [B, D] the tokens a variation starts from (denoise < 1), else None


@dataclass
class Slot:
    """Where the token's feed-back goes: cache slot `pos` [1] (device), attention over `length` slots under `mask`."""
    pos: torch.Tensor
    mask: torch.Tensor | None
    length: int


def sample_image_token(model, spec: TokenSpec, x: TokenInputs) -> torch.Tensor:
    """The guided token [B, D] in the model dtype."""
    c = x.c if x.pos_row is None else x.c + x.pos_row
    cond = model.image_out_projector(c)
    noise = x.noise[:spec.head.draws]
    tok = sample_token(model.image_head, cond, noise, spec.head, Guidance(spec.branches, x.cfg, x.cfg_img), x.init)
    tok = tok.to(cond.dtype)
    return F.layer_norm(tok, (tok.shape[-1],), eps=1e-6) if spec.use_norm else tok


def feed_back(model, spec: TokenSpec, tok: torch.Tensor, slot: Slot) -> torch.Tensor:
    """Run `tok` [B, D] through the decoder at `slot` on every guidance row; the next condition [rows, hidden]."""
    emb = model.image_in_projector(tok).repeat(spec.branches, 1)[:, None]
    return model(emb, slot.pos, slot.mask, slot.length)[:, -1]


def decode_one_token(model, spec: TokenSpec, x: TokenInputs, slot: Slot) -> tuple[torch.Tensor, torch.Tensor]:
    """(token [B, D], next condition [rows, hidden]): the whole per-token step."""
    tok = sample_image_token(model, spec, x)
    return tok, feed_back(model, spec, tok, slot)


def token_step(model, spec: TokenSpec, x: TokenInputs, slot: Slot, forced=None, feed: bool = True):
    """`decode_one_token`, or its halves where a token is kept or is the last one: (token, next condition or None).

    `forced` = (keep [B] bool, tokens [B, D]) on the host: kept images take the given token, and when every image
    keeps it the head does not run (decided on the host copy, so there is no device sync per token).
    """
    if forced is None and feed:
        return decode_one_token(model, spec, x, slot)
    if forced is None or not bool(forced[0].all()):
        tok = sample_image_token(model, spec, x)
    else:
        tok = torch.zeros(x.noise.shape[1], x.noise.shape[2], device=x.c.device, dtype=x.c.dtype)
    if forced is not None:
        keep, given = forced[0].to(tok.device), forced[1].to(tok.device, tok.dtype)
        tok = torch.where(keep[:, None], given, tok)
    return tok, feed_back(model, spec, tok, slot) if feed else None
