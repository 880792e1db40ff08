"""Checks of the GPU benchmark (bench_gpu.py) beside its per-image timings: which attention kernel the decode step
gets, whether the captured step computes what the eager loop computes over a whole image in float32, how one
token's time splits between the head and the decoder, what capturing a new shape costs, and one linear of each real
shape in every weight format."""
from __future__ import annotations

import os
import time

from common import rel_err


def sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sdpa_info(model, dev, rows: int = 2, slots: int = 1152) -> dict:
    """Which SDPA kernel the decode step's attention gets: one query token per row, the K/V group folded into the
    query rows ([B, Hkv, group, D] against [B, Hkv, L, D], additive mask [B, 1, 1, L]), and for comparison the
    unfolded grouped call ([B, Hq, 1, D] with enable_gqa). Also the kernels the profiler saw and the cuDNN version."""
    import torch
    import torch.nn.functional as F

    from nextstep_core.model.attention import attention, backend_names

    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype = model.dtype
    q = torch.randn(rows, hq, 1, d, device=dev, dtype=dtype)
    k, v = (torch.randn(rows, hkv, slots, d, device=dev, dtype=dtype) for _ in range(2))
    mask = torch.zeros(rows, 1, hq // hkv, slots, device=dev, dtype=dtype)  # as decode_mask builds it
    mask[..., slots // 2:] = float("-inf")
    out = {"torch": torch.__version__, "probed_backends": backend_names(dev, dtype, d),
           "cudnn_version": torch.backends.cudnn.version() if dev.type == "cuda" else None}

    def choice(*args, **kw):
        try:
            c = int(torch._fused_sdp_choice(*args, **kw))
            from torch.nn.attention import SDPBackend

            names = {int(b): n for n, b in SDPBackend.__members__.items()}
            return names.get(c, str(c))
        except Exception as e:  # noqa: BLE001 - private API: report, do not fail
            return f"unknown ({type(e).__name__})"

    out["folded_group_choice"] = choice(q.reshape(rows, hkv, hq // hkv, d), k, v, attn_mask=mask)
    out["enable_gqa_choice"] = choice(q, k, v, attn_mask=mask[:, :, :1], enable_gqa=True)
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        attention(q, k, v, mask, "sdpa")
        sync(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attention(q, k, v, mask, "sdpa")
            sync(dev)
        out["folded_group_kernels"] = [e.key for e in prof.key_averages()][:8]
    ref = F.scaled_dot_product_attention(q.float(), k.repeat_interleave(hq // hkv, 1).float(),
                                         v.repeat_interleave(hq // hkv, 1).float(), attn_mask=mask[:, :, :1].float())
    out["folded_vs_fp32_repeat_max_abs"] = float((attention(q, k, v, mask, "sdpa").float() - ref).abs().max())
    return out


def fp32_graph_vs_eager(model, dev, graph_mode: str, size: int = 128) -> dict:
    """Every token of a size x size image, eager vs the captured step, in float32 (bf16 -> fp32 -> bf16 is exact)."""
    import torch

    import nextstep_core as ns

    positive, negative = ns.default_prompts(model.config.family)
    cond = ns.Conditioning(["a red fox in the snow, film grained"], positive_prompt=positive, negative_prompt=negative)
    base = ns.SamplerSettings(width=size, height=size, cfg=7.5, steps=50, seed=42, noise="independent")
    model.float()
    try:
        t0 = time.perf_counter()
        e = ns.sample(model, cond, base.replace(fast="eager"))
        t1 = time.perf_counter()
        g = ns.sample(model, cond, base.replace(fast=graph_mode))
        t2 = time.perf_counter()
        if g.path != graph_mode:
            raise RuntimeError(f"the {graph_mode} step did not run (ran {g.path!r}): {g.fallback}")
        diff = (g.tokens - e.tokens).abs()
        per_token = diff.amax(dim=(0, 2))
        return {"tokens": int(e.tokens.shape[1]), "path": g.path, "max_abs": float(diff.max()),
                "rel_err_all": rel_err(g.tokens, e.tokens), "worst_token": int(per_token.argmax()),
                "max_abs_last_token": float(per_token[-1]), "eager_s": t1 - t0, "graph_s": t2 - t1,
                "bound_note": "CPU tests hold the fixed-shape path to atol 1e-4 in float32"}
    finally:
        model.release_step_cache()
        model.to(torch.bfloat16)
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def head_vs_decoder(model, dev, reps: int = 10, slots: int = 1152) -> dict:
    """One image token's two halves at the real shapes (2 guidance rows, 50 head steps, a cache of `slots` slots
    half full): the head's sampling loop and the decoder step, each eager and replayed as a CUDA graph (CUDA only),
    through the engine's own `step.sample_image_token` and `step.feed_back`."""
    import torch

    import nextstep_core as ns
    from nextstep_core.generation.plan import GenerationPlan
    from nextstep_core.generation.step import Slot, TokenInputs, feed_back, sample_image_token
    from nextstep_core.model.attention import decode_mask
    from nextstep_core.model.family import family_of

    cfg = model.config
    s = ns.family_defaults(cfg.family).replace(steps=50, cfg=7.5).with_family(cfg.family)
    plan = GenerationPlan(s, family_of(cfg), 32, 32, 2, 64, 1)
    spec = plan.token_spec(model, 0)
    x = TokenInputs(torch.randn(2, cfg.hidden_size, device=dev, dtype=model.dtype),
                    torch.randn(plan.draws, 1, cfg.token_dim, device=dev), 7.5, 1.0, None)
    model.setup_caches(2, slots)
    pos = torch.tensor([slots // 2], device=dev)
    at = Slot(pos, decode_mask(torch.zeros(2, dtype=torch.long, device=dev), pos, slots, model.dtype, model.group),
              slots)
    tok = sample_image_token(model, spec, x)
    parts = {"head": lambda: sample_image_token(model, spec, x), "decoder": lambda: feed_back(model, spec, tok, at)}
    out = {}
    with torch.inference_mode():
        for name, fn in parts.items():
            out[f"{name}_eager_ms"] = 1e3 * time_call(fn, dev, reps)
            if dev.type == "cuda":
                out[f"{name}_graph_ms"] = 1e3 * time_call(_graphed(fn), dev, reps)
    model.install_caches(None)
    return out


def recapture(model, dev, sample_once) -> dict:
    """Seconds to the first token for a shape seen before (kept step) and a new one (prefill, capture, self-check):
    `sample_once(width)` runs a generation stopped after its first token and returns its first-token seconds."""
    model.release_step_cache()
    new = sample_once(512)
    kept = sample_once(512)
    return {"first_token_new_shape_s": new, "first_token_kept_shape_s": kept, "recapture_s": new - kept}


def _graphed(fn):
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def time_call(fn, dev, reps: int, warm: int = 2) -> float:
    """Seconds per call of `fn` on `dev`, after `warm` calls, synchronised at both ends."""
    for _ in range(warm):
        fn()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(dev)
    return (time.perf_counter() - t0) / reps


def quant_layer(w, fmt: str, dtype):
    """A QuantLinear holding `w` quantised as `fmt`, prepared (kernel chosen, packed) for w's device."""
    from torch import nn

    from nextstep_core.weights.quant import make_quant_linear, quantized_tensors

    layer = make_quant_linear(nn.Linear)(w.shape[1], w.shape[0], bias=False, device="meta")
    for k, t in quantized_tensors("layers.0.mlp.up_proj.weight", w, fmt):
        attr = k.rsplit(".", 1)[-1]
        setattr(layer, attr, nn.Parameter(t, requires_grad=False) if attr == "weight" else t)
    layer.prepare(dtype)
    return layer.requires_grad_(False)


SHAPES = {"head_1536x1536": (1536, 1536), "decoder_5120_to_13824": (13824, 5120),
          "decoder_13824_to_5120": (5120, 13824)}  # [out, in] of the real model's linears


def kernel_bench(dev, dtype, reps: int = 50):
    """One linear of each real shape at 2 rows (a decode step with guidance): bf16, and the engine's int8, int4 and
    fp8 layers as `prepare` picks their kernels here (fp8 also with the tensor-core path forced on)."""
    import torch
    import torch.nn.functional as F

    out = {}

    def t(f):
        return time_call(f, dev, reps, warm=3)

    for shape_name, (n_out, n_in) in SHAPES.items():
        w = torch.randn(n_out, n_in, device=dev, dtype=dtype) / n_in**0.5
        x = torch.randn(2, n_in, device=dev, dtype=dtype)
        row = {"bf16_us": 1e6 * t(lambda: F.linear(x, w))}
        row["bf16_GBps"] = w.numel() * 2 / row["bf16_us"] / 1e3
        for fmt in ("int8", "int4", "fp8"):
            for native in ((False, True) if fmt == "fp8" else (False,)):
                name = fmt + ("_scaled_mm" if native else "")
                try:
                    os.environ["NEXTSTEP_FP8_MATMUL"] = "1" if native else "0"
                    layer = quant_layer(w, fmt, dtype)
                    row[name + "_kernel"] = layer.kernel
                    row[name + "_us"] = 1e6 * t(lambda: layer(x))
                except Exception as e:  # noqa: BLE001 - a kernel this device lacks is a finding
                    row[name + "_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                finally:
                    os.environ.pop("NEXTSTEP_FP8_MATMUL", None)
        out[shape_name] = row
    return out
