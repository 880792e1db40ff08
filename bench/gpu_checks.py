"""Correctness checks of the GPU benchmark (bench_gpu.py) that time nothing: which attention kernel the decode step
gets, and whether the captured step computes what the eager loop computes over a whole image in float32."""
from __future__ import annotations

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

    from nextstep_core.model.decoder import attention

    cfg = model.config
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype = model.dtype
    q = torch.randn(rows, hq, 1, d, device=dev, dtype=dtype)
    k, v = (torch.randn(rows, hkv, slots, d, device=dev, dtype=dtype) for _ in range(2))
    mask = torch.zeros(rows, 1, 1, slots, device=dev, dtype=dtype)
    mask[..., slots // 2:] = float("-inf")
    out = {"torch": torch.__version__,
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
    out["enable_gqa_choice"] = choice(q, k, v, attn_mask=mask, enable_gqa=True)
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        attention(q, k, v, mask, "sdpa")
        sync(dev)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attention(q, k, v, mask, "sdpa")
            sync(dev)
        out["folded_group_kernels"] = [e.key for e in prof.key_averages()][:8]
    ref = F.scaled_dot_product_attention(q.float(), k.repeat_interleave(hq // hkv, 1).float(),
                                         v.repeat_interleave(hq // hkv, 1).float(), attn_mask=mask.float())
    out["folded_vs_fp32_repeat_max_abs"] = float((attention(q, k, v, mask, "sdpa").float() - ref).abs().max())
    return out


def fp32_graph_vs_eager(model, dev, graph_mode: str, size: int = 256) -> dict:
    """Every token of a 256x256 image, eager vs the captured step, in float32 (bf16 -> fp32 -> bf16 is exact)."""
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
        if graph_mode == "graph" and g.path != "graph":
            raise RuntimeError(f"the CUDA graph did not capture (ran {g.path!r}): "
                               f"{model.step_cache.step.capture_error}")
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
