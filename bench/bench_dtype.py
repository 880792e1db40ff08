"""bf16 against float32 on this machine's CPU, side by side: the measurements behind `devices.auto_dtype`.

    python bench/bench_dtype.py                 # about 3 minutes on a busy 2-core VM
    python bench/bench_dtype.py --rounds 2 --demo-rounds 1   # smoke run
    python bench/bench_dtype.py --parts layer,head,demo       # without the VAE (the real one takes minutes in bf16)

Four parts, each timed in bf16 and in float32, interleaved round by round (medians):
1. the decoder projections of one layer at the real NextStep-1 geometry, merged and laid out as the loader lays
   them out (`cpu_pack`), on the 2 rows of a decode step with guidance;
2. the real head's layer shapes (12 blocks of 1536, 2 rows) for one head step;
3. the VAE decoding an image, 128x128 with the tiny demo's VAE and 64x64 with the real VAE's geometry (random
   weights; bf16 convolutions are so slow without bf16 instructions that a bigger image takes minutes);
4. the whole tiny demo, `python -m nextstep_core generate --model tiny`, with --dtype bfloat16, float32 and auto.
It prints what the CPU offers (capability, AVX512-BF16, AMX), what `auto_dtype` picks, and bf16 / fp32 time ratios.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import REPO, dump_json, env_info, interleave, med, now, table  # noqa: E402

HIDDEN, KV, MLP, HEAD = 5120, 1024, 13824, 1536
# merged as the loader merges them: (name, in, out)
LAYER = [("qkv", HIDDEN, HIDDEN + 2 * KV), ("o", HIDDEN, HIDDEN), ("gate_up", HIDDEN, 2 * MLP), ("down", MLP, HIDDEN)]
HEAD_BLOCK = [("adaLN", HEAD, 3 * HEAD), ("mlp.0", HEAD, HEAD), ("mlp.2", HEAD, HEAD)]  # per residual block
DTYPES = ("bfloat16", "float32")
PARTS = ("layer", "head", "vae", "demo")


def linears(shapes, dtype):
    import torch
    from torch import nn

    from nextstep_core.weights.cpu_pack import pack_linears

    g = torch.Generator().manual_seed(0)
    layers = nn.ModuleList()
    for _, i, o in shapes:
        lin = nn.Linear(i, o, device="meta")
        lin.weight = nn.Parameter((torch.randn(o, i, generator=g) / i**0.5).to(dtype), requires_grad=False)
        lin.bias = nn.Parameter(torch.zeros(o, dtype=dtype), requires_grad=False)
        layers.append(lin)
    pack_linears(layers)
    return layers


def vae_decoder(geometry: dict, dtype):
    import torch

    from nextstep_core.model.vae import AutoEncoder
    from nextstep_core.weights.config import VAEConfig

    torch.manual_seed(0)
    return AutoEncoder(VAEConfig(**geometry)).to(dtype).eval().requires_grad_(False)


def demo(dtype: str) -> float:
    """Wall seconds of the tiny demo in a fresh process (import, load, generate, decode, write)."""
    out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"nextstep_bench_dtype_{dtype}.png")
    t0 = now()
    subprocess.run([sys.executable, "-m", "nextstep_core", "generate", "--model", "tiny", "--prompt", "anything",
                    "--dtype", dtype, "-o", out], cwd=REPO, check=True, capture_output=True)
    return now() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--demo-rounds", type=int, default=3)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    p.add_argument("--json")
    a = p.parse_args(argv)
    parts = set(a.parts.split(","))

    import torch

    from nextstep_core.frontend.devices import auto_dtype, cpu_has_native_bf16
    from nextstep_core.weights.testing import FULL_VAE, TINY_VAE

    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
           "avx512_bf16": getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: None)(),
           "amx": getattr(torch.cpu, "_is_amx_tile_supported", lambda: None)(), "auto": str(auto_dtype("cpu"))}
    print(f"# bf16 vs fp32 on the CPU, {env_info()['date']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); {cpu}")
    dt = {name: getattr(torch, name) for name in DTYPES}
    layer = {d: linears(LAYER, dt[d]) for d in DTYPES} if "layer" in parts else {}
    head = {d: linears(HEAD_BLOCK, dt[d]) for d in DTYPES} if "head" in parts else {}
    vaes = {(g, d): vae_decoder(geo, dt[d]) for g, geo in (("tiny", TINY_VAE), ("real", FULL_VAE)) for d in DTYPES} \
        if "vae" in parts else {}
    z = {"tiny": torch.randn(1, 16, 16, 16), "real": torch.randn(1, 16, 8, 8)}  # 128x128 and 64x64 pixels

    def run_layer(d):
        x = {i: torch.randn(2, i, dtype=dt[d]) for i in (HIDDEN, MLP)}
        return lambda: [lin(x[lin.in_features]) for lin in layer[d]]

    def run_head(d):
        x = torch.randn(2, HEAD, dtype=dt[d])
        return lambda: [lin(x) for _ in range(12) for lin in head[d]]  # 12 blocks, one step

    def run_vae(g, d):
        return lambda: vaes[(g, d)].decode(z[g].to(dt[d]))

    results = {}
    with torch.inference_mode():
        for key, part, make in (("layer", "decoder layer, 2 rows", run_layer), ("head", "head step, 2 rows", run_head)):
            if key in parts:
                fns = {d: make(d) for d in DTYPES}
                for f in fns.values():
                    f()  # warm-up
                results[part] = interleave(fns, a.rounds)
        for g, px in (("tiny", 128), ("real", 64)) if "vae" in parts else ():  # no warm-up: a bf16 call takes
            results[f"VAE decode {px}x{px}, {g} geometry"] = interleave(  # seconds to minutes without bf16 units
                {d: run_vae(g, d) for d in DTYPES}, max(2, a.rounds // 2))
    if "demo" in parts:
        results["tiny demo, whole command"] = interleave({d: (lambda d=d: demo(d)) for d in (*DTYPES, "auto")},
                                                         a.demo_rounds)
    rows, out = [], {"env": env_info(), "cpu": cpu, "rounds": a.rounds}
    for part, t in results.items():
        bf, fp = med(t["bfloat16"]), med(t["float32"])
        auto = med(t["auto"]) if "auto" in t else None
        rows.append([part, bf, fp, bf / fp, auto if auto is not None else "-"])
        out[part] = {k: med(v) for k, v in t.items()}
    print(table(rows, ["part", "bf16 s", "fp32 s", "bf16 time / fp32", "auto s"]))
    if a.json:
        dump_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
