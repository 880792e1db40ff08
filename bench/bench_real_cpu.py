"""CPU estimate of one image token at the real NextStep-1 geometry: bf16 vs int8 vs int4 weights (issue 10).

    OMP_NUM_THREADS=1 python bench/bench_real_cpu.py             # 9 interleaved rounds, about 2 minutes
    python bench/bench_real_cpu.py --rounds 2                      # smoke run

The real model (28 GB in bf16) is too big for this machine's benchmark budget, so a token is built from its parts,
each one timed at full size with random weights:
- one decoder layer's projections laid out as the loader lays them out (q/k/v and gate/up merged; bf16 packed for
  the CPU, int8 / int4 on their packed kernels), at 2 rows (one image, cfg), times 48;
- the real head (12 blocks of 1536) sampling one token, 50 steps, 2 guidance rows (`sample_token`, fused loop), with
  its residual blocks quantised as each format's file stores them (int8: yes; int4: no, the head stays bf16).
Attention over the KV cache, norms and RoPE are left out: they read no weights, and the weights are what a CPU
decode step waits for. The printed ratios are this sum's; the medium checkpoint's whole-generation ratios are in
`bench_cpu.py --only quant`.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import quant_layer  # noqa: E402
from common import dump_json, env_info, interleave, med, table  # noqa: E402

LAYERS = 48
HIDDEN, KV, MLP = 5120, 1024, 13824  # hidden, k/v width (8 heads x 128), MLP width
# (name, in, out, bias) as the file stores them, and how bf16 merges them at load
SEPARATE = [("q", HIDDEN, HIDDEN, True), ("k", HIDDEN, KV, True), ("v", HIDDEN, KV, True), ("o", HIDDEN, HIDDEN, False),
            ("gate", HIDDEN, MLP, False), ("up", HIDDEN, MLP, False), ("down", MLP, HIDDEN, False)]
MERGED = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}
FORMATS = ("bf16", "int8", "int4")


def decoder_layer(fmt: str, weights: dict):
    """The projections of one decoder layer as `fmt` loads them: q/k/v and gate/up merged (quantised ones too,
    before packing), dense bf16 packed for the CPU -> [(name, layer)], each called on [2, in] inputs."""
    import torch
    from torch import nn

    from nextstep_core.weights.cpu_pack import pack_linears

    layers = []
    for name, parts in [*MERGED.items(), ("o", ("o",)), ("down", ("down",))]:
        w = torch.cat([weights[p][0] for p in parts])
        if fmt != "bf16":  # every format scales per row, so the merged layer quantises as its parts would
            layers.append((name, quant_layer(w, fmt, torch.bfloat16)))
            continue
        b = torch.cat([weights[p][1] for p in parts]) if weights[parts[0]][1] is not None else None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        lin.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        layers.append((name, lin))
    pack_linears(nn.ModuleList(lin for _, lin in layers))
    return layers


def head_for(fmt: str, state: dict):
    """The real-size head with `state`'s weights, its residual blocks quantised as a `fmt` file stores them."""
    import torch
    from torch import nn

    from nextstep_core.weights.cpu_pack import pack_linears
    from nextstep_core.model.head import FlowMatchingHead
    from nextstep_core.weights.quant import prepare_quantized, quantized_operations, quantized_tensors

    ops = quantized_operations(fmt) if fmt != "bf16" else nn
    with torch.device("meta"):
        head = FlowMatchingHead(64, HIDDEN, 1536, 12, 1.0, ops)
    for key, t in state.items():
        module_name, attr = key.rsplit(".", 1)
        module = head.get_submodule(module_name)
        parts = quantized_tensors("image_head." + key, t, fmt) if fmt != "bf16" and attr == "weight" else None
        for k, v in parts or [(key, t)]:
            name = k.rsplit(".", 1)[-1]
            setattr(module, name, nn.Parameter(v, requires_grad=False) if name in ("weight", "bias") else v)
    if fmt != "bf16":
        prepare_quantized(head, torch.bfloat16)
    pack_linears(head)
    return head.requires_grad_(False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--json")
    a = p.parse_args(argv)

    import torch

    import nextstep_core as ns
    from nextstep_core.model.family import NEXTSTEP_1
    from nextstep_core.model.head import FlowMatchingHead
    from nextstep_core.generation.sampling import Guidance, HeadPlan, sample_token

    torch.manual_seed(0)
    weights = {name: (torch.randn(o, i, dtype=torch.bfloat16) / i**0.5,
                      torch.randn(o, dtype=torch.bfloat16) * 0.02 if bias else None) for name, i, o, bias in SEPARATE}
    layers = {fmt: decoder_layer(fmt, weights) for fmt in FORMATS}
    weights = None
    state = {k: v.to(torch.bfloat16) for k, v in FlowMatchingHead(64, HIDDEN, 1536, 12, 1.0, torch.nn).state_dict()
             .items()}
    heads = {fmt: head_for(fmt, state) for fmt in FORMATS}
    state = None
    x_in = {i: torch.randn(2, i, dtype=torch.bfloat16) for i in (HIDDEN, MLP)}
    g = torch.Generator().manual_seed(1)
    c = torch.randn(2, HIDDEN, generator=g).to(torch.bfloat16)
    settings = ns.family_defaults("nextstep-1").replace(steps=50)
    guide = Guidance(2, 7.5, 1.0)

    def layer_step(fmt):
        def run():
            with torch.inference_mode():
                for _ in range(3):
                    for _, lin in layers[fmt]:
                        lin(x_in[lin.in_features])
        return run

    def head_token(fmt):
        def run():
            with torch.inference_mode():
                sample_token(heads[fmt], c, noise, plans[fmt], guide)
        return run

    with torch.inference_mode():
        plans = {fmt: HeadPlan.build(heads[fmt], NEXTSTEP_1, 50, settings, torch.device("cpu"), torch.bfloat16)
                 for fmt in FORMATS}
    noise = torch.randn(plans["bf16"].draws, 1, 64, generator=g)
    for fmt in FORMATS:  # warm-up
        layer_step(fmt)()
        head_token(fmt)()
    print(f"# real-geometry token estimate, {env_info()['date']}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    t_layer = interleave({f"layer x3 {fmt}": layer_step(fmt) for fmt in FORMATS}, a.rounds)
    t_head = interleave({f"head {fmt}": head_token(fmt) for fmt in FORMATS}, a.rounds)
    out, rows = {"env": env_info(), "rounds": a.rounds}, []
    for fmt in FORMATS:
        layer = med(t_layer[f"layer x3 {fmt}"]) / 3
        head = med(t_head[f"head {fmt}"])
        out[fmt] = {"layer_s": layer, "decoder_s": LAYERS * layer, "head_s": head, "token_s": LAYERS * layer + head,
                    "kernels": sorted({getattr(lin, "kernel", "packed bf16") for _, lin in layers[fmt]})}
    base = out["bf16"]
    for fmt in FORMATS:
        o = out[fmt]
        o["decoder_speed_vs_bf16"] = base["decoder_s"] / o["decoder_s"]
        o["token_speed_vs_bf16"] = base["token_s"] / o["token_s"]
        rows.append([fmt, 1e3 * o["layer_s"], o["decoder_s"], o["head_s"], o["token_s"], o["decoder_speed_vs_bf16"],
                     o["token_speed_vs_bf16"], ", ".join(o["kernels"])])
    print(table(rows, ["weights", "1 layer ms", "48 layers s", "head s", "token s", "decoder speed/bf16",
                       "token speed/bf16", "decoder kernels"]))
    if a.json:
        dump_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
