"""`torch.compile` of the fixed-shape step's repeated blocks: one decoder layer, and one head step with its guidance
and update. Each is compiled once (`fullgraph=True`, `dynamic=False`) and reused by every layer, every sampling step,
every token and every prompt of the fixed-shape path (`graph.py`), which then captures the whole token as one CUDA
graph after its warm-up, as it does without compiling.

Why regional and not `torch.compile(decode_one_token, mode="reduce-overhead")` as gpt-fast does: the whole step
unrolls to about 5,000 ops (48 decoder layers and 50 x 12 head blocks), so compiling it takes minutes where the two
blocks take seconds, and a new head step count (step annealing) would compile it again; the blocks see neither the
step index (the caller passes the step's slices and coefficients as tensors) nor the layer (parameters are graph
inputs: torch >= 2.5 inlines nn.Modules), so nothing recompiles for a new seed, prompt, prompt length (the cache
length is bucketed) or step count. And the capture stays ours: its warm-up, the first-token self-check and the
fallback to the plain step work the same with or without compiling; reduce-overhead's CUDA-graph trees would nest
inside it instead.

`SamplerSettings.compile`: "auto" compiles on CUDA where Triton works, "on" wherever a compiler does (on the CPU too;
there the weights `cpu_pack` laid out for oneDNN are unpacked first, since dynamo cannot trace them), "off" never.
The plain loop is never compiled: it is the reference everything is checked against. Whether compiling can work is
probed once per device type (Triton / a C++ compiler present, then one tiny compilation); where it cannot, or a
compilation raises later, one warning says why and the same step runs uncompiled, still captured as a CUDA graph.
Inductor's cache (`TORCHINDUCTOR_CACHE_DIR`, by default in the system's temp folder) keeps compiled kernels between
processes, so only the first run on a machine pays the compile.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil

import torch

log = logging.getLogger("nextstep")

COMPILE_MODES = ("auto", "on", "off")
_warned: set[str] = set()
_broken: list[str] = []  # why a compiled block failed at run time (then nothing is compiled again in this process)


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@functools.lru_cache(maxsize=None)
def compile_support(device_type: str) -> str | None:
    """None when torch.compile can work on this device type, else why not (probed once)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python version with this torch"
    except Exception as e:  # a broken or partial install: compile is optional
        return f"torch._dynamo cannot be imported ({type(e).__name__}: {e})"
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed"
    elif device_type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return "inductor's CPU backend needs a C++ compiler (g++ or clang++) and none was found"
    else:
        return f"compiling is not attempted on {device_type}"
    return _probe(device_type)


def _probe(device_type: str) -> str | None:
    """One tiny compilation on the device: a toolchain that is present but broken fails here, not mid-image."""
    try:
        fn = torch.compile(lambda a, b: torch.nn.functional.silu(a) * b + 1, fullgraph=True, dynamic=False)
        a = torch.ones(8, device=device_type)
        if not torch.allclose(fn(a, a), torch.nn.functional.silu(a) * a + 1):
            return "a probe compilation gave wrong numbers"
    except Exception as e:  # dynamo, inductor and compiler errors have no common base besides Exception
        return f"a probe compilation failed ({first_line(e)})"
    return None


def wanted(mode: str, device) -> bool:
    """Whether the fixed-shape step should compile its blocks on `device` for `settings.compile == mode`; logs once
    why not where it was asked for."""
    if mode == "off" or _broken:
        return False
    dev = torch.device(device)
    if mode == "auto" and dev.type != "cuda":
        return False
    reason = compile_support(dev.type)
    if reason is not None:
        warn_once(reason, f"NextStep: not compiling the per-token step on {dev}: {reason}; it runs uncompiled "
                          "(the same tokens; on CUDA still as a CUDA graph).")
    return reason is None


def prepare(model) -> None:
    """Make the model traceable: weights laid out for oneDNN (`cpu_pack`) go back to dense ones, once."""
    from ..weights.cpu_pack import unpack_linears

    n = unpack_linears(model)
    if n:
        log.info("NextStep: %d layer(s) unpacked from oneDNN's layout so that torch.compile can trace them", n)


def first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _run_layer(layer, x, rope_rows, pos, mask, length: int):
    return layer(x, rope_rows, pos, mask, length)


def _head_update(head, x, mods_i: list, rows: int, w, a, b, term):
    """One fused head step: the velocity of x on every guidance row, combined, then x' = term + a x + b v (a, b
    0-d tensors; term: the step's scaled noise, zeros where the step draws none)."""
    v = head.velocity_fused(x, mods_i, 0, rows)
    if rows == 2:
        v = torch.lerp(v[1], v[0], w)
    elif rows == 3:
        v = (v * w).sum(0)
    else:
        v = v[0]
    return term + a * x + b * v


_compiled: dict = {}


def _call(name: str, fn, *args):
    """`fn(*args)` through its compiled version while compiling works; a failure warns once and runs it plain."""
    if not _broken:
        try:
            if name not in _compiled:
                _compiled[name] = torch.compile(fn, fullgraph=True, dynamic=False)
            return _compiled[name](*args)
        except Exception as e:  # dynamo / inductor / compiler errors have no common base besides Exception
            _broken.append(f"compilation failed ({first_line(e)})")
            warn_once("broken", f"NextStep: {_broken[0]}; the per-token step runs uncompiled from now on (the same "
                                "tokens; on CUDA still as a CUDA graph).")
    return fn(*args)


def run_layer(layer, x, rope_rows, pos, mask, length: int):
    """One decoder layer (a `NextStep.forward` `run_layer`), compiled."""
    return _call("layer", _run_layer, layer, x, rope_rows, pos, mask, length)


def head_update(head, x, mods_i, rows, w, a, b, term):
    return _call("head", _head_update, head, x, mods_i, rows, w, a, b, term)


def active() -> bool:
    """Whether compiled blocks are (still) in use in this process."""
    return not _broken


def reset() -> None:
    """Forget a failure and the compiled functions (tests; a host that fixed its toolchain)."""
    _compiled.clear()
    _broken.clear()
    _warned.clear()
    compile_support.cache_clear()
