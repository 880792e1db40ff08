"""Which torch device to run on, and in which dtype: parse a device string, check it exists here, or pick one.

    resolve_device(None)      # auto: cuda, else mps, else cpu
    resolve_device("cuda:1")  # torch.device("cuda", 1), or NextStepError saying what this machine has
    auto_dtype(device)        # the dtype `auto` computes in there (the rule below)

Used by the command line before any weight is read, and available to API callers that take a device string from a
user. Every refusal names the devices that do exist, so the message alone says what to type instead.
"""
from __future__ import annotations

import platform

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


# ---- the `auto` dtype

def auto_dtype(device) -> torch.dtype:
    """The dtype `auto` picks on `device`: bf16 where the device has bf16 arithmetic, else float32.

    - CPU: bf16 only with native bf16 instructions (`cpu_has_native_bf16`). Measured side by side
      (`bench/bench_dtype.py`, bench/RESULTS.md): on an AVX2-only CPU a bf16 decoder layer at the real geometry took
      1.3-1.4x the fp32 time and the VAE's convolutions 19-60x; with AVX512-BF16, bf16 generated 2x faster.
    - CUDA: bf16 on GPUs with bf16 tensor cores (compute capability 8.0+; ROCm: where torch says it has bf16).
    - MPS and other GPUs: bf16 where the device computes it.
    fp16 is never picked: Qwen-style activations overflow it. The command line's `--dtype auto` and the ComfyUI
    loader's `auto` on CPU and MPS both ask here.
    """
    device = torch.device(device)
    if device.type == "cpu":
        native = cpu_has_native_bf16()
    elif device.type == "cuda":
        native = _cuda_has_bf16(device)
    else:
        native = _computes(torch.bfloat16, device)
    return torch.bfloat16 if native else torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on Arm."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if platform.machine().lower() in ("arm64", "aarch64"):
        probes.append(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None))  # Arm: its BF16 extension
    for probe in probes:
        try:
            if probe is not None and probe():
                return True
        except (RuntimeError, AttributeError, TypeError):  # a build without the probe or without oneDNN
            continue
    return False


def _cuda_has_bf16(device: torch.device) -> bool:
    try:
        if getattr(torch.version, "hip", None):
            return bool(torch.cuda.is_bf16_supported())
        return torch.cuda.get_device_capability(device)[0] >= 8
    except (RuntimeError, AssertionError, AttributeError):
        return False


def _computes(dtype: torch.dtype, device: torch.device) -> bool:
    from ..weights.loading import check_dtype_supported

    try:
        check_dtype_supported(dtype, device)
    except NextStepError:
        return False
    return True


def resolve_dtype(spec, device) -> torch.dtype:
    """A compute dtype for `spec` ("auto", None, or a name such as "bfloat16" / "fp32"), checked to work on `device`."""
    from ..weights.loading import check_dtype_supported, parse_dtype

    dtype = auto_dtype(device) if spec is None or str(spec).strip().lower() in AUTO else parse_dtype(spec)
    check_dtype_supported(dtype, torch.device(device))
    return dtype
