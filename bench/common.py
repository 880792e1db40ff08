"""Shared helpers for the benchmark scripts: timing, medians, memory probes, error metrics, output.

Nothing here is a pass/fail threshold: the scripts print medians and ratios, and RESULTS.md compares them with
the goals of issue 5 by hand.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def now() -> float:
    return time.perf_counter()


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def summary(xs) -> dict:
    """median / min / max / n of a list of seconds (or rates)."""
    return {"median": med(xs), "min": min(xs) if xs else None, "max": max(xs) if xs else None, "n": len(xs),
            "all": [round(x, 6) for x in xs]}


def interleave(variants: dict, reps: int, log=print) -> dict:
    """Run each zero-arg callable once per round, rounds A/B/C/A/B/C...; returns {name: [seconds...]}.

    A callable may return a float (its own measured seconds, e.g. excluding setup) or None (the wall time of the
    call is used).
    """
    times = {k: [] for k in variants}
    for r in range(reps):
        for name, fn in variants.items():
            t0 = now()
            got = fn()
            dt = now() - t0 if not isinstance(got, (int, float)) else float(got)
            times[name].append(dt)
            log(f"    round {r + 1}/{reps} {name:<28s} {dt:8.3f} s")
    return times


def proc_status(field: str = "VmHWM") -> int | None:
    """Bytes of a /proc/self/status field (VmHWM = peak RSS of this process since exec; Linux only)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_child(args: list[str], timeout: float = 900) -> dict:
    """Run `python args...` in a fresh process (cwd = repo root) and parse the last stdout line as JSON."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"child {args} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    lines = [ln for ln in p.stdout.splitlines() if ln.strip().startswith("{")]
    return json.loads(lines[-1])


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


def psnr(a, b) -> float:
    """PSNR in dB of images in 0..1 (b is the reference)."""
    import math

    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def mb(n) -> float | None:
    return None if n is None else n / 1e6


def env_info() -> dict:
    import torch

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except Exception:
        rev = ""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "cpu": cpu, "git": rev, "command": " ".join([sys.executable, *sys.argv])}


def fmt(x, nd=3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x != x:
            return "nan"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if x != 0 and abs(x) < 10 ** -nd:
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def table(rows: list[list], header: list[str]) -> str:
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"  # noqa: E731
    out = [line(header), "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def dump_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=lambda o: repr(o))
    os.replace(tmp, path)


# ---- the CPU bench's generation helpers (also used by its subprocess probes)

PROMPT = "a red fox in the snow, film grained"
NEGATIVE = "lowres, bad anatomy, blurry"
SEED = 1


def weight_bytes(model, prefix: str = "") -> int:
    """Bytes held by the model's parameters and buffers whose names start with `prefix`, each storage counted once.

    (A packed int4 layer's scale and zero are views into one table, which must not be counted twice. A weight packed
    for the CPU's matmul has no storage to ask; it holds its logical size.)
    """
    import itertools

    storages = {}
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t is not None and name.startswith(prefix) and t.is_mkldnn:
            storages[("packed", name)] = t.numel() * t.element_size()
        elif t is not None and name.startswith(prefix):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def checkpoint(cache: str, size: str) -> str:
    from nextstep_core.weights.testing import make_tiny_checkpoint

    path = os.path.join(cache, f"ckpt-{size}-seed0")
    if not os.path.isfile(os.path.join(path, "vae", "checkpoint.pt")):
        t0 = now()
        make_tiny_checkpoint(path + ".partial", size=size)
        os.replace(path + ".partial", path) if not os.path.exists(path) else None
        print(f"  made {size} checkpoint in {now() - t0:.1f} s: {path}")
    return path


def gen(model, width, height, **kw):
    import nextstep_core as ns

    kw.setdefault("fast", "eager")
    cond = ns.Conditioning([PROMPT], negative_prompt=NEGATIVE)
    settings = ns.SamplerSettings(width=width, height=height, cfg=7.5, steps=kw.pop("steps", 50),
                                  seed=kw.pop("seed", SEED), noise="independent", **kw)
    return ns.sample(model, cond, settings)


def compare(model, width: int, height: int, variants: dict, reps: int) -> tuple[dict, dict]:
    """Time `gen` under each variant's keyword arguments, interleaved A/B/A/B after one small warm-up each.

    Returns (times per variant, the last result of each variant).
    """
    for kw in variants.values():
        gen(model, 16, 16, **kw)
    results = {}

    def runner(name, kw):
        def run():
            results[name] = gen(model, width, height, **kw)
        return run

    times = interleave({name: runner(name, kw) for name, kw in variants.items()}, reps)
    return times, results
