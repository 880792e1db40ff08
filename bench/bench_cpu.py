"""CPU benchmark for issue 5: medians and ratios, side by side, in one run. Never a pass/fail test.

    python bench/bench_cpu.py                  # full run (~10-15 min on 2 cores)
    python bench/bench_cpu.py --quick          # smoke run (small checkpoint, few tokens, 1 round)
    python bench/bench_cpu.py --json out.json  # also dump every number

Random-weight checkpoints come from `nextstep_core.weights.testing.make_tiny_checkpoint` and live in a cache folder outside
the repo (`--cache`, default $NEXTSTEP_BENCH_CACHE or <tmp>/nextstep-bench). Variants are interleaved A/B/A/B and
medians are reported, because the shared CPU is noisy. Peak RSS is VmHWM from /proc/self/status of a fresh
subprocess per variant (ru_maxrss would carry the parent's peak across exec).

Sections
  head      plain per-step head loop vs hoisted AdaLN modulations vs the fused loop (whole generation, and
            sample_token alone)
  fast      fast="eager" vs fast="static" (fixed shapes, no graph: what a CUDA graph would replay)
  quant     bf16 vs fp8 vs int8 vs int4 weights: tokens/s, (decoder) weight bytes, peak RSS, error vs bf16 on the
            same noise (head velocity, tokens, decoded image PSNR), which kernel each quantised layer runs
  batch     1 vs 4 images per prompt in one pass
  anneal    50 head steps vs step annealing 50 -> 5
  convert   peak RSS of `python -m nextstep_core convert SRC DST --dtype bf16` vs the bf16 weight bytes
  keep      regenerating the bottom half of an image (teacher forcing the top half) vs a whole image
  pack      dense weights packed for the CPU's matmul (`cpu_pack`, the default) vs plain F.linear, bf16 and fp32:
            the head alone and the whole generation, and the token difference on the same noise
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import bench_convert, bench_quant  # noqa: E402
from common import (NEGATIVE, PROMPT, REPO, SEED, checkpoint, compare, dump_json, env_info, fmt, gen,  # noqa: E402
                    interleave, max_abs, med, now, rel_err, summary, table)

# ---------------------------------------------------------------------------------------------------- sections

def head_inputs(model):
    """The head-alone benchmark's fixed inputs: a condition for 2 guidance rows, one token's noise, cfg 7.5,
    50 steps -> (condition, noise, Guidance, SamplerSettings)."""
    import torch

    import nextstep_core as ns
    from nextstep_core.generation.sampling import Guidance

    cfg = model.config
    g = torch.Generator().manual_seed(123)
    with torch.inference_mode():
        cc = model.image_out_projector(torch.randn(2, cfg.hidden_size, generator=g).to(model.dtype))
    noise = torch.randn(50, 1, cfg.token_dim, generator=g)
    return cc, noise, Guidance(2, 7.5, 1.0), ns.family_defaults(cfg.family).replace(steps=50)


def bench_head(a, ck, R):
    import torch

    import nextstep_core as ns
    from nextstep_core.model.family import family_of
    from nextstep_core.generation.sampling import HeadPlan, sample_token

    loops = ("plain", "hoisted", "fused")
    model = ns.load_model(ck, dtype="bfloat16")
    cfg = model.config
    cc, noise, guide, settings = head_inputs(model)
    with torch.inference_mode():
        plans = {loop: HeadPlan.build(model.image_head, family_of(cfg), 50, settings.replace(head_loop=loop),
                                      model.device, model.dtype) for loop in loops}
    outs = {}

    def head(loop):
        def f():
            with torch.inference_mode():
                outs[loop] = sample_token(model.image_head, cc, noise, plans[loop], guide)
        return f

    for loop in loops:  # warm-up
        head(loop)()
    print("  head alone: sample_token, 50 steps, 2 guidance rows")
    ht = interleave({f"head {loop}": head(loop) for loop in loops}, a.head_reps)
    w, h = a.width, a.height
    n_tok = (w // 16) * (h // 16)
    print(f"  whole generation {w}x{h} ({n_tok} tokens), eager")
    gt, gres = compare(model, w, h, {f"gen {loop}": dict(head_loop=loop) for loop in loops}, R)
    out = {"tokens": n_tok}
    for loop in loops:
        out[f"head_{loop}_s"] = summary(ht[f"head {loop}"])
        out[f"head_{loop}_tok_s"] = 1 / med(ht[f"head {loop}"])
        out[f"gen_{loop}_s"] = summary(gt[f"gen {loop}"])
        out[f"gen_{loop}_tok_s"] = n_tok / med(gt[f"gen {loop}"])
        out[f"head_{loop}_vs_plain_rel_err"] = rel_err(outs[loop], outs["plain"])
        out[f"gen_{loop}_vs_plain_tokens_rel_err"] = rel_err(gres[f"gen {loop}"].tokens, gres["gen plain"].tokens)
    out["head_speedup"] = med(ht["head plain"]) / med(ht["head hoisted"])  # hoisted / plain, as before
    out["gen_speedup"] = med(gt["gen plain"]) / med(gt["gen hoisted"])
    out["head_fused_over_hoisted"] = med(ht["head hoisted"]) / med(ht["head fused"])
    out["gen_fused_over_hoisted"] = med(gt["gen hoisted"]) / med(gt["gen fused"])
    rows = [["head alone (sample_token)", *(out[f"head_{lp}_tok_s"] for lp in loops), out["head_fused_over_hoisted"]],
            ["whole generation", *(out[f"gen_{lp}_tok_s"] for lp in loops), out["gen_fused_over_hoisted"]]]
    print(table(rows,
                ["medium, 50 steps, cfg 7.5", "plain tok/s", "hoisted tok/s", "fused tok/s", "fused/hoisted"]))
    for loop in ("hoisted", "fused"):
        print(f"  {loop} vs plain (bf16): head output rel err {fmt(out[f'head_{loop}_vs_plain_rel_err'])}, "
              f"generated tokens rel err {fmt(out[f'gen_{loop}_vs_plain_tokens_rel_err'])}")
    return out


def bench_fast(a, cks, R):
    import nextstep_core as ns

    out = {}
    rows = []
    for size, ck in cks.items():
        model = ns.load_model(ck, dtype="bfloat16")
        w, h = a.width, a.height
        n_tok = (w // 16) * (h // 16)
        print(f"  {size}: {w}x{h} ({n_tok} tokens), fused head")
        reps = R if size != "tiny" else max(R, 5)
        t, r = compare(model, w, h, {f"{size} eager": dict(fast="eager"), f"{size} static": dict(fast="static")},
                       reps)
        res = {"eager": r[f"{size} eager"], "static": r[f"{size} static"]}
        e, s = med(t[f"{size} eager"]), med(t[f"{size} static"])
        out[size] = {"tokens": n_tok, "eager_s": summary(t[f"{size} eager"]), "static_s": summary(t[f"{size} static"]),
                     "eager_tok_s": n_tok / e, "static_tok_s": n_tok / s, "static_over_eager_speed": e / s,
                     "tokens_rel_err": rel_err(res["static"].tokens, res["eager"].tokens),
                     "tokens_max_abs": max_abs(res["static"].tokens, res["eager"].tokens)}
        rows.append([size, n_tok / e, n_tok / s, e / s, out[size]["tokens_max_abs"]])
        model = None
    print(table(rows, ["checkpoint", "eager tok/s", "static tok/s", "static/eager speed", "max |dtoken|"]))
    return out


def bench_pack(a, ck, R):
    import torch

    import nextstep_core as ns
    from nextstep_core.weights.cpu_pack import unpack_linears
    from nextstep_core.model.family import family_of
    from nextstep_core.generation.sampling import HeadPlan, sample_token

    w, h = a.width, a.height
    n_tok = (w // 16) * (h // 16)
    out, rows = {"tokens": n_tok}, []
    for dtype in ("bfloat16", "float32"):
        models = {"packed": ns.load_model(ck, dtype=dtype), "plain": ns.load_model(ck, dtype=dtype)}
        out[dtype] = {"packed_layers": sum(p.is_mkldnn for p in models["packed"].parameters()),
                      "unpacked_layers": unpack_linears(models["plain"])}
        cc, noise, guide, settings = head_inputs(models["plain"])
        with torch.inference_mode():
            plan = HeadPlan.build(models["plain"].image_head, family_of(models["plain"].config), 50, settings,
                                  torch.device("cpu"), models["plain"].dtype)
        heads, gens = {}, {}

        def head(k):
            def f():
                with torch.inference_mode():
                    heads[k] = sample_token(models[k].image_head, cc, noise, plan, guide)
            return f

        def whole(k):
            def f():
                gens[k] = gen(models[k], w, h)
            return f

        for k in models:
            head(k)()
            gen(models[k], 16, 16)
        print(f"  {dtype}: head alone (sample_token, 50 steps, 2 rows), then {w}x{h} ({n_tok} tokens), eager")
        ht = interleave({f"head {k}": head(k) for k in models}, a.head_reps)
        gt = interleave({f"gen {k}": whole(k) for k in models}, R)
        o = out[dtype]
        for k in models:
            o[f"head_{k}_s"], o[f"gen_{k}_s"] = summary(ht[f"head {k}"]), summary(gt[f"gen {k}"])
        o["head_speedup"] = med(ht["head plain"]) / med(ht["head packed"])
        o["gen_speedup"] = med(gt["gen plain"]) / med(gt["gen packed"])
        o["head_max_abs"] = max_abs(heads["packed"], heads["plain"])
        o["tokens_rel_err"] = rel_err(gens["packed"].tokens, gens["plain"].tokens)
        rows.append([dtype, 1 / med(ht["head plain"]), 1 / med(ht["head packed"]), o["head_speedup"],
                     n_tok / med(gt["gen plain"]), n_tok / med(gt["gen packed"]), o["gen_speedup"],
                     o["tokens_rel_err"]])
        models = None
    print(table(rows, ["dtype", "head plain tok/s", "head packed tok/s", "head packed/plain", "gen plain tok/s",
                       "gen packed tok/s", "gen packed/plain", "token rel diff"]))
    return out


def bf16_model(a, ck, note=""):
    """The section's checkpoint in bf16 and its image size: (model, width, height, tokens per image)."""
    import nextstep_core as ns

    w, h = a.width, a.height
    n_tok = (w // 16) * (h // 16)
    print(f"  {w}x{h} ({n_tok} tokens per image{note}), eager, fused head")
    return ns.load_model(ck, dtype="bfloat16"), w, h, n_tok


def bench_batch(a, ck, R):
    model, w, h, n_tok = bf16_model(a, ck)
    t, r = compare(model, w, h, {"1 image": dict(images_per_prompt=1), "4 images": dict(images_per_prompt=4)}, R)
    res = {1: r["1 image"], 4: r["4 images"]}
    t1, t4 = med(t["1 image"]), med(t["4 images"])
    out = {"tokens": n_tok, "one_s": summary(t["1 image"]), "four_s": summary(t["4 images"]),
           "one_tok_s_per_image": n_tok / t1, "four_tok_s_per_image": n_tok / t4,
           "one_s_per_image": t1, "four_s_per_image": t4 / 4, "four_over_one_time": t4 / t1,
           "throughput_gain": 4 * t1 / t4,
           "first_image_rel_err": rel_err(res[4].tokens[:1], res[1].tokens)}
    print(table([["1 image", t1, t1, n_tok / t1, 1.0], ["4 images", t4, t4 / 4, 4 * n_tok / t4, 4 * t1 / t4]],
                ["images per prompt", "s per pass", "s per image", "image tok/s", "throughput vs 1"]))
    print(f"  4 images take {fmt(t4 / t1)}x the time of one; image 0 of the batch vs the single run: rel err "
          f"{fmt(out['first_image_rel_err'])}")
    return out


def bench_anneal(a, ck, R):
    model, w, h, n_tok = bf16_model(a, ck)
    t, r = compare(model, w, h, {"50 steps": dict(steps_end=None), "50->5 annealed": dict(steps_end=5)}, R)
    res = {None: r["50 steps"], 5: r["50->5 annealed"]}
    other_seed = gen(model, w, h, seed=SEED + 1)
    # The SDE sampler draws one noise vector per step, so with fewer steps the noise stream shifts from token 1 on
    # and the two runs no longer share noise. The deterministic ODE sampler ("euler") draws only x0 per token, so
    # there the difference is the step-count truncation alone, on identical noise.
    ode = {end: gen(model, w, h, steps_end=end, sampler="euler") for end in (None, 5)}
    ode_other = gen(model, w, h, seed=SEED + 1, sampler="euler")
    t50, tan = med(t["50 steps"]), med(t["50->5 annealed"])
    tok0 = lambda r: r.tokens[:, :1]  # noqa: E731 - the first token: same noise in both runs, 50 steps in both
    out = {"tokens": n_tok, "steps50_s": summary(t["50 steps"]), "anneal_s": summary(t["50->5 annealed"]),
           "steps50_tok_s": n_tok / t50, "anneal_tok_s": n_tok / tan, "anneal_speedup": t50 / tan,
           "anneal_tokens_rel_err": rel_err(res[5].tokens, res[None].tokens),
           "other_seed_tokens_rel_err": rel_err(other_seed.tokens, res[None].tokens),
           "anneal_first_token_rel_err": rel_err(tok0(res[5]), tok0(res[None])),
           "ode_anneal_tokens_rel_err": rel_err(ode[5].tokens, ode[None].tokens),
           "ode_other_seed_tokens_rel_err": rel_err(ode_other.tokens, ode[None].tokens),
           "ode_anneal_last_token_rel_err": rel_err(ode[5].tokens[:, -1], ode[None].tokens[:, -1])}
    print(table([["50 steps", n_tok / t50, 1.0, 0.0, 0.0],
                 ["50->5", n_tok / tan, t50 / tan, out["anneal_tokens_rel_err"], out["ode_anneal_tokens_rel_err"]]],
                ["head steps", "tok/s", "speed vs 50", "token rel diff vs 50 (SDE)", "same, ODE sampler"]))
    print(f"  for scale: a different seed at 50 steps differs by {fmt(out['other_seed_tokens_rel_err'])} (SDE), "
          f"{fmt(out['ode_other_seed_tokens_rel_err'])} (ODE); the SDE runs share noise only for token 0")
    return out


def bench_keep(a, ck, R):
    """Teacher forcing: regenerating the bottom half of an image (kept tokens skip the head) vs a whole image."""
    import nextstep_core as ns

    rows, cols = a.height // 16, a.width // 16
    model, w, h, n_tok = bf16_model(a, ck, f", {rows} rows; 50 steps; the reroll keeps {rows // 2} rows")
    full = gen(model, w, h)
    inits = {"keep top half": ns.TokenInit(full.tokens, ns.keep_rows(rows // 2, rows, cols)),
             "keep all": ns.TokenInit(full.tokens, ns.keep_rows(rows, rows, cols))}
    cond = ns.Conditioning([PROMPT], negative_prompt=NEGATIVE)
    settings = ns.SamplerSettings(width=w, height=h, cfg=7.5, steps=50, seed=SEED + 1, noise="independent",
                                  fast="eager")
    results = {}

    def run(name):  # the first `gen` above was the warm-up
        def f():
            results[name] = ns.sample(model, cond, settings, init=inits.get(name))
        return f

    t = interleave({name: run(name) for name in ("whole image", *inits)}, R)
    full_s, half_s, all_s = (med(t[k]) for k in ("whole image", "keep top half", "keep all"))
    kept = slice(0, (rows // 2) * cols)
    out = {"tokens": n_tok, "whole_s": summary(t["whole image"]), "half_s": summary(t["keep top half"]),
           "keep_all_s": summary(t["keep all"]), "half_over_whole_time": half_s / full_s,
           "keep_all_over_whole_time": all_s / full_s,
           "kept_tokens_identical": bool((results["keep top half"].tokens[:, kept] == full.tokens[:, kept]).all())}
    print(table([["whole image", full_s, 1.0], ["reroll bottom half", half_s, half_s / full_s],
                 ["keep everything (prefill only)", all_s, all_s / full_s]],
                [f"{a.size}, 50 steps, cfg 7.5", "s", "time / whole"]))
    print(f"  kept tokens identical to the init: {out['kept_tokens_identical']}")
    return out


# ---------------------------------------------------------------------------------------------------- main

SECTIONS = ("head", "fast", "quant", "batch", "anneal", "convert", "keep", "pack")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small checkpoint, 4 tokens, 1 round")
    p.add_argument("--json", help="write every number to this JSON file")
    p.add_argument("--cache", default=os.environ.get("NEXTSTEP_BENCH_CACHE",
                                                     os.path.join(tempfile.gettempdir(), "nextstep-bench")),
                   help="folder for the random checkpoints (outside the repo)")
    p.add_argument("--size", default=None, help="main checkpoint size (default medium; small with --quick)")
    p.add_argument("--width", type=int, default=None, help="image width (default 128; 32 with --quick)")
    p.add_argument("--height", type=int, default=None, help="image height (default 64; 32 with --quick)")
    p.add_argument("--reps", type=int, default=None, help="rounds per comparison (default 3; 1 with --quick)")
    p.add_argument("--head-reps", type=int, default=None, help="rounds of the head-alone timing (default 7)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of sections: {','.join(SECTIONS)}")
    p.add_argument("--quant-formats", default="bf16,fp8,int8,int4", help="weights the quant section compares "
                   "(bf16 first: the reference)")
    a = p.parse_args(argv)
    a.size = a.size or ("small" if a.quick else "medium")
    a.width = a.width or (32 if a.quick else 128)
    a.height = a.height or (32 if a.quick else 64)
    R = a.reps or (1 if a.quick else 3)
    a.head_reps = a.head_reps or (2 if a.quick else 7)
    only = [s.strip() for s in a.only.split(",") if s.strip()]
    os.makedirs(a.cache, exist_ok=True)
    if os.path.abspath(a.cache).startswith(REPO + os.sep):
        print("warning: the cache folder is inside the repo", file=sys.stderr)
    results = {"env": env_info(), "settings": {"size": a.size, "width": a.width, "height": a.height, "reps": R,
                                               "head_reps": a.head_reps, "steps": 50, "cfg": 7.5, "seed": SEED,
                                               "noise": "independent", "prompt": PROMPT, "negative": NEGATIVE}}
    print(f"# NextStep CPU bench  {results['env']['date']}  torch {results['env']['torch']}  "
          f"{results['env']['threads']} threads  {results['env']['cpu']}")
    t_all = now()
    ck = checkpoint(a.cache, a.size)
    cks = {"tiny": checkpoint(a.cache, "tiny"), a.size: ck}
    for name in only:
        print(f"\n## {name}")
        t0 = now()
        try:
            if name == "head":
                results[name] = bench_head(a, ck, R)
            elif name == "fast":
                results[name] = bench_fast(a, cks, R)
            elif name == "quant":
                results[name] = bench_quant(a, ck, R, a.cache, cks["tiny"])
            elif name == "batch":
                results[name] = bench_batch(a, ck, R)
            elif name == "anneal":
                results[name] = bench_anneal(a, ck, R)
            elif name == "convert":
                results[name] = bench_convert(a, ck, a.cache)
            elif name == "keep":
                results[name] = bench_keep(a, ck, R)
            elif name == "pack":
                results[name] = bench_pack(a, ck, R)
            else:
                raise ValueError(f"unknown section {name}")
        except Exception as e:  # keep the other sections' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        results.setdefault(name, {})["section_seconds"] = now() - t0
        print(f"  ({now() - t0:.0f} s)")
        if a.json:
            dump_json(a.json, results)
    results["total_seconds"] = now() - t_all
    print(f"\ntotal {results['total_seconds']:.0f} s")
    summary_rows = []
    r = results
    if "head_speedup" in r.get("head", {}):
        summary_rows += [["hoisted / plain head, head alone (tok/s)", r["head"]["head_speedup"]],
                         ["hoisted / plain head, whole generation (tok/s)", r["head"]["gen_speedup"]],
                         ["fused / hoisted head, head alone (tok/s)", r["head"]["head_fused_over_hoisted"]],
                         ["fused / hoisted head, whole generation (tok/s)", r["head"]["gen_fused_over_hoisted"]]]
    for size, o in r.get("fast", {}).items():
        if isinstance(o, dict) and "static_over_eager_speed" in o:
            summary_rows.append([f"static / eager speed ({size})", o["static_over_eager_speed"]])
    if "bf16" in r.get("quant", {}):
        for k in [f for f in ("fp8", "int8", "int4") if f in r["quant"]]:
            q = r["quant"][k]
            summary_rows += [[f"{k} / bf16 speed", q["speed_vs_bf16"]],
                             [f"{k} / bf16 weight bytes", q["weights_vs_bf16"]],
                             [f"{k} / bf16 decoder weight bytes", q["decoder_weights_vs_bf16"]],
                             [f"{k} / bf16 peak RSS", q["vmhwm_vs_bf16"]],
                             [f"{k} / bf16 peak RSS minus interpreter", q["vmhwm_minus_interp_vs_bf16"]]]
    if "throughput_gain" in r.get("batch", {}):
        summary_rows += [["4 images / 1 image, time per pass", r["batch"]["four_over_one_time"]],
                         ["4 images / 1 image, per-image throughput", r["batch"]["throughput_gain"]]]
    if "anneal_speedup" in r.get("anneal", {}):
        summary_rows.append(["annealed 50->5 / 50 steps speed", r["anneal"]["anneal_speedup"]])
    if "half_over_whole_time" in r.get("keep", {}):
        summary_rows.append(["reroll bottom half / whole image, time", r["keep"]["half_over_whole_time"]])
    for dtype, o in r.get("pack", {}).items():
        if isinstance(o, dict) and "gen_speedup" in o:
            summary_rows += [[f"packed / plain weights, head alone, {dtype}", o["head_speedup"]],
                             [f"packed / plain weights, whole generation, {dtype}", o["gen_speedup"]]]
    if "vmhwm_over_goal" in r.get("convert", {}):
        summary_rows.append(["converter peak RSS / (1.1 x bf16 + 300 MB)", r["convert"]["vmhwm_over_goal"]])
    if summary_rows:
        print("\n## ratios\n" + table(summary_rows, ["ratio", "value"]))
    if a.json:
        dump_json(a.json, results)
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
