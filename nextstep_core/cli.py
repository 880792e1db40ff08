"""`python -m nextstep_core info | generate | convert` — the engine without ComfyUI."""
from __future__ import annotations

import argparse
import os
import sys
import time

from .errors import GenerationCancelled, NextStepError


def _info(args) -> int:
    from .info import describe

    print(describe(args.path, family=args.family))
    return 0


def _generate(args) -> int:
    import numpy as np
    import torch

    from . import generation as G
    from .download import resolve_model
    from .images import decode_latents, encode_edit_images
    from .keep_inputs import check_keep_inputs
    from .loading import find_vae_for_model, load_model, load_vae
    from .settings import default_prompts, family_defaults

    keep = check_keep_inputs(args.init_image, args.init_latents, args.mask, args.keep_rows, args.width, args.height)
    args.width, args.height = (keep.width, keep.height) if keep else (args.width, args.height)
    model_path = resolve_model(args.model, args.download_dir)
    device = args.device or ("cuda" if torch.cuda.is_available() else
                             "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
                             else "cpu")
    vae_path = args.vae or find_vae_for_model(model_path)
    if vae_path is None:
        raise NextStepError(f"{model_path} has no vae/ folder: pass --vae with the f8ch16 tokenizer folder.")
    t0 = time.perf_counter()
    model = load_model(model_path, dtype=args.dtype, device=device, family=args.family)
    vae = load_vae(vae_path, dtype="float32" if args.dtype == "float32" else args.dtype, device=device)
    print(f"loaded in {time.perf_counter() - t0:.1f} s ({model.config.family}, {device})", file=sys.stderr)
    edit = bool(args.edit_image)
    given = {k: getattr(args, k) for k in ("width", "height", "images_per_prompt", "cfg", "cfg_img", "cfg_schedule",
                                            "timesteps_shift", "steps", "steps_end", "sampler", "use_norm", "seed",
                                            "noise", "fast") if getattr(args, k) is not None}
    settings = family_defaults(model.config.family, edit).replace(**given).validate(model.config)
    positive, negative = default_prompts(model.config.family, edit)
    positive = args.positive if args.positive is not None else positive
    cond = G.Conditioning(args.prompt, positive, args.negative if args.negative is not None else negative)
    if edit:
        from PIL import Image

        imgs = []
        for p in args.edit_image:
            try:
                imgs.append(Image.open(p).convert("RGB"))
            except (OSError, ValueError) as e:
                raise NextStepError(f"cannot read the edit image {p}: {e}") from None
        cond = encode_edit_images(vae, cond, imgs)
    bar = _Bar()
    res = G.sample(model, cond, settings, progress=bar, init=keep.token_init(vae, model.config) if keep else None,
                   latent_affine=(vae.config.scaling_factor, vae.config.shift_factor))
    bar.close()
    images = decode_latents(vae, res.latents)
    from .pipeline import GenerationResult

    pils = GenerationResult(res.tokens, res.latents, images).pil()
    outs = _numbered(args.output, len(pils))
    for im, path in zip(pils, outs):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        im.save(path)
        print(path)
    if args.save_latents:
        np.savez(args.save_latents, tokens=res.tokens.numpy(), latents=res.latents.numpy())
    return 0


def _numbered(path: str, n: int) -> list[str]:
    if n == 1:
        return [path]
    stem, ext = os.path.splitext(path)
    return [f"{stem}_{i:03d}{ext or '.png'}" for i in range(n)]


class _Bar:
    """A one-line progress bar with tokens/s on stderr."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self, done, total, _tokens=None):
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        filled = int(30 * done / total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total} tokens {rate:.1f} tok/s")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def _convert(args) -> int:
    from .convert import convert

    t0 = time.perf_counter()
    out = convert(args.src, args.dst, args.dtype, keep_lm_head=args.keep_lm_head, family=args.family)
    print(f"wrote {out} ({os.path.getsize(out) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextstep_core", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="validate and describe a model or VAE folder/file")
    i.add_argument("path")
    _family_argument(i)
    i.set_defaults(func=_info)
    g = sub.add_parser("generate", help="text-to-image or editing")
    g.add_argument("--model", required=True, help="model folder, single .safetensors, HF repo id, or 'tiny'")
    g.add_argument("--vae", help="VAE folder/file (default: the model folder's vae/)")
    g.add_argument("--download-dir", help="where a repo id is downloaded (default models/nextstep/<name>)")
    _family_argument(g)
    g.add_argument("--prompt", action="append", required=True, help="repeatable; edit prompts may hold <image>")
    g.add_argument("--positive", help="appended to every prompt (default: the family's)")
    g.add_argument("--negative", help="negative prompt (default: the family's)")
    g.add_argument("--edit-image", action="append", help="repeatable, one per prompt")
    g.add_argument("--width", type=int, default=512)
    g.add_argument("--height", type=int, default=512)
    g.add_argument("--images-per-prompt", type=int, default=1)
    g.add_argument("--cfg", type=float)
    g.add_argument("--cfg-img", type=float)
    g.add_argument("--cfg-schedule", choices=["constant", "linear"])
    g.add_argument("--timesteps-shift", type=float)
    g.add_argument("--steps", type=int)
    g.add_argument("--steps-end", type=int, help="step annealing: head steps fall linearly to this (off by default)")
    g.add_argument("--sampler", choices=["euler_maruyama", "euler", "flow_sde", "flow_cps"])
    g.add_argument("--use-norm", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--noise", choices=["independent", "reference"], default="independent")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    g.add_argument("--device")
    g.add_argument("--fast", choices=["auto", "graph", "static", "eager"], default="auto",
                   help="per-token path: auto = CUDA graphs on CUDA, the plain loop elsewhere")
    g.add_argument("-o", "--output", default="nextstep.png")
    g.add_argument("--save-latents", help="write tokens [B,T,64] and latents [B,16,H/8,W/8] to this .npz")
    g.add_argument("--init-image", help="keep part of this image (its size is the output's; VAE-encoded)")
    g.add_argument("--init-latents", help="keep part of these latents (an .npz written by --save-latents)")
    g.add_argument("--mask", help="with an init: white = regenerate, black = keep (an image of the output's size)")
    g.add_argument("--keep-rows", type=int, help="with an init: keep the top K token rows (16 pixels each)")
    g.set_defaults(func=_generate)
    c = sub.add_parser("convert", help="one .safetensors (bf16/fp16/fp32/fp8/int8) from a model or VAE")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8", "int8"])
    c.add_argument("--keep-lm-head", action="store_true", help="keep the text head (not needed for images)")
    _family_argument(c)
    c.set_defaults(func=_convert)
    return p


def _family_argument(parser) -> None:
    from .identify import AUTO, FAMILY_CHOICES

    parser.add_argument("--family", choices=FAMILY_CHOICES, default=AUTO,
                        help="model family; auto: our nextstep_family key, else the published name (download record, "
                             "folder name, _name_or_path), else weak config evidence, else nextstep-1")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NextStepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GenerationCancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
