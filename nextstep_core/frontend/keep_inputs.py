"""Keep inputs from files (the command line's --init-image / --init-latents with --mask / --keep-rows).

Everything is read and checked by `check_keep_inputs` before any model loads: a wrong size or a missing file fails
in well under a second. Only encoding an init image waits for the VAE (`KeepInputs.token_init`).

    keep = check_keep_inputs(init_image="fox.png", mask="sky.png", width=None, height=None)   # size from the image
    res = sample(model, cond, settings.replace(width=keep.width, height=keep.height), init=keep.token_init(vae, cfg))
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from ..errors import NextStepError
from ..generation.keep import TokenInit, keep_from_mask, keep_rows
from ..generation.settings import MAX_IMAGES, MAX_SIDE, TOKEN_PIXELS


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
            return TokenInit(self.tokens, self.keep)
        return TokenInit.from_latents(self.latents, cfg, affine, self.keep)

    def check_model(self, cfg, n_images: int) -> None:
        """Fits the model of `cfg` (its config.json, read before the load) and a batch of `n_images` images."""
        if self.latents is not None and self.latents.shape[1] != cfg.latent_channels:
            raise NextStepError(f"the init latents have {self.latents.shape[1]} channels, this model takes "
                                f"{cfg.latent_channels}: use latents saved from a NextStep model.")
        if self.tokens is not None and self.tokens.shape[-1] != cfg.token_dim:
            raise NextStepError(f"the init tokens have {self.tokens.shape[-1]} values per token, this model "
                                f"takes {cfg.token_dim}: use latents saved from a NextStep model.")
        if self.width % cfg.down_factor or self.height % cfg.down_factor:
            raise NextStepError(f"the init is {self.width}x{self.height}; this model's image tokens are "
                                f"{cfg.down_factor} pixels: its sides must be multiples of {cfg.down_factor}.")
        for what, x in (("init latents", self.latents), ("init tokens", self.tokens)):
            if x is not None and x.shape[0] not in (1, n_images):
                raise NextStepError(f"the {what} hold {x.shape[0]} images for a batch of {n_images}: give one "
                                    "for all, or one per image (prompts x images per prompt).")


def check_keep_inputs(init_image: str | None = None, init_latents: str | None = None, mask: str | None = None,
                      rows: int | None = None, width: int | None = None, height: int | None = None,
                      denoise: float | None = None):
    """KeepInputs for the given files, or None without an init; a NextStepError says what is wrong.

    The init decides the image size: `width`/`height` may be None (taken from it) or must equal it.
    `mask` is an image of the output's size, white = regenerate, black = keep: a token is regenerated when any of
    its pixels is lighter than mid-grey (so JPEG noise in black areas keeps them). `rows` keeps the top token rows.
    With a variation strength (`denoise`) neither is needed: every token is regenerated, starting from the init.
    """
    if init_image is None and init_latents is None:
        if mask is not None or rows is not None:
            raise NextStepError("--mask and --keep-rows say what to keep of an init: add --init-image or "
                                "--init-latents.")
        return None
    if init_image is not None and init_latents is not None:
        raise NextStepError("give --init-image or --init-latents, not both.")
    if mask is not None and rows is not None or (mask is None and rows is None and denoise is None):
        raise NextStepError("with an init, say what to keep: --mask PATH (white = regenerate) or --keep-rows K "
                            "(not both), or vary all of it with --denoise.")
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
    elif mask is None:  # a variation of the whole image
        keep = torch.zeros(1, h * w, dtype=torch.bool)
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
    """tokens [B, T, D] (when present) and latents [B, C, H/8, W/8], as `generate --save-latents` writes them.

    Every member's shape and type are read from its .npy header first; data is read only when they fit an image
    this engine can make, so a small file that declares a huge array costs nothing.
    """
    import zipfile

    if not os.path.isfile(path):
        raise NextStepError(f"--init-latents {path} does not exist.")
    if not zipfile.is_zipfile(path):
        raise NextStepError(f"--init-latents {path} is not an .npz file{_what_instead(path)}: give the .npz that "
                            "generate --save-latents wrote.")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as z:
            members = {name[:-len(".npy")]: name for name in z.namelist() if name.endswith(".npy")}
            for key in (k for k in _NPZ_KEYS if k in members):
                with z.open(members[key]) as f:
                    arrays[key] = _read_member(f, path, key)
    except NextStepError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise NextStepError(f"cannot read --init-latents {path}: it is truncated or corrupt ({e}).") from None
    lat = arrays.get("latents")
    if lat is None or lat.ndim != 4 or lat.shape[-1] % 2 or lat.shape[-2] % 2:
        raise NextStepError(f"--init-latents {path} needs 'latents' [batch, 16, height/8, width/8] with even sides, as "
                            f"written by generate --save-latents; found {_shapes(arrays)}.")
    tokens = arrays.get("tokens")
    if tokens is not None and (tokens.ndim != 3 or tokens.shape[:2] != (lat.shape[0], lat[0, 0].numel() // 4)):
        raise NextStepError(f"--init-latents {path}: 'tokens' {list(tokens.shape)} do not match 'latents' "
                            f"{list(lat.shape)} (one token per 2x2 latent cells).")
    for key, x in arrays.items():
        if not torch.isfinite(x).all():
            raise NextStepError(f"--init-latents {path}: '{key}' holds {int((~torch.isfinite(x)).sum())} NaN or "
                                "infinite value(s); they would spread into every token after them. Save the latents "
                                "again from a generation that worked.")
    return arrays


_NPZ_KEYS = ("tokens", "latents")
_MAX_CHANNELS = 64  # latent channels (NextStep's VAE has 16): a bound for reading headers, not a model limit
# the largest shape of a member, batch aside, and of all its values: MAX_IMAGES images of MAX_SIDE x MAX_SIDE
_MAX_SHAPES = {"latents": (None, _MAX_CHANNELS, MAX_SIDE // 8, MAX_SIDE // 8),
               "tokens": (None, (MAX_SIDE // TOKEN_PIXELS) ** 2, _MAX_CHANNELS * 4)}
_MAX_VALUES = MAX_IMAGES * 16 * (MAX_SIDE // 8) ** 2


def _read_member(f, path: str, key: str) -> torch.Tensor:
    """One .npy member as float32, its header checked (`_check_declared`) before its data is read."""
    import numpy as np

    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[version]
    except (KeyError, ValueError):
        raise NextStepError(f"--init-latents {path}: '{key}' is not a numpy array this reader knows; save the "
                            "latents again with generate --save-latents.") from None
    shape, fortran, dtype = read_header(f)
    n = _check_declared(path, key, tuple(shape), dtype)
    data = f.read(n * dtype.itemsize)
    if len(data) != n * dtype.itemsize:
        raise NextStepError(f"cannot read --init-latents {path}: '{key}' is truncated; save the latents again.")
    a = np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return torch.from_numpy(a.astype(np.float32))


def _check_declared(path: str, key: str, shape: tuple, dtype) -> int:
    """The member's value count; refused from the header alone: arrays of objects or records, and shapes no
    generation makes (sides above MAX_SIDE pixels, or more values than MAX_IMAGES images of that size)."""
    if dtype.kind not in "fiub" or dtype.hasobject:
        raise NextStepError(f"--init-latents {path}: '{key}' holds {dtype} values, not numbers; save the latents "
                            "again with generate --save-latents.")
    n = 1
    for side in shape:
        n *= side
    limits = _MAX_SHAPES[key]
    if len(shape) != len(limits) or n > _MAX_VALUES or any(lim and d > lim for d, lim in zip(shape, limits)):
        raise NextStepError(f"--init-latents {path}: '{key}' declares shape {list(shape)}, which is not the {key} "
                            f"of images this engine makes (at most {MAX_SIDE}x{MAX_SIDE} pixels: "
                            f"{key} [batch, {', '.join(str(lim) for lim in limits[1:])}]). Give the .npz that "
                            "generate --save-latents wrote.")
    return n


def _what_instead(path: str) -> str:
    """What a file that is no .npz is instead, as a parenthesis for the message (or nothing)."""
    from PIL import Image, UnidentifiedImageError

    with open(path, "rb") as f:
        if f.read(6) == b"\x93NUMPY":
            return " (it is a single .npy array; write latents with numpy.savez(path, latents=...))"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.open(path).close()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return ""
    return " (it is an image: give images with --init-image)"


def _shapes(arrays: dict) -> str:
    return ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()) or "neither key"
