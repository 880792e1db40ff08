"""CPU benchmark of the compiled fixed-shape step (`SamplerSettings.compile`): first-call compile time, then tokens/s
side by side with the uncompiled step; never a test.

    python bench/bench_compile.py                  # medium checkpoint, fp32, 1 thread, 3 rounds
    python bench/bench_compile.py --quick          # tiny checkpoint, 2 rounds

The compile time is the first compiled generation minus an uncompiled one of the same size, in a fresh inductor
cache (TORCHINDUCTOR_CACHE_DIR is pointed at an empty folder, so nothing is reused from an earlier run); then the
same generation again in a new process that finds the cache warm (what the second ComfyUI start pays). Then
`fast="static"` with compile on and off, interleaved A/B/A/B; tokens are compared with the plain loop.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="nextstep-inductor-"))
from common import checkpoint, dump_json, env_info, fmt, interleave, med, now, rel_err, table  # noqa: E402


def generate(model, compile_mode: str, fast: str = "static", seed: int = 1):
    import nextstep_core as ns

    s = ns.SamplerSettings(width=64, height=64, steps=50, cfg=7.5, seed=seed, fast=fast, compile=compile_mode)
    return ns.sample(model, ns.Conditioning(["a red fox in the snow"], negative_prompt="blurry"), s)


def first_call(ck: str, dtype: str) -> float:
    """Seconds of one compiled generation (16 tokens) in this process."""
    import nextstep_core as ns

    model = ns.load_model(ck, dtype=dtype)
    t0 = now()
    res = generate(model, "on")
    assert res.path == "static+compile", res.path
    return now() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    if a.child:
        print(first_call(a.child, a.dtype))
        return 0
    import nextstep_core as ns

    size, reps = ("tiny", 2) if a.quick else ("medium", 3)
    ck = checkpoint(os.path.join(tempfile.gettempdir(), "nextstep-bench"), size)
    model = ns.load_model(ck, dtype=a.dtype)
    t0 = now()
    plain = generate(model, "off")
    uncompiled = now() - t0
    t0 = now()
    first = generate(model, "on")
    compiled_first = now() - t0
    child = [sys.executable, __file__, "--child", ck, "--dtype", a.dtype, "--threads", str(a.threads)]
    warm = float(subprocess.run(child, capture_output=True, text=True, check=True).stdout.split()[-1])
    times = interleave({"static": lambda: generate(model, "off"), "static+compile": lambda: generate(model, "on")},
                       reps)
    eager = generate(model, "off", fast="eager")
    out = {"env": env_info(), "size": size, "dtype": a.dtype, "threads": a.threads, "inductor_cache": CACHE,
           "compile_s_fresh_cache": compiled_first - uncompiled, "first_generation_warm_cache_s": warm,
           "uncompiled_generation_s": uncompiled, "path": first.path,
           "static_s": med(times["static"]), "compiled_s": med(times["static+compile"]),
           "speedup": med(times["static"]) / med(times["static+compile"]),
           "rel_err_compiled_vs_plain_loop": rel_err(first.tokens, eager.tokens),
           "rel_err_static_vs_plain_loop": rel_err(plain.tokens, eager.tokens), "rounds": times}
    print(table([[k, fmt(out[k])] for k in ("compile_s_fresh_cache", "first_generation_warm_cache_s",
                                           "uncompiled_generation_s", "static_s", "compiled_s", "speedup",
                                           "rel_err_compiled_vs_plain_loop", "rel_err_static_vs_plain_loop")],
                ["", f"{size}, {a.dtype}, {a.threads} thread(s), 16 tokens x 50 steps"]))
    dump_json(os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_compile.json"), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
