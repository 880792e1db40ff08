"""Optional `torch.compile` of the fused head's per-step function (`SamplerSettings.compile_head`, off by default).

What is compiled is one head step with its guidance combine: `velocity_fused` on the step's AdaLN vectors, then
the rows combined (`_guided_velocity`). The step index never enters the compiled function (the caller passes the
step's slices of the modulations) and the guidance scale comes in as a tensor, so one compiled graph serves every
step and every token of a generation; the update x' = a x + b v + c ξ stays eager (two ops, and its a, b change per
step). Compilation is never required: `compile_support` says up front whether it can work here (CUDA: Triton
importable; CPU: a C++ compiler for inductor; MPS: not attempted), answered once per device type, and a
compilation or run that raises falls back to the uncompiled step for the rest of the process. Either way one
warning is logged and the tokens are the same (within fp32 round-off: the compiled kernels may fuse and reorder).

The CUDA-graph path does not use it (`fast.py`): the graph already removes the launch overhead, and a compiled
function's first call under capture is not safe.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import shutil

import torch

log = logging.getLogger("nextstep")

_warned: set[str] = set()
_broken: list[str] = []  # why a compiled step failed at run time (then nothing is compiled again)
_compiled = None  # the torch.compile wrapper of `_guided_velocity`, made on first use


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@functools.lru_cache(maxsize=None)
def compile_support(device_type: str) -> str | None:
    """None when torch.compile of the head can work on this device type, else why not (probed once)."""
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if hasattr(dynamo, "is_dynamo_supported") and not dynamo.is_dynamo_supported():
            return "torch.compile does not support this Python version with this torch"
    except Exception as e:  # a broken or partial install: compile is optional
        return f"torch._dynamo cannot be imported ({type(e).__name__}: {e})"
    if device_type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    if device_type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return "inductor's CPU backend needs a C++ compiler (g++ or clang++) and none was found"
        return None
    return f"compiling the head is not attempted on {device_type}"


def _is_quantised(head) -> bool:
    return any(getattr(m, "weight_scale", None) is not None for m in head.modules())


def _is_packed(head) -> bool:
    return any(getattr(p, "is_mkldnn", False) for p in head.parameters())


def head_compile_ok(head, device) -> bool:
    """Whether the head's step should be compiled on `device`; logs why not once."""
    if _broken:  # a compiled step already failed in this process and said so
        return False
    reason = compile_support(torch.device(device).type)
    if reason is None and _is_quantised(head):
        reason = "the head has quantised layers (they dequantise per token outside the step)"
    if reason is None and _is_packed(head):  # dynamo cannot trace an opaque packed weight, and need not
        reason = "the head's weights are packed for the CPU's matmul (cpu_pack), which is faster than compiling it"
    if reason is not None:
        warn_once(reason, f"compile_head: {reason}; the head runs uncompiled (same tokens, no speed-up).")
    return reason is None


def _guided_velocity(head, x: torch.Tensor, mods_i: list[torch.Tensor], rows: int, w: torch.Tensor | None):
    """One fused head step with its guidance combine: mods_i = the step's modulations, each [1, rows*B, k*dim];
    w = the combine weights (3 rows), the guidance scale as a 0-d tensor (2 rows) or None (1 row)."""
    v = head.velocity_fused(x, mods_i, 0, rows)
    if rows == 1:
        return v[0]
    if rows == 2:
        return torch.lerp(v[1], v[0], w)
    return (v * w).sum(0)


def guided_velocity(head, x, mods_i, rows: int, w, compiled: bool) -> torch.Tensor:
    """`_guided_velocity`, compiled when asked and still possible; a failure warns once and runs it uncompiled."""
    global _compiled
    if compiled and not _broken:
        try:
            if _compiled is None:
                _compiled = torch.compile(_guided_velocity, dynamic=False)
            return _compiled(head, x, mods_i, rows, w)
        except Exception as e:  # dynamo / inductor / compiler errors have no common base besides Exception
            _broken.append(f"compilation failed ({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})"
                           if str(e).strip() else f"compilation failed ({type(e).__name__})")
            warn_once("broken", f"compile_head: {_broken[0]}; the head runs uncompiled from now on (same tokens).")
    return _guided_velocity(head, x, mods_i, rows, w)


def reset() -> None:
    """Forget a failure and the compiled wrapper (tests; a host that fixed its toolchain)."""
    global _compiled
    _compiled = None
    _broken.clear()
    _warned.clear()
    compile_support.cache_clear()
