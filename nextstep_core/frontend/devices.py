"""Which torch device to run on: one function that parses a device string, checks it exists here, or picks one.

    resolve_device(None)      # auto: cuda, else mps, else cpu
    resolve_device("cuda:1")  # torch.device("cuda", 1), or NextStepError saying what this machine has

Used by the command line before any weight is read, and available to API callers that take a device string from a
user. Every refusal names the devices that do exist, so the message alone says what to type instead.
"""
from __future__ import annotations

import torch

from ..errors import NextStepError

AUTO = ("", "auto")


def _backend(kind: str):
    """torch's module for a device kind (torch.cuda, torch.backends.mps, torch.xpu, ...), or None."""
    if kind == "mps":
        return getattr(torch.backends, "mps", None)
    return getattr(torch, kind, None)


def _count(kind: str) -> int:
    """How many devices of this kind this machine and this PyTorch build can use (cpu: 1)."""
    if kind == "cpu":
        return 1
    mod = _backend(kind)
    try:
        if mod is None or not mod.is_available():
            return 0
        counter = getattr(mod, "device_count", None)
        return int(counter()) if counter is not None else 1
    except (AttributeError, RuntimeError):  # a backend present in the build but broken on this machine
        return 0


def available_devices() -> list[str]:
    """The device strings that work here, best first (e.g. ['cuda', 'cuda:1', 'cpu'])."""
    out = []
    for kind in ("cuda", "mps", "xpu"):
        n = _count(kind)
        out += [kind] + [f"{kind}:{i}" for i in range(1, n)] if n else []
    return out + ["cpu"]


def auto_device() -> torch.device:
    for kind in ("cuda", "mps"):
        if _count(kind):
            return torch.device(kind)
    return torch.device("cpu")


def resolve_device(spec=None) -> torch.device:
    """A torch.device for `spec` (None, "auto", "cpu", "cuda", "cuda:1", "mps", a torch.device), checked to exist."""
    text = "" if spec is None else str(spec).strip().lower()
    if text in AUTO:
        return auto_device()
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type == "meta" or (parsed.type != "cpu" and _backend(parsed.type) is None):
        raise NextStepError(f"device {spec!r} is not a device name: use auto, cpu, cuda, cuda:N or mps "
                            f"(here: {', '.join(available_devices())}).")
    kind, index = parsed.type, parsed.index
    n = _count(kind)
    if n == 0:
        cpu_build = torch.version.cuda is None and getattr(torch.version, "hip", None) is None
        why = " (this PyTorch was built without CUDA)" if kind == "cuda" and cpu_build else ""
        raise NextStepError(f"device {spec!r} is not available on this machine{why}; available: "
                            f"{', '.join(available_devices())}. Use --device auto to pick the best one.")
    if index is not None and kind != "cpu" and index >= n:
        raise NextStepError(f"device {spec!r} does not exist: this machine has {n} {kind} device(s) "
                            f"({kind}:0 to {kind}:{n - 1}).")
    return torch.device("cpu") if kind == "cpu" else parsed
