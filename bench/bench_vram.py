"""What the real model keeps on the device, per weight format: bytes of every component, measured on the CPU.

    python bench/bench_vram.py [--json out.json]

A random checkpoint with one decoder layer at the real widths (5120 / 40 + 8 heads / 13824, the 12-block head of
1536) is written to /dev/shm and loaded through the real loader (merged projections, quantisation, kernels chosen
and weights packed for the CPU) in bf16, fp8, int8 and int4. The bytes each part holds are counted from its tensors
(parameters and buffers, as allocated), the decoder layer times 48. The token-embedding table stays on the host
(`NextStep.HOST_MODULES`) and is listed apart. What a generation adds is computed, not measured: the KV cache exactly
(`KVCache.bytes_per_token`), activations and results by `memory.generation_bytes` (an upper estimate). A GPU's
packed int4 layout holds the same bytes as the CPU's; its allocator rounds up and the CUDA context (about 0.5 GB) is
not counted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import dump_json  # noqa: E402  (it also puts the repository on sys.path)

LAYERS = 48
GB = 1e9


def tensor_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
               if not getattr(t, "is_mkldnn", False)) + sum(
        t.to_dense().numel() * t.element_size() for t in module.parameters() if getattr(t, "is_mkldnn", False))


def measure(path: str, fmt: str) -> dict:
    import nextstep_core as ns

    m = ns.load_model(path, dtype="bfloat16", quantize=None if fmt == "bf16" else fmt)
    layer = tensor_bytes(m.layers[0])
    parts = {"decoder": LAYERS * layer, "head": tensor_bytes(m.image_head),
             "projectors and norm": tensor_bytes(m.image_in_projector) + tensor_bytes(m.image_out_projector)
             + tensor_bytes(m.norm)}
    return {"one decoder layer": layer, **parts, "on device": sum(parts.values()),
            "embedding table (host)": tensor_bytes(m.embed_tokens)}


def per_image(cfg, images: int) -> dict:
    from nextstep_core.generation.memory import generation_bytes

    rows = 2 * images  # text guidance: a conditional and an unconditional row per image
    return generation_bytes(cfg, torch.bfloat16, rows, 64, 1024, 50, images)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    a = p.parse_args(argv)
    from nextstep_core.weights.config import ModelConfig
    from nextstep_core.weights.testing import make_tiny_checkpoint

    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    folder = tempfile.mkdtemp(prefix="nextstep-vram-", dir=base)
    out = {}
    try:
        path = make_tiny_checkpoint(os.path.join(folder, "NextStep-1-Large-vram"), size="full", with_vae=False,
                                    with_lm_head=False, num_hidden_layers=1, vocab_size=152064)
        for fmt in ("bf16", "fp8", "int8", "int4"):
            out[fmt] = measure(path, fmt)
            print(fmt, {k: round(v / GB, 3) for k, v in out[fmt].items()}, flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    cfg = ModelConfig(head_dim=128)
    out["generation"] = {n: per_image(cfg, n) for n in (1, 4)}
    print("\n| weights | on the device | + 512x512, 1 image | + 4 images | host (embedding) |")
    print("|---|---|---|---|---|")
    for fmt in ("bf16", "fp8", "int8", "int4"):
        w = out[fmt]["on device"]
        one, four = (w + sum(out["generation"][n].values()) for n in (1, 4))
        print(f"| {fmt} | {w / GB:.1f} GB | {one / GB:.1f} GB | {four / GB:.1f} GB | "
              f"{out[fmt]['embedding table (host)'] / GB:.2f} GB |")
    print("\ngeneration (estimate):", {n: {k: round(v / GB, 2) for k, v in g.items()} for n, g in
                                       out["generation"].items()})
    if a.json:
        dump_json(a.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
