"""Keep inputs from files (the command line's --init-image / --init-latents with --mask / --keep-rows).

Everything is read and checked by `check_keep_inputs` before any model loads: a wrong size or a missing file fails
in well under a second. Only encoding an init image waits for the VAE (`KeepInputs.token_init`).

    keep = check_keep_inputs(init_image="fox.png", mask="sky.png", width=None, height=None)   # size from the image
    res = sample(model, cond, settings.replace(width=keep.width, height=keep.height), init=keep.token_init(vae, cfg))
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..errors import NextStepError
from ..generation.keep import TokenInit, keep_from_mask, keep_rows
from ..generation.settings import TOKEN_PIXELS


@dataclass
class KeepInputs:
    """A checked init canvas: pixels [1, 3, H, W] (to encode), or tokens [B, T, D] / raw latents [B, C, H/8, W/8]
    read from an .npz, and the keep mask [B or 1, T]."""
    width: int
    height: int
    keep: torch.Tensor
    pixels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    latents: torch.Tensor | None = None

    def token_init(self, vae, cfg) -> TokenInit:
        """The TokenInit for `sample`, in the token space that `vae`'s latent settings define."""
        affine = (vae.config.scaling_factor, vae.config.shift_factor)
        if self.pixels is not None:
            from .images import encode_latents

            return TokenInit.from_latents(encode_latents(vae, self.pixels), cfg, affine, self.keep)
        if self.tokens is not None:  # exactly what the sampler fed back: a reroll reproduces the kept rows bit for bit
            if self.tokens.shape[-1] != cfg.token_dim:
                raise NextStepError(f"the init tokens have {self.tokens.shape[-1]} values per token, this model "
                                    f"takes {cfg.token_dim}: use latents saved from a NextStep model.")
            return TokenInit(self.tokens, self.keep)
        return TokenInit.from_latents(self.latents, cfg, affine, self.keep)


def check_keep_inputs(init_image: str | None = None, init_latents: str | None = None, mask: str | None = None,
                      rows: int | None = None, width: int | None = None, height: int | None = None):
    """KeepInputs for the given files, or None without an init; a NextStepError says what is wrong.

    The init decides the image size: `width`/`height` may be None (taken from it) or must equal it.
    `mask` is an image of the output's size, white = regenerate, black = keep: a token is regenerated when any of
    its pixels is lighter than mid-grey (so JPEG noise in black areas keeps them). `rows` keeps the top token rows.
    """
    if init_image is None and init_latents is None:
        if mask is not None or rows is not None:
            raise NextStepError("--mask and --keep-rows say what to keep of an init: add --init-image or "
                                "--init-latents.")
        return None
    if init_image is not None and init_latents is not None:
        raise NextStepError("give --init-image or --init-latents, not both.")
    if (mask is None) == (rows is None):
        raise NextStepError("with an init, say what to keep: --mask PATH (white = regenerate) or --keep-rows K "
                            "(not both).")
    if init_image is not None:
        pixels = _read_image(init_image, "--init-image")
        found = dict(pixels=pixels[None])
        size = (pixels.shape[-1], pixels.shape[-2])
    else:
        found = _read_npz(init_latents)
        lat = found["latents"]
        size = (lat.shape[-1] * 8, lat.shape[-2] * 8)
    what = "--init-image" if init_image is not None else "--init-latents"
    _check_size(size, width, height, what)
    h, w = size[1] // TOKEN_PIXELS, size[0] // TOKEN_PIXELS
    if rows is not None:
        keep = keep_rows(rows, h, w)[None]
    else:
        regen = _read_image(mask, "--mask").mean(0, keepdim=True)  # grey
        if tuple(regen.shape[-2:]) != (size[1], size[0]):
            raise NextStepError(f"the mask {mask} is {regen.shape[-1]}x{regen.shape[-2]}; it must be the output's "
                                f"size, {size[0]}x{size[1]} (white = regenerate, black = keep).")
        keep = keep_from_mask((regen[0] > 0.5).float(), h, w)
    return KeepInputs(size[0], size[1], keep, **found)


def _check_size(size: tuple[int, int], width: int | None, height: int | None, what: str) -> None:
    w, h = size
    if w % TOKEN_PIXELS or h % TOKEN_PIXELS or not w or not h:
        fit = [max(TOKEN_PIXELS, side // TOKEN_PIXELS * TOKEN_PIXELS) for side in (w, h)]
        raise NextStepError(f"{what} is {w}x{h}; its sides must be multiples of {TOKEN_PIXELS} (one image token "
                            f"each). Crop or resize it, e.g. to {fit[0]}x{fit[1]}.")
    if (width is not None and width != w) or (height is not None and height != h):
        raise NextStepError(f"{what} is {w}x{h} but --width/--height ask for {width}x{height}: the init decides "
                            f"the image size, so leave them out or give {w}x{h}.")


def _read_image(path: str, what: str) -> torch.Tensor:
    """[3, H, W] in 0..1, through the engine's one image reader."""
    from .images import read_image

    try:
        return read_image(path)
    except NextStepError as e:
        raise NextStepError(f"{what}: {e}") from None


def _read_npz(path: str) -> dict:
    """tokens [B, T, D] (when present) and latents [B, C, H/8, W/8], as `generate --save-latents` writes them."""
    import numpy as np

    if not os.path.isfile(path):
        raise NextStepError(f"--init-latents {path} does not exist.")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: torch.from_numpy(np.array(z[k], dtype=np.float32)) for k in ("tokens", "latents") if k in z}
    except (OSError, ValueError) as e:
        raise NextStepError(f"cannot read --init-latents {path} as an .npz file: {e}") from None
    lat = arrays.get("latents")
    if lat is None or lat.ndim != 4 or lat.shape[-1] % 2 or lat.shape[-2] % 2:
        raise NextStepError(f"--init-latents {path} needs 'latents' [batch, 16, height/8, width/8] with even sides, as "
                            f"written by generate --save-latents; found {_shapes(arrays)}.")
    tokens = arrays.get("tokens")
    if tokens is not None and (tokens.ndim != 3 or tokens.shape[:2] != (lat.shape[0], lat[0, 0].numel() // 4)):
        raise NextStepError(f"--init-latents {path}: 'tokens' {list(tokens.shape)} do not match 'latents' "
                            f"{list(lat.shape)} (one token per 2x2 latent cells).")
    return arrays


def _shapes(arrays: dict) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()) or "neither key"
