"""The memory sections of the CPU bench: quantised weights (speed, bytes, peak RSS, error) and the converter.

quant: bf16 vs fp8 vs int8 vs int4 files of the same checkpoint, loaded in bf16, timed interleaved (medians).

Run through bench_cpu.py (`--only quant,convert`); this file is also the fresh-process probe those sections start
(`python bench/bench_memory.py child-gen PATH W H`), so every peak RSS comes from a process of its own.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (gen, interleave, med, mb, now, fmt, proc_status, psnr, rel_err, run_child,  # noqa: E402
                    summary, table, weight_bytes)


CHILD_GEN = "child-gen"


def child_gen(path: str, width: int, height: int) -> None:
    """Fresh-process probe: load a model (or nothing) and generate; print VmHWM etc. as one JSON line."""
    import torch  # noqa: F401

    import nextstep_core as ns

    out = {"vmhwm_import": proc_status("VmHWM")}
    if path != "none":
        model = ns.load_model(path, dtype="bfloat16")
        out["weights"] = weight_bytes(model)
        out["vmhwm_load"] = proc_status("VmHWM")
        out["rss_after_load"] = proc_status("VmRSS")
        t0 = now()
        gen(model, width, height)
        out["gen_s"] = now() - t0
    out["vmhwm"] = proc_status("VmHWM")
    print(json.dumps(out))


def kernels(model) -> dict:
    """{kernel: number of layers} of a loaded model (quant.QuantLinear.kernel; plain layers are not counted)."""
    counts = {}
    for m in model.modules():
        k = getattr(m, "kernel", None)
        if k and k != "dense":
            counts[k] = counts.get(k, 0) + 1
    return counts


def bench_quant(a, ck, R, cache, tiny):
    import torch

    import nextstep_core as ns
    from nextstep_core.weights.convert import convert

    files = {}
    for fmt_ in a.quant_formats.split(","):
        dst = os.path.join(cache, f"{os.path.basename(ck)}-{fmt_}.safetensors")
        t0 = now()
        convert(ck, dst, fmt_)
        files[fmt_] = dst
        print(f"  converted {fmt_} in {now() - t0:.1f} s ({os.path.getsize(dst) / 1e6:.1f} MB file)")
    models = {k: ns.load_model(p, dtype="bfloat16") for k, p in files.items()}
    vae = ns.load_vae(os.path.join(ck, "vae"), dtype="float32")
    w, h = a.width, a.height
    n_tok = (w // 16) * (h // 16)
    for m in models.values():
        gen(m, 16, 16)
    res = {}

    def run(k):
        def f():
            res[k] = gen(models[k], w, h)
        return f

    print(f"  {w}x{h} ({n_tok} tokens), eager, fused head")
    t = interleave({k: run(k) for k in models}, R)
    # error vs bf16: velocity on a fixed input, tokens and decoded images on the same noise
    cfg = models["bf16"].config
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, cfg.token_dim, generator=g)
    c = torch.randn(4, cfg.hidden_size, generator=g)
    ref32 = ns.load_model(ck, dtype="float32")
    with torch.inference_mode():
        v32 = ref32.image_head.velocity(x, 0.5, c)
        vel = {k: m.image_head.velocity(x, 0.5, c.to(torch.bfloat16)) for k, m in models.items()}
        imgs = {k: ns.decode_latents(vae, r.latents) for k, r in res.items()}
    del ref32
    base = {}
    rows = []
    out = {"tokens": n_tok, "velocity_bf16_vs_fp32_rel_err": rel_err(vel["bf16"], v32)}
    print("  peak RSS probes (fresh subprocess each)")
    # the baseline: the same probe on the tiny checkpoint (<1 MB of weights): interpreter, torch, tokenizer, kernels
    base = run_child([os.path.abspath(__file__), CHILD_GEN, tiny, str(w), str(h)])
    print(f"    baseline (same probe, tiny checkpoint): VmHWM {mb(base['vmhwm']):.0f} MB")
    for k in models:
        child = run_child([os.path.abspath(__file__), CHILD_GEN, files[k], str(w), str(h)])
        print(f"    {k}: VmHWM {mb(child['vmhwm']):.0f} MB (after load {mb(child['vmhwm_load']):.0f} MB)")
        out[k] = {"gen_s": summary(t[k]), "tok_s": n_tok / med(t[k]), "weights": weight_bytes(models[k]),
                  "decoder_weights": weight_bytes(models[k], "layers."), "kernels": kernels(models[k]),
                  "file_bytes": os.path.getsize(files[k]), "vmhwm": child["vmhwm"], "vmhwm_load": child["vmhwm_load"],
                  "vmhwm_minus_interp": child["vmhwm"] - base["vmhwm"],
                  "velocity_rel_err_vs_bf16": rel_err(vel[k], vel["bf16"]),
                  "velocity_rel_err_vs_fp32": rel_err(vel[k], v32),
                  "tokens_rel_err_vs_bf16": rel_err(res[k].tokens, res["bf16"].tokens),
                  "image_rel_err_vs_bf16": rel_err(imgs[k], imgs["bf16"]),
                  "image_psnr_vs_bf16_db": psnr(imgs[k], imgs["bf16"])}
    out["interp_vmhwm"] = base["vmhwm"]
    b = out["bf16"]
    for k in models:
        o = out[k]
        o["speed_vs_bf16"] = o["tok_s"] / b["tok_s"]
        o["weights_vs_bf16"] = o["weights"] / b["weights"]
        o["decoder_weights_vs_bf16"] = o["decoder_weights"] / b["decoder_weights"]
        o["vmhwm_vs_bf16"] = o["vmhwm"] / b["vmhwm"]
        o["vmhwm_minus_interp_vs_bf16"] = o["vmhwm_minus_interp"] / b["vmhwm_minus_interp"]
        rows.append([k, o["tok_s"], o["speed_vs_bf16"], mb(o["weights"]), o["weights_vs_bf16"],
                     o["decoder_weights_vs_bf16"], mb(o["vmhwm"]), o["vmhwm_vs_bf16"], o["vmhwm_minus_interp_vs_bf16"],
                     o["velocity_rel_err_vs_bf16"], o["tokens_rel_err_vs_bf16"], o["image_rel_err_vs_bf16"],
                     o["image_psnr_vs_bf16_db"]])
    print(table(rows, ["weights", "tok/s", "speed/bf16", "weights MB", "w/bf16", "decoder w/bf16", "peak RSS MB",
                       "RSS/bf16", "(RSS-base)/bf16", "vel err", "token err", "image err", "PSNR dB"]))
    for k in models:
        print(f"  {k}: layers by kernel {out[k]['kernels']}")
    print(f"  for scale: bf16 vs fp32 velocity rel err {fmt(out['velocity_bf16_vs_fp32_rel_err'])}")
    models = None
    return out


CONVERT_CHILD = r"""
import json, runpy, sys
sys.argv = ["nextstep_core", "convert", SRC, DST, "--dtype", "bf16"]
try:
    runpy.run_module("nextstep_core", run_name="__main__", alter_sys=True)
except SystemExit as e:
    if e.code not in (0, None):
        raise
def f(name):
    for line in open("/proc/self/status"):
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
print(json.dumps({"vmhwm": f("VmHWM")}))
"""
IMPORT_CHILD = r"""
import json
import nextstep_core.frontend.cli, nextstep_core.weights.convert
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(json.dumps({"vmhwm": int(line.split()[1]) * 1024}))
"""


def bench_convert(a, ck, cache):
    from safetensors import safe_open

    fp32 = bf16_all = bf16_gen = 0
    for f in sorted(os.listdir(ck)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(ck, f), "pt") as s:
                for k in s.keys():
                    n = 1
                    for d in s.get_slice(k).get_shape():
                        n *= d
                    fp32 += 4 * n
                    bf16_all += 2 * n
                    bf16_gen += 0 if k.startswith("lm_head.") else 2 * n
    dst = os.path.join(cache, "convert-probe-bf16.safetensors")
    code = CONVERT_CHILD.replace("SRC", repr(ck)).replace("DST", repr(dst))
    t0 = now()
    child = run_child(["-c", code])
    secs = now() - t0
    base = run_child(["-c", IMPORT_CHILD])
    out_bytes = os.path.getsize(dst)
    os.remove(dst)
    goal = 1.1 * bf16_all + 300e6
    out = {"fp32_bytes": fp32, "bf16_bytes": bf16_all, "bf16_bytes_without_lm_head": bf16_gen,
           "output_bytes": out_bytes, "vmhwm": child["vmhwm"], "interp_vmhwm": base["vmhwm"], "seconds": secs,
           "goal_bytes": goal, "vmhwm_over_goal": child["vmhwm"] / goal,
           "vmhwm_over_bf16": child["vmhwm"] / bf16_all,
           "vmhwm_minus_interp_over_bf16": (child["vmhwm"] - base["vmhwm"]) / bf16_all}
    print(table([["fp32 shards in", mb(fp32)], ["bf16 weight bytes", mb(bf16_all)], ["output file", mb(out_bytes)],
                 ["goal 1.1x bf16 + 300 MB", mb(goal)], ["converter peak RSS (VmHWM)", mb(child["vmhwm"])],
                 ["  of which interpreter + imports", mb(base["vmhwm"])]], ["converter, medium", "MB"]))
    print(f"  peak RSS / goal = {fmt(out['vmhwm_over_goal'])}; (peak - interpreter) / bf16 bytes = "
          f"{fmt(out['vmhwm_minus_interp_over_bf16'])}; {secs:.1f} s")
    return out


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == CHILD_GEN:
    child_gen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
