"""CPU benchmark for issue 10's optional torch.compile of the head step: medians, side by side, never a test.

    python bench/bench_compile.py                 # medium checkpoint, bf16 and fp32, 1 thread
    python bench/bench_compile.py --quick         # tiny checkpoint, 2 rounds

Head alone (`sample_token`, 50 steps, 2 guidance rows, fixed condition), the fused loop with and without
`compile_head`, interleaved A/B/A/B per dtype; the compile time is the first compiled call minus an uncompiled
one, in a fresh inductor cache (TORCHINDUCTOR_CACHE_DIR is pointed at an empty folder, so nothing is reused from
an earlier run).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nextstep-inductor-")  # before torch loads
from bench_cpu import head_inputs  # noqa: E402
from common import checkpoint, dump_json, env_info, fmt, interleave, med, now, rel_err, table  # noqa: E402


def bench_dtype(ck: str, dtype: str, reps: int) -> dict:
    import torch

    import nextstep_core as ns
    from nextstep_core.generation import compile as head_compile
    from nextstep_core.model.family import family_of
    from nextstep_core.generation.sampling import HeadPlan, sample_token

    model = ns.load_model(ck, dtype=dtype)
    cc, noise, guide, base = head_inputs(model)  # the same inputs as bench_cpu.py's head section
    with torch.inference_mode():
        plans = {name: HeadPlan.build(model.image_head, family_of(model.config), 50, base.replace(compile_head=on),
                                      model.device, model.dtype) for name, on in (("fused", False),
                                                                                  ("fused+compile", True))}
    if not plans["fused+compile"].compiled:
        raise RuntimeError(f"compile_head is unavailable here: {head_compile.compile_support('cpu')}")
    outs = {}

    def head(name):
        def f():
            with torch.inference_mode():
                outs[name] = sample_token(model.image_head, cc, noise, plans[name], guide)
        return f

    head("fused")()
    t0 = now()
    head("fused")()
    plain_call = now() - t0
    t0 = now()
    head("fused+compile")()  # dynamo traces, inductor generates and builds C++
    first = now() - t0
    times = interleave({name: head(name) for name in plans}, reps)
    return {"compile_s": first - plain_call, "fused_tok_s": 1 / med(times["fused"]),
            "compiled_tok_s": 1 / med(times["fused+compile"]),
            "speed": med(times["fused"]) / med(times["fused+compile"]),
            "rel_err": rel_err(outs["fused+compile"], outs["fused"]), "times": times}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="medium")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    p.add_argument("--cache", default=os.environ.get("NEXTSTEP_BENCH_CACHE",
                                                     os.path.join(tempfile.gettempdir(), "nextstep-bench")))
    a = p.parse_args()
    if a.quick:
        a.size, a.reps = "tiny", 2
    import torch

    torch.set_num_threads(a.threads)
    os.makedirs(a.cache, exist_ok=True)
    ck = checkpoint(a.cache, a.size)
    results = {"env": env_info(), "size": a.size, "threads": a.threads}
    rows = []
    for dtype in ("bfloat16", "float32"):
        print(f"\n## {a.size}, {dtype}, head alone, 50 steps, 2 guidance rows, {a.threads} thread(s)")
        r = bench_dtype(ck, dtype, a.reps)
        results[dtype] = r
        rows.append([dtype, r["fused_tok_s"], r["compiled_tok_s"], r["speed"], r["compile_s"], r["rel_err"]])
    print("\n" + table(rows, ["dtype", "fused tok/s", "fused+compile tok/s", "compiled/fused", "compile s",
                              "rel err"]))
    print(f"(torch {torch.__version__}; {fmt(float(a.reps), 0)} interleaved rounds, medians)")
    if a.json:
        dump_json(a.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
