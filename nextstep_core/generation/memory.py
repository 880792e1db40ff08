"""How much memory a generation needs, and refusing up front what cannot fit.

A generation holds, beyond the weights: the KV cache of every guidance row; at its peak either the prefill's
activations or one token's (the decoder step, plus the head's AdaLN modulations for every step of every row, which
are computed at once); the tokens and latents of the result; and, in the front ends that decode, the VAE decoding
every image at once. `generation_bytes` and `decode_bytes` count those from the configs alone, so the command line
refuses a job before loading anything and `sample` before allocating its cache.

Free memory is asked of the device: CUDA's allocator; for the CPU (and MPS, which shares it) the system's available
memory read with the standard library (/proc/meminfo and a cgroup v2 limit on Linux, GlobalMemoryStatusEx on
Windows, psutil where installed, else sysconf). Where nothing can tell, the check is skipped with one warning.
"""
from __future__ import annotations

import logging
import os
import sys

import torch

from ..errors import NextStepError
from .prompt import grid_size

HEADROOM = 0.9  # refuse above 90 % of what is free: allocators round sizes up and fragment
DEFAULT_PROMPT_TOKENS = 128  # prompt slots assumed where the prompts are not tokenised yet
DEFAULT_STEPS = 50  # head steps assumed where the settings are not known: the most any family uses by default
log = logging.getLogger("nextstep")


def generation_bytes(cfg, dtype: torch.dtype, rows: int, prompt_len: int, tokens: int, steps: int = DEFAULT_STEPS,
                     images: int | None = None) -> dict[str, int]:
    """{part: bytes} that `sample` allocates for `rows` guidance rows, `prompt_len` prompt slots and `tokens` image
    tokens, besides the weights. `images` (default: rows, an upper bound) sets the size of the result."""
    from ..model.kv_cache import KVCache

    elem = dtype.itemsize
    seq = prompt_len + tokens
    position = (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * elem  # one row's live activations in a layer
    prefill = rows * prompt_len * (position + cfg.num_attention_heads * prompt_len * elem)
    step = rows * (position + cfg.num_attention_heads * seq * elem)
    head = rows * (steps + 1) * (3 * cfg.fm_head_layers + 2) * cfg.fm_head_dim * elem  # modulations of every step
    head += rows * 8 * cfg.fm_head_dim * 4  # the sampled token's working copies (float32)
    images = rows if images is None else images
    return {"KV cache": KVCache.bytes_per_token(cfg, dtype) * rows * seq,
            "activations": max(prefill, step + head),
            "tokens and latents": 3 * images * tokens * cfg.token_dim * 4}


def decode_bytes(vae_cfg, images: int, width: int, height: int, dtype: torch.dtype = torch.float32) -> int:
    """Peak memory of decoding `images` images at once: at full resolution a decoder block holds about four feature
    maps of the widest level that reaches it (measured 3.1-3.5 KB per pixel on the f8ch16 VAE in fp32, counted as 4)."""
    mult = vae_cfg.ch_mult
    widest = vae_cfg.ch * max(mult[:2])
    return images * width * height * (4 * widest * dtype.itemsize + 3 * 4)


def weight_bytes(shapes: dict, dtypes: dict, dtype: torch.dtype) -> int:
    """Bytes the weights of a checkpoint take once loaded in `dtype`, as the loader keeps them: the codes and scales
    of quantised files in their stored dtypes, every other float tensor in `dtype`."""
    from ..weights.quant import QUANT_SUFFIXES
    from ..weights.st_io import FROM_ST

    total = 0
    for key, shape in shapes.items():
        stored = FROM_ST.get(dtypes.get(key), torch.float32)
        keep = stored.itemsize == 1 or not stored.is_floating_point or key.endswith(QUANT_SUFFIXES)
        total += int(torch.Size(shape).numel()) * (stored.itemsize if keep else dtype.itemsize)
    return total


def _meminfo() -> int | None:
    """Linux: MemAvailable (or its pre-3.14 approximation), capped by a cgroup v2 memory limit."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split()[1:2]}
    except (OSError, ValueError, IndexError):
        return None
    free = info.get("MemAvailable")
    if free is None and "MemFree" in info:
        free = info["MemFree"] + info.get("Buffers", 0) + info.get("Cached", 0)
    try:
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limit, used = f.read().strip(), int(g.read())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def _windows() -> int | None:
    import ctypes

    class MEMORYSTATUSEX(ctypes.Structure):
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32)] + [  # DWORD is 32 bits
            (name, ctypes.c_uint64) for name in ("ullTotalPhys", "ullAvailPhys", "ullTotalPageFile",
                                                    "ullAvailPageFile", "ullTotalVirtual", "ullAvailVirtual",
                                                    "ullAvailExtendedVirtual")]

    status = MEMORYSTATUSEX(dwLength=ctypes.sizeof(MEMORYSTATUSEX))
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return int(status.ullAvailPhys)


def _psutil() -> int | None:
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _sysconf() -> int | None:
    """Free pages (less than what the system could hand out: page cache is not counted)."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def system_available_bytes() -> int | None:
    """Memory the system can give this process now, from the first source that answers (module docstring)."""
    sources = [_meminfo] if sys.platform.startswith("linux") else []
    sources += [_windows] if sys.platform == "win32" else []
    for source in sources + [_psutil, _sysconf]:
        free = source()
        if free is not None:
            return free
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device` for new tensors, or None where it cannot be told."""
    if device.type == "cuda":
        # memory PyTorch has reserved but not handed out is free for new tensors too
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type == "mps":
        free = system_available_bytes()
        limit = getattr(torch.mps, "recommended_max_memory", None)
        if limit is not None:
            room = limit() - torch.mps.driver_allocated_memory()
            free = room if free is None else min(free, room)
        return free
    if device.type == "cpu":
        return system_available_bytes()
    return None


_warned: set = set()
ADVICE = "use fewer images or a smaller size"


def refuse_if_short(parts: dict[str, int], device: torch.device) -> None:
    """Raises NextStepError, naming the parts that add up, where their sum is above HEADROOM of the free memory."""
    free = available_bytes(device)
    if free is None:
        if str(device) not in _warned:
            _warned.add(str(device))
            log.warning("cannot tell how much memory is free on %s; generations are not checked against it", device)
        return
    need = sum(parts.values())
    if need > HEADROOM * free:
        detail = ", ".join(f"{name} {n / 2**30:.2f} GiB" for name, n in parts.items() if n)
        raise NextStepError(f"this job needs {need / 2**30:.1f} GiB ({detail}) but only {free / 2**30:.1f} GiB is "
                            f"free on {device}: {ADVICE}.")


def check_fits(model, rows: int, seq: int, plan=None) -> None:
    """Refuse, before any compute, a generation whose cache and activations cannot fit in the device's free memory
    (the loaded weights are already taken from it).

    `seq` is the cache's slots; `plan` (a GenerationPlan) gives the prompt length, head steps and image count, which
    are otherwise bounded by DEFAULT_PROMPT_TOKENS, DEFAULT_STEPS and `rows`."""
    if plan is not None:
        prompt_len, steps, images = plan.prompt_len, plan.settings.steps, plan.n_img
    else:
        prompt_len, steps, images = min(seq, DEFAULT_PROMPT_TOKENS), DEFAULT_STEPS, rows
    refuse_if_short(generation_bytes(model.config, model.dtype, rows, prompt_len, seq - prompt_len, steps, images),
                    model.device)


def check_job_fits(cfg, plan, weights: int, vae_cfg, dtype: torch.dtype, device: torch.device) -> None:
    """A front end's check before it loads anything: `weights` (the model's, see `weight_bytes`) and the VAE's, the
    generation `plan` describes, and the VAE decoding all of its images at once."""
    from ..model.vae import AutoEncoder

    with torch.device("meta"):
        vae = sum(p.numel() for p in AutoEncoder(vae_cfg).parameters()) * dtype.itemsize
    s = plan.settings
    parts = {"weights": weights + vae, **generation_bytes(cfg, dtype, plan.rows, plan.prompt_len, plan.total, s.steps,
                                                          plan.n_img),
             "VAE decode": decode_bytes(vae_cfg, plan.n_img, s.width, s.height, dtype)}
    refuse_if_short(parts, device)


def estimate_memory_bytes(model, width: int, height: int, rows: int, prompt_tokens: int = DEFAULT_PROMPT_TOKENS,
                          steps: int = DEFAULT_STEPS) -> int:
    """Weights + KV cache + activations + result of a generation of `rows` guidance rows at this size."""
    h, w = grid_size(width, height, model.config)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + sum(generation_bytes(model.config, model.dtype, rows, prompt_tokens, h * w, steps).values())
