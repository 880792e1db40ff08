"""Text side: the Qwen2 tokenizer of the model folder, the prompt layout, and patchify/unpatchify.

Per row (reference notes §2.3, §5, §14.2):
    [left pads] [BOS if the family prepends one] caption [" " + positive] <|image_area|> h * w <|begin_of_image|>
where h, w is the token grid (H/16, W/16). The prefix is tokenised on its own with special tokens, minus its
first id when the tokenizer has a BOS token, plus <|begin_of_image|> — literally what the reference does. An edit
caption carries `<image>`, replaced by `<|image_area|>h*w<|begin_of_image|><|image_placeholder|>×(h·w)
<|end_of_image|>` for the input image's own grid; the placeholders later receive the image's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import NextStepError
from ..model.family import family_of
from ..weights.config import ModelConfig
from ..weights.tokenizer import BOI, EOI, IMAGE_AREA, PLACEHOLDER, Tokenizer

IMAGE_MARKER = "<image>"
# special tokens of the image layout: written by `prefix_ids` / `image_string`, never taken from a user's text
# (one in a prompt would open a second image area or shift the placeholders). Other special tokens, such as
# <|endoftext|>, are tokenised as specials, as the reference does.
LAYOUT_TOKENS = (IMAGE_AREA, BOI, EOI, PLACEHOLDER)


def check_text(name: str, text) -> None:
    """Text the tokenizer can take: a str of valid UTF-8 (argv bytes that are not arrive as lone surrogates), without
    the image layout's special tokens."""
    if not isinstance(text, str):
        raise NextStepError(f"{name} is a {type(text).__name__}, not text.")
    found = [t for t in LAYOUT_TOKENS if t in text]
    if found:
        raise NextStepError(f"{name} contains {', '.join(found)}: the image layout's own tokens cannot be part of a "
                            f"prompt; remove them (to edit an input image, write {IMAGE_MARKER} and give the image).")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start].encode("utf-8", "surrogateescape")
        raise NextStepError(f"{name} is not valid UTF-8 text (byte 0x{bad.hex()} at character {e.start + 1}): "
                            "set your terminal to UTF-8, or pass the text in UTF-8.") from None


def grid_size(width: int, height: int, cfg: ModelConfig) -> tuple[int, int]:
    """Token grid (h, w) for a pixel size."""
    f = cfg.down_factor
    return height // f, width // f


def image_string(h: int, w: int) -> str:
    return f"{IMAGE_AREA}{h}*{w}{BOI}{PLACEHOLDER * (h * w)}{EOI}"


def prefix_ids(tok: Tokenizer, cfg: ModelConfig, h: int, w: int) -> list[int]:
    ids = tok.encode(f"{IMAGE_AREA}{h}*{w}")
    if tok.bos_token is not None:
        ids = ids[1:]
    return ids + [cfg.boi]


@dataclass
class PromptBatch:
    input_ids: torch.Tensor  # [R, S] left padded
    real: torch.Tensor  # [R, S] bool, False on padding
    rows_with_image: list[int]  # rows whose placeholders take an input image, in order


def build_rows(prompts: list[str], positive: str, negative: str, n_per_prompt: int, branches: int,
               edit_sizes: list[tuple[int, int]] | None) -> tuple[list[str], list[int]]:
    """Caption strings for every guidance row, and which rows carry an input image.

    Rows: [cond × B] + ([image + negative × B] if 3 branches) + ([negative × B] if ≥ 2 branches), B = prompts ×
    n_per_prompt, caption-major. `edit_sizes` holds each prompt's input token grid (h, w).
    """
    cond, images = [], []
    for p_i, p in enumerate(prompts):
        for _ in range(n_per_prompt):
            text = p
            if edit_sizes is not None:
                text = text.replace(IMAGE_MARKER, image_string(*edit_sizes[p_i]))
            cond.append(f"{text} {positive}" if positive else text)
            images.append(edit_sizes is not None)
    rows = list(cond)
    if branches == 3:
        # the reference gives every image+negative row the first image's size; our rows use their own image
        for p_i in range(len(prompts)):
            for _ in range(n_per_prompt):
                rows.append(image_string(*edit_sizes[p_i]) + negative)
                images.append(True)
    if branches >= 2:
        rows += [negative] * len(cond)
        images += [False] * len(cond)
    return rows, [i for i, has in enumerate(images) if has]


def tokenize_rows(tok: Tokenizer, cfg: ModelConfig, rows: list[str], h: int, w: int,
                  image_rows: list[int]) -> PromptBatch:
    prefix = prefix_ids(tok, cfg, h, w)
    bos = tok.bos_token if (family_of(cfg).prepends_bos and tok.bos_token is not None) else ""
    seqs = [tok.encode(bos + r) + prefix for r in rows]
    longest = max(len(s) for s in seqs)
    pad = tok.token_to_id(tok.pad_token) if tok.pad_token else None
    pad = cfg.pad_token_id_added if pad is None else pad
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    real = torch.zeros((len(seqs), longest), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, longest - len(s):] = torch.tensor(s, dtype=torch.long)
        real[i, longest - len(s):] = True
    return PromptBatch(ids, real, image_rows)


def patchify(z: torch.Tensor, p: int) -> torch.Tensor:
    """[B,C,H,W] -> [B, (H/p)(W/p), C·p·p]; raster order over the grid, channel-major inside a token."""
    b, c, h, w = z.shape
    if h % p or w % p:
        raise NextStepError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
    z = z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return z.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """Inverse of `patchify` for a token grid of h rows and w columns (non-square grids included)."""
    b, n, d = tokens.shape
    if n != h * w:
        raise NextStepError(f"{n} tokens do not fill a {h}x{w} grid")
    c = d // (p * p)
    z = tokens.reshape(b, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return z.reshape(b, c, h * p, w * p)
