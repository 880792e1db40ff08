"""The settings of one generation, as one object: what the CLI, the nodes and the API fill in and `sample` takes.

    s = family_defaults(model.config.family).replace(width=768, seed=7)   # the reference's values, then yours
    s.validate()                      # cheap, needs no model: run it before loading anything
    res = sample(model, cond, s)      # sample validates again against the model's own limits

`validate()` checks everything a user can get wrong (types, names, ranges, non-finite numbers, seeds) and raises
`NextStepError` with what to change; `validate(model_config)` adds what depends on the model (the token size, the
position table of models that have one). Whole numbers may be any integer type (numpy's too) and guidance any real
number; what `validate` returns holds them as Python ints and floats. Switches must be real bools: "no" is not
False.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace

from ..errors import NextStepError
from ..model.family import family_of

SAMPLERS = ("euler_maruyama", "euler", "flow_sde", "flow_cps")
CFG_SCHEDULES = ("constant", "linear")
NOISE_MODES = ("independent", "reference")
FAST_MODES = ("auto", "graph", "static", "eager")
COMPILE_MODES = ("auto", "on", "off")  # torch.compile of the fixed-shape step's blocks (compile.py)
HEAD_LOOPS = ("fused", "hoisted", "plain")  # how the head's sampling loop runs (sampling.py); all give one result
MAX_SIDE = 4096  # pixels; 512 is what the model was trained at
MAX_STEPS = 1000
MAX_IMAGES = 64
SEED_LIMIT = 2**64  # seeds are 64-bit unsigned, as ComfyUI's seed widget
TOKEN_PIXELS = 16  # VAE downsampling 8 x latent patch 2: every published NextStep model


@dataclass
class SamplerSettings:
    width: int = 512
    height: int = 512
    images_per_prompt: int = 1
    cfg: float = 7.5  # text guidance; 1 = off
    cfg_img: float = 1.0  # image guidance when editing; 1 = off
    cfg_schedule: str = "constant"  # or "linear", as the family defines it
    timesteps_shift: float = 1.0
    steps: int = 50  # head steps per token
    steps_end: int | None = None  # step annealing: head steps fall linearly to this at the last token
    sampler: str | None = None  # None: the family's reference sampler
    use_norm: bool = True  # layer-normalise each sampled token
    seed: int = 42
    noise: str = "independent"  # or "reference": the official pipeline's draws
    fast: str = "auto"  # per-token path: auto, graph, static, eager
    head_loop: str = "fused"  # "fused" (fewest kernels), "hoisted" or "plain" (the per-step reference loop)
    compile: str = "auto"  # the fixed-shape step's blocks through torch.compile: auto (CUDA with Triton), on, off
    denoise: float = 1.0  # variation strength with an init: 1 generates anew, 0.5 starts half-way from the init, 0 keeps it

    def replace(self, **changes) -> "SamplerSettings":
        return replace(self, **changes)

    def with_family(self, family) -> "SamplerSettings":
        """These settings with the family's choices filled in where they were left open."""
        return self if self.sampler is not None else self.replace(sampler=family_of(family).sampler)

    @property
    def stochastic(self) -> bool:
        return self.sampler != "euler"

    def validate(self, model_config=None) -> "SamplerSettings":
        """Raise NextStepError naming every bad value and what to use instead; when all is well, return the settings
        with their numbers as Python ints and floats (self when they already are)."""
        problems = []
        step = model_config.down_factor if model_config is not None else TOKEN_PIXELS
        for name in ("width", "height"):
            v = getattr(self, name)
            if not is_whole_number(v):
                problems.append(f"{name} must be a whole number of pixels, got {v!r}")
            elif v % step or not step <= v <= MAX_SIDE:
                problems.append(f"{name} {v!r} is not supported: use a multiple of {step} between {step} and "
                                f"{MAX_SIDE} (512 is what the model was trained at)")
        problems += _int_range("images per prompt", self.images_per_prompt, 1, MAX_IMAGES)
        problems += _int_range("steps", self.steps, 1, MAX_STEPS)
        if self.steps_end is not None:
            problems += _int_range("steps_end", self.steps_end, 1, MAX_STEPS)
        d = self.denoise
        if not _is_real(d) or not math.isfinite(d) or not 0 <= d <= 1:
            problems.append(f"denoise must be a number from 0 to 1 (1 = generate anew), got {d!r}")
        for name in ("cfg", "cfg_img", "timesteps_shift"):
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v) or v <= 0:
                problems.append(f"{name} must be a finite number above 0, got {v!r}")
        for name, value, allowed in (("sampler", self.sampler, (None, *SAMPLERS)),
                                     ("cfg schedule", self.cfg_schedule, CFG_SCHEDULES),
                                     ("noise mode", self.noise, NOISE_MODES), ("fast mode", self.fast, FAST_MODES),
                                     ("head loop", self.head_loop, HEAD_LOOPS), ("compile mode", self.compile,
                                                                                 COMPILE_MODES)):
            if value not in allowed:
                problems.append(f"unknown {name} {value!r}; choose one of {', '.join(a for a in allowed if a)}")
        if not is_whole_number(self.seed) or not 0 <= self.seed < SEED_LIMIT:
            problems.append(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {self.seed!r}")
        if not isinstance(self.use_norm, bool):
            problems.append(f"use_norm must be True or False, got {self.use_norm!r}")
        if self.compile == "on" and self.head_loop != "fused":
            problems.append(f"compile 'on' compiles the fused head loop; use head loop 'fused' with it, not "
                            f"{self.head_loop!r}")
        if model_config is not None and model_config.use_gen_pos_embed and not problems:
            side = model_config.base_image_grid_size * step
            if self.width > side or self.height > side:
                problems.append(f"this model's position table covers at most {side}x{side} pixels; pick a "
                                "smaller size")
        if problems:
            raise NextStepError("; ".join(problems) + ".")
        return self._builtin_numbers()

    def _builtin_numbers(self) -> "SamplerSettings":
        changes = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if is_whole_number(v) and type(v) is not int:
                changes[f.name] = int(v)
            elif _is_real(v) and not is_whole_number(v) and type(v) is not float:
                changes[f.name] = float(v)
        return self.replace(**changes) if changes else self


# What a captured per-token step bakes in (graph.py keys kept steps on these values): shapes and the head's time grid
# and update rule. Every other field is read per call (noise, guidance scales and the step count per token go through
# buffers; `fast` picks the path). Each field is in exactly one of the two sets, checked at import, so a new field
# cannot be left out of the key by accident.
GRAPH_BAKED = frozenset({"width", "height", "images_per_prompt", "steps", "timesteps_shift", "sampler", "use_norm",
                         "head_loop", "compile", "denoise"})
GRAPH_FREE = frozenset({"cfg", "cfg_img", "cfg_schedule", "steps_end", "seed", "noise", "fast"})
if GRAPH_BAKED | GRAPH_FREE != {f.name for f in fields(SamplerSettings)} or GRAPH_BAKED & GRAPH_FREE:
    raise AssertionError("every SamplerSettings field must be declared in exactly one of GRAPH_BAKED / GRAPH_FREE")


def graph_baked(settings: SamplerSettings) -> tuple:
    """The values of the fields a captured step bakes in, by name."""
    return tuple((name, getattr(settings, name)) for name in sorted(GRAPH_BAKED))


def is_whole_number(v) -> bool:
    """An integer of any integer type (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _int_range(name: str, v, lo: int, hi: int) -> list[str]:
    if not is_whole_number(v) or not lo <= v <= hi:
        return [f"{name} must be a whole number from {lo} to {hi}, got {v!r}"]
    return []


EDIT_CHANGES = dict(cfg_img=2.0, timesteps_shift=3.2)  # NextStep-1-Large-Edit's shipped example
EDIT_NEGATIVE = "Copy original image."


def family_defaults(family, edit: bool = False) -> SamplerSettings:
    """The settings of the reference's shipped examples for this family (reference notes §5.9, §14.9)."""
    fam = family_of(family)
    s = SamplerSettings(cfg=7.5, cfg_img=1.0, cfg_schedule="constant", timesteps_shift=1.0, steps=fam.steps,
                        sampler=fam.sampler, use_norm=fam.use_norm)
    return s.replace(**EDIT_CHANGES) if edit else s


def default_prompts(family, edit: bool = False) -> tuple[str, str]:
    """(positive, negative) prompts of the reference's examples for this family."""
    fam = family_of(family)
    return ("", EDIT_NEGATIVE) if edit else (fam.positive_prompt, fam.negative_prompt)
