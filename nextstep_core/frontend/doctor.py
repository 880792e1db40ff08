"""`python -m nextstep_core doctor [--device D] [--json FILE]`: how fast and how exact the pack is on this machine.

It writes a random checkpoint at the real model's widths (5120-wide decoder layers with 40 / 8 heads and a 13824-wide
MLP, 1536-wide head blocks), with fewer decoder layers and head blocks, into a temporary folder in memory where the
system has one (/dev/shm), and loads it through the same code as a real checkpoint. Then, on the chosen device, every per-token
path that exists there (graph / static / eager) runs in every weight format the device can hold (fp32, bf16, fp16,
int8, int4, fp8) on the same prompt, seed and noise. Per path it reports:

- `max_token_err`: the largest relative L2 error of one image token against the plain (eager) loop in fp32 on the
  same weights; for a quantised path, on its dequantised weights, so the number measures the kernels and the
  compute dtype, not the quantisation;
- `tokens_per_s`: image tokens per second, timed from the third token to the last (the first one captures and is
  checked, the second is profiled);
- `kernels_per_token`: kernels launched for the second image token on a GPU, or leaf operator calls on a CPU, counted
  by torch.profiler;
- `peak_mem_mb`: peak memory allocated on the device during the path (on the CPU: the process's peak RSS);
- `compiled`: whether the step's blocks ran through torch.compile (the "+compile" paths; on the CPU one fp32 path
  is compiled to check it, on CUDA every format has a compiled and an uncompiled graph path);
- `matmul` (quantised formats: scaled_mm, int8pack, int4pack or dequant), `kernels` (how many quantised layers run
  which), and `attention` (the SDPA kernels found working). Where the device has no fp8 matmul (a CPU), fp8 also
  runs once with `_scaled_mm` forced on, to check its numbers.

A path is `ok` when it ran, stayed on the path asked for (no fallback) and its error is within the bound for its
compute dtype (`BOUNDS`). The exit status is 1 when any path is not ok. Random weights: these numbers bound numerical
error and measure speed; they say nothing about how images look.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

FORMATS = ("fp32", "bf16", "fp16", "int8", "int4", "fp8")
DTYPE_OF = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The largest token error each compute dtype may show against fp32 on the same weights. Measured here with random
# weights at the real widths (bench/RESULTS.md, doctor): fp32 paths agree to 1e-5; bf16 / fp16 and the quantised
# paths (bf16 compute) stay under a few percent. A wrong kernel or graph is off by order 1.
BOUNDS = {"float32": 1e-3, "float16": 0.1, "bfloat16": 0.2}
PROMPT = "a red fox in the snow, golden hour"
HEAD_BLOCKS = 2  # of the real 12: the head's speed per block is what matters, and the report must stay quick


MATMUL = {"fp8_scaled_mm": "scaled_mm", "int8_pack": "int8pack", "int4_cpu": "int4pack", "int4_gpu": "int4pack",
          "dequant": "dequant"}


@dataclass
class PathReport:
    name: str  # graph, static or eager; "+compile" when its blocks run through torch.compile
    dtype: str  # the weight format
    ok: bool = False
    compiled: bool = False
    matmul: str | None = None  # quantised formats: scaled_mm, int8pack, int4pack or dequant (several: joined by +)
    max_token_err: float | None = None
    tokens_per_s: float | None = None
    kernels_per_token: int | None = None
    peak_mem_mb: float | None = None
    attention: list = field(default_factory=list)
    kernels: dict = field(default_factory=dict)
    error: str | None = None


def _paths(device, fmt: str) -> list[str]:
    """The per-token paths run for a weight format: graph (on CUDA) and static, each compiled where compiling is
    the default (CUDA) and once uncompiled, and the plain loop; the CPU compiles one path (fp32) to check it."""
    from ..generation.graph import graphs_available

    fixed = "graph" if graphs_available(device) else "static"
    compiled = [f"{fixed}+compile"] if device.type == "cuda" or fmt == "fp32" else []
    return compiled + [fixed] + (["static"] if fixed == "graph" else []) + ["eager"]


def _variants(device, fmt: str) -> list[tuple[dict, list[str]]]:
    """(environment while loading, paths) per model a format is loaded as: on devices without fp8 matmul, fp8 also
    once through `_scaled_mm` forced on (its numbers checked, whatever its speed there)."""
    from ..weights.quant_fp8 import tensor_cores

    variants = [({}, _paths(device, fmt))]
    if fmt == "fp8" and not tensor_cores(device) and device.type != "mps":
        variants.append(({"NEXTSTEP_FP8_MATMUL": "1"}, ["eager"]))
    return variants


def _settings(path: str):
    """The settings of a path name: "graph+compile" is fast graph with compile on, "static" compile off, ..."""
    from ..generation.settings import family_defaults

    fast, _, compiled = path.partition("+")
    return family_defaults("nextstep-1").replace(width=48, height=32, steps=4, seed=7, fast=fast,  # 6 tokens
                                                 compile="on" if compiled else "off")


def _make_checkpoint(folder: str, layers: int, size: str) -> str:
    from ..weights.testing import make_tiny_checkpoint

    return make_tiny_checkpoint(os.path.join(folder, "NextStep-1-Large-doctor"), size=size, with_vae=False,
                                with_lm_head=False, num_hidden_layers=layers, fm_head_layers=HEAD_BLOCKS)


def _load(path: str, fmt: str, device, reference: bool = False):
    """The model in `fmt` on `device`; `reference`: fp32 compute with every quantised layer dequantising."""
    import torch

    from ..weights.loading import load_model
    from ..weights.quant import QUANT_FORMATS, use_reference_kernels

    quant = fmt if fmt in QUANT_FORMATS else None
    dtype = "float32" if reference else DTYPE_OF.get(fmt) or _quant_compute_dtype(device)
    model = load_model(path, dtype=dtype, device=device, quantize=quant)
    if reference and quant:
        use_reference_kernels(model)
    model.release_step_cache()
    torch.manual_seed(0)
    return model


def _quant_compute_dtype(device) -> str:
    from ..weights.loading import check_dtype_supported

    import torch

    try:
        check_dtype_supported(torch.bfloat16, device)
        return "bfloat16"
    except Exception:  # a device without bf16: quantised weights compute in fp32 there
        return "float32"


def _generate(model, path: str, measure: bool = False):
    """(result, kernels of the second token, tokens/s from the third to the last); the last two only if `measure`."""
    from ..generation.loop import Conditioning, sample

    seen = {}
    prof = _Profiler(model.device) if measure else None

    def progress(done, total, _tokens):
        if prof is None:
            return
        if done == 1:
            prof.start()
        elif done == 2:
            seen["kernels"] = prof.stop()
            seen["t0"] = _now(model.device)
        elif done == total:
            seen["rate"] = (total - 2) / (_now(model.device) - seen["t0"])

    res = sample(model, Conditioning([PROMPT]), _settings(path), progress=progress)
    return res, seen.get("kernels"), seen.get("rate")


def _profile_compiled_kernels() -> None:
    """Inductor's CPU kernels are no ATen calls: have each one record itself, so the profiler counts them too."""
    try:
        import torch._inductor.config as inductor

        inductor.cpp.enable_kernel_profile = True
    except (ImportError, AttributeError):  # an older torch: compiled CPU kernels go uncounted there
        pass


def _now(device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Profiler:
    """Counts the kernels (GPU) or leaf operator calls (CPU) between start() and stop()."""

    def __init__(self, device):
        from torch.profiler import ProfilerActivity, profile

        self.gpu = device.type == "cuda"
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.gpu else [])
        self.prof = profile(activities=acts)

    def start(self):
        with _quiet_stderr():
            self.prof.start()

    def stop(self) -> int:
        import torch

        if self.gpu:
            torch.cuda.synchronize()
        with _quiet_stderr():
            self.prof.stop()
        events = self.prof.events()
        if self.gpu:
            from torch.autograd import DeviceType

            return sum(1 for e in events if e.device_type == DeviceType.CUDA)
        # leaf ATen calls, and the kernels Inductor generated (each records itself: `_profile_compiled_kernels`)
        return sum(1 for e in events if (e.name.startswith("aten::") and not e.cpu_children)
                   or "_cpp_fused_" in e.name)


@contextlib.contextmanager
def _quiet_stderr():
    """The profiler's C++ side logs every start and stop to file descriptor 2; this report has its own output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _token_error(got, want) -> float:
    err = (got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1).clamp(min=1e-12)
    return float(err.max())


def _peak_reset(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif sys.platform.startswith("linux"):
        try:  # Linux resets the peak resident set size ("VmHWM") when 5 is written here
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def _peak_mb(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps" and hasattr(torch, "mps"):
        return torch.mps.driver_allocated_memory() / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _kernel_counts(model) -> dict:
    counts = {}
    for m in model.modules():
        if getattr(m, "weight_scale", None) is not None:
            counts[m.kernel] = counts.get(m.kernel, 0) + 1
    return counts


def _run_path(model, name: str, fmt: str, reference, bound: float) -> PathReport:
    from ..model.attention import backend_names

    kernels = _kernel_counts(model)
    rep = PathReport(name, fmt, compiled=name.endswith("+compile"), kernels=kernels,
                     matmul="+".join(sorted({MATMUL.get(k, k) for k in kernels})) or None,
                     attention=backend_names(model.device, model.dtype, model.config.head_dim))
    try:
        _peak_reset(model.device)
        res, rep.kernels_per_token, rep.tokens_per_s = _generate(model, name, measure=True)
        rep.peak_mem_mb = _peak_mb(model.device)
        rep.max_token_err = _token_error(res.tokens, reference)
        if res.path != name:
            rep.error = f"ran on the {res.path} path instead: {res.fallback}"
        elif not rep.max_token_err <= bound:
            rep.error = f"token error {rep.max_token_err:.3g} is above the bound {bound:g} for {model.dtype}"
        rep.ok = rep.error is None
    except Exception as e:  # a path that fails is a finding, not a crash of the report
        rep.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
    return rep


def run(device=None, layers: int | None = None, formats=FORMATS, out=print, size: str = "full") -> dict:
    """Run every path on `device` (default: the best here); returns the report as a dict. `size` names the widths
    (`testing.SIZES`; "full" is the real model's, smaller ones are for tests)."""
    import torch

    _profile_compiled_kernels()
    from ..weights.loading import check_dtype_supported, parse_dtype
    from .devices import resolve_device

    dev = resolve_device(device)
    layers = layers or (2 if dev.type == "cuda" else 1)
    report = {"device": _describe(dev), "torch": torch.__version__, "python": platform.python_version(),
              "layers": layers, "paths": []}
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = tempfile.mkdtemp(prefix="nextstep-doctor-", dir=base)
    try:
        out(f"writing a random checkpoint at the real widths ({layers} decoder layer(s)) ...")
        ckpt = _make_checkpoint(folder, layers, size)
        reference = {}
        for fmt in formats:
            dtype = DTYPE_OF.get(fmt)
            skip = _unsupported(fmt, dtype, dev, check_dtype_supported, parse_dtype)
            if skip:
                report["paths"].append({**asdict(PathReport("-", fmt)), "ok": True, "skipped": skip})
                out(f"{fmt:>5}: skipped ({skip})")
                continue
            ref_key = fmt if fmt in ("int8", "int4", "fp8") else "fp32"
            if ref_key not in reference:
                ref_model = _load(ckpt, ref_key, dev, reference=True)
                reference[ref_key] = _generate(ref_model, "eager")[0].tokens
                del ref_model
            for env, paths in _variants(dev, fmt):
                with _environment(env):
                    model = _load(ckpt, fmt, dev)
                for name in paths:
                    rep = _run_path(model, name, fmt, reference[ref_key], BOUNDS.get(str(model.dtype)[6:], 0.2))
                    report["paths"].append(asdict(rep))
                    out(_line(rep))
                del model
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    report["ok"] = all(p["ok"] for p in report["paths"])
    return report


@contextlib.contextmanager
def _environment(values: dict):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _unsupported(fmt, dtype, dev, check, parse) -> str | None:
    if fmt == "fp8" and dev.type == "mps":
        return "Apple GPUs cannot hold fp8 weights"
    if dtype is not None:
        try:
            check(parse(dtype), dev)
        except Exception as e:  # NextStepError with the device's own words
            return str(e).split(" (")[0]
    return None


def _describe(dev) -> str:
    import torch

    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)}, sm{''.join(map(str, torch.cuda.get_device_capability(dev)))})"
    if dev.type == "cpu":
        return f"cpu ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    return str(dev)


def _line(rep: PathReport) -> str:
    def num(v, f):
        return "-" if v is None else format(v, f)

    status = "ok" if rep.ok else f"FAIL: {rep.error}"
    quant = ", ".join(f"{MATMUL.get(k, k)} x{n}" for k, n in sorted(rep.kernels.items()))
    return (f"{rep.dtype:>5} {rep.name:>14}: err {num(rep.max_token_err, '.2e')}  {num(rep.tokens_per_s, '.2f')} tok/s  "
            f"{num(rep.kernels_per_token, 'd')} kernels/token  peak {num(rep.peak_mem_mb, '.0f')} MB  "
            f"attention {'+'.join(rep.attention)}{'  ' + quant if quant else ''}  {status}")


def main(device=None, json_path: str | None = None, layers: int | None = None) -> int:
    report = run(device, layers)
    print("all paths ok" if report["ok"] else "some paths FAILED: please attach the --json report to a bug report")
    if json_path:
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {json_path}")
    return 0 if report["ok"] else 1
