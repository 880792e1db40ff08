"""Kernel-launching ops per image token at the real geometry (issue 10): a count, not a timing.

    python bench/bench_ops.py                        # real NextStep-1 geometry on the meta device, bf16
    python bench/bench_ops.py --repo /tmp/before     # the same count for another checkout (e.g. git main @7aa9e5f)
    python bench/bench_ops.py --json out.json
    python bench/bench_ops.py --quant                # also: ops per decoder layer with bf16 / int8 / int4 weights

Every ATen op the fixed-shape per-token step dispatches on the model's device is counted (`TorchDispatchMode`),
except views and allocations, which launch no kernel, and host-side work on CPU tensors (the time grid's scalars).
A function that is one fused kernel on a GPU — `F.rms_norm`, `F.layer_norm`, `F.scaled_dot_product_attention` —
counts once whatever it decomposes into on the CPU (`TorchFunctionMode`).
Tensors live on the meta device, so the 14B model at 48 layers costs no memory and no compute; the head has its
real 12 blocks of 1536. Splits: per head step (the difference between two step counts, so fixed per-token work is
not in it), per decoder layer (ops inside one layer's forward), and the per-token rest.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

FUSED_FUNCTIONS = ("rms_norm", "layer_norm", "scaled_dot_product_attention")
NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "_local_scalar_dense", "item",
             "set_", "resize_"}


def _on_device(args, kwargs) -> bool:
    from torch.utils._pytree import tree_leaves

    return any(isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_leaves((args, kwargs)))


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops that launch a kernel, under a label (`scope`), and the fused functions as one."""

    def __init__(self, cpu: bool = False):
        super().__init__()
        self.cpu = cpu  # count CPU tensors' ops too (a model run on the CPU for kernels meta tensors cannot run)
        self.counts = collections.Counter()
        self.by_op = collections.Counter()
        self.scope = "other"
        self.inside_fused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        counted = self.cpu or _on_device(args, kwargs)
        if not self.inside_fused and not func.is_view and name not in NO_KERNEL and counted:
            self.counts[self.scope] += 1
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))

    def count_fused(self, name):
        self.counts[self.scope] += 1
        self.by_op[name] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class FusedAsOne(TorchFunctionMode):
    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in FUSED_FUNCTIONS and not self.counter.inside_fused:
            self.counter.count_fused(name)
            self.counter.inside_fused += 1
            try:
                return func(*args, **(kwargs or {}))
            finally:
                self.counter.inside_fused -= 1
        return func(*args, **(kwargs or {}))


def count(fn, scopes=(), cpu: bool = False) -> OpCounter:
    """Run fn() and count its kernel-launching ops; `scopes` = [(module, label)] attribute ops to labels."""
    counter = OpCounter(cpu)
    hooks = []
    for module, label in scopes:
        def pre(_m, _a, label=label):
            counter.scope = label

        def post(_m, _a, _o):
            counter.scope = "other"
        hooks += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with FusedAsOne(counter), counter:
            fn()
    finally:
        for h in hooks:
            h.remove()
    return counter


def build(layers: int, dtype: torch.dtype, fuse: bool):
    from nextstep_core.weights.config import ModelConfig
    from nextstep_core.model.decoder import NextStep

    cfg = ModelConfig(head_dim=128, num_hidden_layers=layers)
    with torch.device("meta"):
        model = NextStep(cfg).to(dtype).eval().requires_grad_(False)
    if fuse and hasattr(model, "fuse_projections"):
        model.fuse_projections()
    return model


def settings_for(steps: int, loop: str):
    import dataclasses

    from nextstep_core.generation.settings import SamplerSettings

    fields = {f.name for f in dataclasses.fields(SamplerSettings)}
    s = SamplerSettings(steps=steps, cfg=7.5, sampler="euler_maruyama")
    if "head_loop" in fields:
        return s.replace(head_loop=loop)
    if loop == "fused":
        raise SystemExit("this checkout has no fused head loop")
    return s.replace(hoist=loop == "hoisted")


def per_token(model, steps: int, loop: str, branches: int, prompt_len: int = 64, total: int = 1024) -> OpCounter:
    """Ops of one token of the fixed-shape step (head loop + feed-back + one decoder step): `step.token_step` on the
    static buffers, which is what the plain loop runs too and what a CUDA graph captures."""
    from nextstep_core.generation.graph import FixedStep
    from nextstep_core.generation.plan import GenerationPlan
    from nextstep_core.model.family import family_of

    h = w = int(total ** 0.5)
    plan = GenerationPlan(settings_for(steps, loop).validate(), family_of(model.config), h, w, branches, prompt_len, 1)
    with torch.inference_mode():
        step = FixedStep(model, plan, capture=False)
        spec = step._spec(0)
        step._static_token(spec)  # builds what is built once (tables); not counted
        scopes = [(layer, "decoder layer") for layer in model.layers] + [(model.image_head, "head")]
        return count(lambda: step._static_token(spec), scopes)


def measure(layers: int, dtype, loop: str, fuse: bool, branches: int) -> dict:
    model = build(layers, dtype, fuse)
    lo, hi = per_token(model, 10, loop, branches), per_token(model, 50, loop, branches)
    per_step = (hi.total - lo.total) / 40
    per_layer = hi.counts["decoder layer"] / layers
    return {"per_token_50_steps": hi.total, "per_head_step": per_step,
            "rest_per_token": hi.total - 50 * per_step - hi.counts["decoder layer"],
            "per_decoder_layer": per_layer, "decoder_layers_per_token": hi.counts["decoder layer"],
            "top_ops_50_steps": dict(hi.by_op.most_common(12))}


def quant_layer_ops(fmts=("bf16", "int8", "int4")) -> dict:
    """Ops in one decoder layer of a decode step (one token, 2 rows) with each weight format, projections separate
    and merged. Quantised layers need real kernels, so this runs on the CPU, on a small checkpoint whose projections
    are whole int4 tiles (q 256, k / v 64, gate / up 256 rows); the ops are those a GPU launches, under the CPU's
    kernel names (`_weight_int4pack_mm_for_cpu` for `_weight_int4pack_mm`)."""
    import tempfile

    import nextstep_core as ns
    from nextstep_core.model.attention import decode_mask, prefill_mask
    from nextstep_core.model.decoder import NextStep
    from nextstep_core.weights.convert import convert
    from nextstep_core.weights.testing import make_tiny_checkpoint

    out, fuse = {}, NextStep.fuse_projections
    with tempfile.TemporaryDirectory() as d:
        ck = make_tiny_checkpoint(os.path.join(d, "ck"), with_vae=False, with_lm_head=False, hidden_size=256,
                                  intermediate_size=256, head_dim=64, num_key_value_heads=1)
        for fmt in fmts:
            path = convert(ck, os.path.join(d, f"{fmt}.safetensors"), fmt)
            for merged in (False, True):
                NextStep.fuse_projections = fuse if merged else (lambda self: 0)
                try:
                    model = ns.load_model(path, dtype="bfloat16")
                finally:
                    NextStep.fuse_projections = fuse
                model.setup_caches(2, 16)
                real = torch.ones(2, 8, dtype=torch.bool)
                one = torch.tensor([8])
                mask = decode_mask(torch.zeros(2, dtype=torch.long), one, 9, torch.bfloat16, model.group)
                with torch.inference_mode():  # a prompt to attend to, then one decode step
                    model(torch.randn(2, 8, 256).bfloat16(), torch.arange(8), prefill_mask(real, torch.bfloat16), 8)
                    c = count(lambda: model(torch.randn(2, 1, 256).bfloat16(), one, mask, 9),
                              [(model.layers[0], "layer")], cpu=True)
                out[f"{fmt}/{'merged' if merged else 'separate'}"] = c.counts["layer"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", help="import nextstep_core from this checkout instead of this one")
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quant", action="store_true", help="also count a decoder layer with int8 / int4 weights (CPU)")
    p.add_argument("--json")
    a = p.parse_args(argv)
    repo = a.repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.abspath(repo))
    import nextstep_core

    dtype = getattr(torch, a.dtype)
    root = os.path.dirname(nextstep_core.__file__)
    settings = next(p for p in (os.path.join(root, "generation", "settings.py"), os.path.join(root, "settings.py"))
                    if os.path.isfile(p))
    has_fused = "head_loop" in open(settings).read()
    loops = ("plain", "hoisted", "fused") if has_fused else ("plain", "hoisted")
    print(f"# ops per image token, {a.layers} decoder layers, {a.dtype}, 50 head steps, from {nextstep_core.__file__}")
    print(f"{'head loop':<9} {'decoder':<10} {'rows':>4} {'per token':>10} {'per step':>9} {'per layer':>10} "
          f"{'rest':>10}")
    out = {}
    for loop in loops:
        for fuse in ((False, True) if has_fused else (False,)):
            for branches in (2, 3):
                r = measure(a.layers, dtype, loop, fuse, branches)
                out[f"{loop}/{'merged' if fuse else 'separate'}/{branches}"] = r
                print(f"{loop:<9} {'merged' if fuse else 'separate':<10} {branches:>4} {r['per_token_50_steps']:>10} "
                      f"{r['per_head_step']:>9.1f} {r['per_decoder_layer']:>10.1f} {r['rest_per_token']:>10.1f}")
    default = out.get("fused/merged/2") or out["hoisted/separate/2"]
    print("\ndefault path, 2 rows, most frequent ops:", json.dumps(default["top_ops_50_steps"]))
    if a.quant:
        out["quant_layer_ops"] = q = quant_layer_ops()
        print("\nops per decoder layer, decode step, by weight format (CPU, small checkpoint):")
        for fmt in ("bf16", "int8", "int4"):
            print(f"  {fmt:<5} separate {q[fmt + '/separate']:>3}  merged {q[fmt + '/merged']:>3}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
