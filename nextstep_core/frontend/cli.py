"""`python -m nextstep_core info | generate | convert | doctor` — the engine without ComfyUI."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass

from ..errors import GenerationCancelled, NextStepError


def _info(args) -> int:
    from .info import describe

    print(describe(args.path, family=args.family))
    return 0


TINY_DEMO = dict(width=128, height=128, steps=8)  # a first run in seconds on a laptop CPU; the pictures are noise
SETTING_ARGS = ("width", "height", "images_per_prompt", "cfg", "cfg_img", "cfg_schedule", "timesteps_shift", "steps",
                "steps_end", "sampler", "use_norm", "seed", "noise", "fast", "head_loop", "compile", "denoise")


@dataclass
class _Job:
    """A generation whose every input has been checked; nothing heavy has been read yet."""
    model_path: str
    vae_path: str
    family: str  # as read from the model's config before loading; settings and default prompts follow it
    settings: object  # SamplerSettings, validated against the model's config
    pixels: list  # edit images [3,H,W] in 0..1, one per prompt (empty: text-to-image)
    device: object
    dtype: object
    outputs: list  # (image path, PIL format) per image
    latents_out: str | None
    keep: object = None  # KeepInputs (keep_inputs.py): an init canvas and what of it to keep, or None


def _check(args) -> _Job:
    """Every input the user gave, checked in well under a second: no weight is read here."""
    from .devices import resolve_device, resolve_dtype
    from ..weights.download import resolve_model
    from ..model.family import FAMILY_V1
    from .images import prepare_edit_images
    from ..generation.keep import check_variation
    from .keep_inputs import check_keep_inputs
    from ..weights.loading import find_vae_for_model, read_model_config
    from .outputs import image_outputs, latents_output

    keep = check_keep_inputs(args.init_image, args.init_latents, args.mask, args.keep_rows, args.width, args.height,
                             args.denoise)
    args.width, args.height = (keep.width, keep.height) if keep else (args.width, args.height)  # the init's size
    edit = bool(args.edit_image)
    given = {k: getattr(args, k) for k in SETTING_ARGS if getattr(args, k) is not None}
    if args.model == "tiny":
        given = {**TINY_DEMO, **given}
    settings = _settings(FAMILY_V1, edit, given)  # a value the user gave that no family accepts fails here
    check_prompts(args.prompt, args.positive, args.negative, edit)
    pixels = prepare_edit_images(args.edit_image, len(args.prompt)) if edit else []
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    outputs = image_outputs(args.output, len(args.prompt) * settings.images_per_prompt)
    latents_out = latents_output(args.save_latents) if args.save_latents else None

    model_path = resolve_model(args.model, args.download_dir)
    model_config, source = read_model_config(model_path, family=args.family)  # config.json and file headers only
    settings = _settings(model_config.family, edit, given).validate(model_config)
    check_variation(settings.denoise, keep is not None)
    if keep:
        keep.check_model(model_config, len(args.prompt) * settings.images_per_prompt)
    vae_path = os.path.expanduser(args.vae) if args.vae else find_vae_for_model(model_path)
    if vae_path is None:
        raise NextStepError(f"{model_path} has no vae/ folder: pass --vae with the f8ch16 tokenizer folder.")
    if not os.path.exists(vae_path):
        raise NextStepError(f"the VAE {vae_path} does not exist.")
    _check_memory(model_config, source, vae_path, settings, len(args.prompt), pixels, dtype, device)
    if args.model == "tiny":
        print(f"tiny demo: {settings.width}x{settings.height}, {settings.steps} head steps (give --width, --height, "
              "--steps to change)", file=sys.stderr)
        if device.type == "cpu":
            import torch

            torch.set_num_threads(1)  # its matrices are too small to share: threads only wait on each other
    return _Job(model_path, vae_path, model_config.family, settings, pixels, device, dtype, outputs,
                latents_out, keep)


def _check_memory(cfg, source, vae_path, settings, n_prompts, pixels, dtype, device) -> None:
    """The whole job against the free memory, from configs and headers: a batch that cannot fit stops here, not
    with an allocation failure after the model has loaded. The prompt is counted as DEFAULT_PROMPT_TOKENS (plus the
    largest edit image's tokens); `sample` checks again with the tokenised prompts."""
    from ..generation.loop import Conditioning, guidance_branches
    from ..generation.memory import DEFAULT_PROMPT_TOKENS, check_job_fits, weight_bytes
    from ..generation.plan import GenerationPlan
    from ..generation.prompt import grid_size
    from ..model.family import family_of
    from ..weights.vae_files import vae_files

    h, w = grid_size(settings.width, settings.height, cfg)
    edit_tokens = max((px.shape[1] // cfg.down_factor) * (px.shape[2] // cfg.down_factor) + 8 for px in pixels) \
        if pixels else 0
    branches = guidance_branches(Conditioning(["x"], edit_latents=pixels or None), settings.cfg, settings.cfg_img)
    plan = GenerationPlan(settings, family_of(cfg), h, w, branches, DEFAULT_PROMPT_TOKENS + edit_tokens,
                          n_prompts * settings.images_per_prompt)
    keys = {k: v for k, v in source.shapes.items() if not k.startswith("lm_head.")}  # never loaded for images
    check_job_fits(cfg, plan, weight_bytes(keys, source.dtypes, dtype), vae_files(vae_path)[0], dtype, device)


def _settings(family, edit: bool, given: dict):
    from ..generation.settings import family_defaults

    return family_defaults(family, edit).replace(**given).validate()


def check_prompts(prompts: list, positive: str | None, negative: str | None, edit: bool) -> None:
    """Text the tokenizer can take: valid UTF-8 (argv bytes that are not arrive as lone surrogates), markers right."""
    from ..generation.prompt import IMAGE_MARKER, check_text

    named = [(f"prompt {i + 1}", p) for i, p in enumerate(prompts)]
    named += [(n, p) for n, p in (("--positive", positive), ("--negative", negative)) if p is not None]
    for name, text in named:
        check_text(name, text)
    for name, text in named[:len(prompts)]:
        n = text.count(IMAGE_MARKER)
        if n > (1 if edit else 0):
            raise NextStepError(f"{name} holds {n} {IMAGE_MARKER} marker(s); " + (
                "an edit prompt takes at most one (it is added in front when missing)." if edit else
                "that marks an input image: pass one with --edit-image, or remove the marker."))


def _generate(args) -> int:
    import numpy as np

    from ..generation import loop as G
    from .images import decode_latents, encode_edit_images
    from ..weights.loading import load_model
    from ..weights.vae_files import load_vae
    from ..fs import write_atomic
    from .pipeline import GenerationResult
    from ..generation.settings import default_prompts

    job = _check(args)
    t0 = time.perf_counter()
    vae = load_vae(job.vae_path, dtype=job.dtype, device=job.device)  # the small file first: fails before the wait
    model = load_model(job.model_path, dtype=job.dtype, device=job.device, family=args.family)
    print(f"loaded in {time.perf_counter() - t0:.1f} s ({job.family}, {job.device})", file=sys.stderr)
    positive, negative = default_prompts(job.family, bool(job.pixels))
    cond = G.Conditioning(args.prompt, _given(args.positive, positive), _given(args.negative, negative))
    if job.pixels:
        cond = encode_edit_images(vae, cond, job.pixels)
    bar = _Bar()
    init = job.keep.token_init(vae, model.config) if job.keep else None
    res = G.sample(model, cond, job.settings, progress=bar, init=init,
                   latent_affine=(vae.config.scaling_factor, vae.config.shift_factor))
    bar.close()
    pils = GenerationResult(res.tokens, res.latents, decode_latents(vae, res.latents)).pil()
    for im, (path, fmt) in zip(pils, job.outputs):
        write_atomic(path, lambda f, im=im, fmt=fmt: im.save(f, format=fmt))
        print(f"wrote {path}")
    if job.latents_out:
        write_atomic(job.latents_out, lambda f: np.savez(f, tokens=res.tokens.numpy(), latents=res.latents.numpy()))
        print(f"wrote {job.latents_out}")
    return 0


def _given(value, default):
    return default if value is None else value


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


def _doctor(args) -> int:
    from .doctor import main as doctor

    return doctor(args.device, args.json, args.layers)


def _convert(args) -> int:
    from ..weights.convert import plan_conversion
    from .info import size_text

    t0 = time.perf_counter()
    job = plan_conversion(args.src, args.dst, args.dtype, keep_lm_head=args.keep_lm_head, family=args.family)
    job.run()
    # what this process wrote: another convert to the same name may have renamed its own file over it since
    print(f"wrote {job.dst} ({job.dtype}, {size_text(job.size)}) in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from ..weights.loading import DTYPES
    from ..generation.settings import (CFG_SCHEDULES, COMPILE_MODES, FAST_MODES, HEAD_LOOPS, NOISE_MODES, SAMPLERS,
                                      SamplerSettings)

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
    d = SamplerSettings()
    g.add_argument("--width", type=int, help=f"pixels, a multiple of 16 (default {d.width}; tiny: 128)")
    g.add_argument("--height", type=int, help=f"pixels, a multiple of 16 (default {d.height}; tiny: 128)")
    g.add_argument("--images-per-prompt", type=int, help=f"default {d.images_per_prompt}")
    g.add_argument("--cfg", type=float, help="text guidance, above 0; 1 = off (default: the family's)")
    g.add_argument("--cfg-img", type=float, help="image guidance when editing, above 0 (default: the family's)")
    g.add_argument("--cfg-schedule", choices=CFG_SCHEDULES)
    g.add_argument("--timesteps-shift", type=float, help="above 0 (default: the family's)")
    g.add_argument("--steps", type=int, help="head steps per token (default: the family's; tiny: 8)")
    g.add_argument("--steps-end", type=int, help="step annealing: head steps fall linearly from --steps to this at the "
                                                 "last token (off by default)")
    g.add_argument("--sampler", choices=SAMPLERS, help="default: the family's reference sampler")
    g.add_argument("--use-norm", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--seed", type=int, help=f"0 to 2**64-1 (default {d.seed})")
    g.add_argument("--noise", choices=NOISE_MODES, help=f"default {d.noise}")
    g.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="compute dtype; auto (default): bf16 where the device has bf16 arithmetic, else float32")
    g.add_argument("--device", help="auto (default: cuda, else mps, else cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--fast", choices=FAST_MODES,
                   help="per-token path: auto (default) = CUDA graphs on CUDA, the plain loop elsewhere; a graph is "
                        "checked against the plain step on its first token and left (with a warning) if they differ")
    g.add_argument("--head-loop", choices=HEAD_LOOPS, help="the head's sampling loop (default fused; all agree)")
    g.add_argument("--denoise", type=float, help="with --init-image / --init-latents: variation strength from 0 (the "
                                                  "init itself) to 1 (default: a fresh image); see README, Variations")
    g.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile of the fixed-shape step's blocks: auto (default: on CUDA with Triton), on, off; "
                        "falls back uncompiled with a warning where it cannot work")
    g.add_argument("-o", "--output", default="nextstep.png",
                   help="image file (.png, .jpg, .webp, ...; several images: numbered files)")
    g.add_argument("--save-latents", help="write tokens [B,T,64] and latents [B,16,H/8,W/8] to this .npz")
    g.add_argument("--init-image", help="keep part of this image (its size is the output's; VAE-encoded)")
    g.add_argument("--init-latents", help="keep part of these latents (an .npz written by --save-latents)")
    g.add_argument("--mask", help="with an init: white = regenerate, black = keep (an image of the output's size)")
    g.add_argument("--keep-rows", type=int, help="with an init: keep the top K token rows (16 pixels each)")
    g.set_defaults(func=_generate)
    dr = sub.add_parser("doctor", help="check every per-token path on this device: exactness, speed, memory")
    dr.add_argument("--device", help="auto (default), cpu, cuda, cuda:N, mps")
    dr.add_argument("--json", help="also write the report to this file (attach it to bug reports)")
    dr.add_argument("--layers", type=int, help="decoder layers of the random model (default 2 on CUDA, 1 elsewhere)")
    dr.set_defaults(func=_doctor)
    c = sub.add_parser("convert", help="one .safetensors (bf16/fp16/fp32/fp8/int8/int4) from a model or VAE")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32", "fp8", "int8", "int4"])
    c.add_argument("--keep-lm-head", action="store_true", help="keep the text head (not needed for images)")
    _family_argument(c)
    c.set_defaults(func=_convert)
    return p


def _family_argument(parser) -> None:
    from ..weights.identify import AUTO, FAMILY_CHOICES

    parser.add_argument("--family", choices=FAMILY_CHOICES, default=AUTO,
                        help="model family; auto: our nextstep_family key, else the published name (download record, "
                             "folder name, _name_or_path), else config evidence (model_type stepx_llama, 1.1-era "
                             "training keys), else nextstep-1")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds as Ctrl-C does: temporary files removed, one line."""


def _on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
    raise Terminated


def main(argv=None) -> int:
    # torch is first imported in here (the parser's choices come from the engine), so that Ctrl-C while it loads
    # ends with one line too
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except NextStepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except GenerationCancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except Terminated:
        print("\nterminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, what a shell reports for a process the signal ended
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
