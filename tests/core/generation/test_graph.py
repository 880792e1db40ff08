"""The fixed-shape per-token path (what CUDA graphs replay) runs the plain loop's step function, equals the plain loop
on the same noise, is kept per key, and checks itself on first use.

On the CPU the graph path runs with `FakeGraph` standing in for `torch.cuda.CUDAGraph`: capture warms the step up and
records the function, and a replay calls it again on the same static buffers, which is what a CUDA graph does.
"""
import logging
import threading

import pytest
import torch

import nextstep_core as ns
from nextstep_core import Conditioning, NextStepError, SamplerSettings, sample
from nextstep_core.generation import graph as G
from nextstep_core.generation import step as S

ARGS = dict(width=48, height=32, steps=5, images_per_prompt=2, seed=3, cfg=4.0)
COND = Conditioning(["a cat", "the dog on the mat"], negative_prompt="blurry")


class FakeGraph:
    """Replays the captured function on the CPU; `fault(step)` runs after each replay (a wrong graph), `raises`
    makes every replay fail (a broken one)."""
    made = []

    def __init__(self, fn, fault=None, raises=None):
        self.fn, self.fault, self.raises = fn, fault, raises
        FakeGraph.made.append(self)

    def replay(self):
        if self.raises:
            raise RuntimeError(self.raises)
        self.fn()
        if self.fault:
            self.fault()


@pytest.fixture
def fake_cuda_graphs(monkeypatch):
    """The graph path on the CPU: `_capture` warms up, restores and records as the real one does."""
    FakeGraph.made = []
    options = {}

    def capture(fn, restore, pool):
        for _ in range(G.WARMUP_STEPS):
            fn()
        restore()
        if options.get("capture_raises"):
            raise RuntimeError(options["capture_raises"])
        fn()  # recording runs the Python function once (a real capture records its kernels instead of running them)
        return FakeGraph(fn, options.get("fault"), options.get("raises")), "pool"

    monkeypatch.setattr(G, "_capture", capture)
    monkeypatch.setattr(G, "graphs_available", lambda device: True)
    return options


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(cfg_schedule="linear", use_norm=False),
    dict(sampler="flow_sde", cfg=1.0),
    dict(sampler="euler", noise="reference"),
    dict(steps=6, steps_end=2),
])
@pytest.mark.parametrize("fast", ["static", "graph"])
def test_the_fixed_path_equals_the_plain_loop(tiny_model, fake_cuda_graphs, kwargs, fast):
    tiny_model.release_step_cache()
    args = {**ARGS, **kwargs}
    a = sample(tiny_model, COND, SamplerSettings(fast="eager", **args))
    b = sample(tiny_model, COND, SamplerSettings(fast=fast, **args))
    assert b.path == fast and b.fallback is None
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)


def test_the_plain_and_the_captured_paths_run_the_same_step_function(tiny_model, fake_cuda_graphs, monkeypatch):
    calls = []
    real = S.decode_one_token
    monkeypatch.setattr(S, "decode_one_token", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = SamplerSettings(width=32, height=32, steps=2, cfg=2.0)  # 4 tokens
    sample(tiny_model, Conditioning(["a"]), settings.replace(fast="eager"))
    assert len(calls) == 3  # every token but the last, which is never fed back
    calls.clear()
    tiny_model.release_step_cache()
    res = sample(tiny_model, Conditioning(["a"]), settings.replace(fast="graph"))
    assert res.path == "graph" and len(FakeGraph.made) == 1
    # capture: 2 warm-up runs and the recording; the first token also once on the plain step (the self-check); then
    # one replay of the captured function per token
    assert len(calls) == 3 + 1 + 4


def test_prompts_of_other_lengths_replay_the_step_already_captured(tiny_model, fake_cuda_graphs):
    tiny_model.release_step_cache()
    settings = SamplerSettings(width=48, height=32, steps=3, cfg=3.0, fast="graph")
    short, long = Conditioning(["a"]), Conditioning(["the cat on the mat with a hat"], negative_prompt="blurry")
    a = sample(tiny_model, short, settings)
    kept = tiny_model.step_cache.step
    b = sample(tiny_model, long, settings.replace(seed=5, cfg_schedule="linear"))
    assert tiny_model.step_cache.step is kept and len(FakeGraph.made) == 1  # one capture for both prompts
    eager = sample(tiny_model, long, settings.replace(seed=5, cfg_schedule="linear", fast="eager"))
    assert a.path == b.path == "graph" and torch.allclose(b.tokens, eager.tokens, atol=1e-4)


def test_step_annealing_runs_on_the_graph_path_one_capture_per_step_count(tiny_model, fake_cuda_graphs):
    tiny_model.release_step_cache()
    settings = SamplerSettings(width=64, height=32, steps=6, steps_end=3, seed=4, cfg=2.0)  # 8 tokens
    res = sample(tiny_model, Conditioning(["a"]), settings.replace(fast="graph"))
    assert res.path == "graph"
    assert sorted(tiny_model.step_cache.step.graphs) == [3, 4, 5, 6] and len(FakeGraph.made) == 4
    eager = sample(tiny_model, Conditioning(["a"]), settings.replace(fast="eager"))
    assert torch.allclose(res.tokens, eager.tokens, atol=1e-4)


def test_auto_takes_the_graph_path_where_graphs_exist_annealing_included(tiny_model, fake_cuda_graphs):
    res = sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=32, height=32, steps=4, steps_end=2))
    assert res.path == "graph"


@pytest.mark.parametrize("fault", ["wrong", "raises", "capture"])
def test_a_wrong_or_failing_graph_falls_back_to_the_plain_step_with_one_warning(tiny_model, fake_cuda_graphs, caplog,
                                                                               fault):
    tiny_model.release_step_cache()
    tiny_model.broken_steps.clear()
    fake_cuda_graphs.update({
        # the graph computes the right thing, then a stale address adds garbage to the token
        "wrong": {"fault": lambda: tiny_model.step_cache.step.token.add_(0.5)},
        "raises": {"raises": "CUDA error: an illegal memory access was encountered"},
        "capture": {"capture_raises": "operation not permitted when stream is capturing"}}[fault])
    args = dict(width=48, height=32, steps=3, seed=2, cfg=3.0)
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        b = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="graph", **args))
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    assert b.path == "eager" and b.fallback
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)  # the whole image, the first token included
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "doctor" in warnings[0] and b.fallback in warnings[0]
    expected = {"wrong": "differs from the plain step's", "raises": "illegal memory access",
                "capture": "capture failed"}[fault]
    assert expected in b.fallback
    # the key is remembered as broken: the next generation takes the plain loop at once, without a new warning
    caplog.clear()
    made = len(FakeGraph.made)
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        again = sample(tiny_model, Conditioning(["a dog"]), SamplerSettings(fast="graph", **args))
    assert again.path == "eager" and again.fallback == b.fallback and len(FakeGraph.made) == made
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    tiny_model.broken_steps.clear()


def test_a_wrong_static_step_falls_back_too(tiny_model, monkeypatch, caplog):
    """No CUDA needed: the fixed-shape step is checked against the plain one on its first token as well."""
    tiny_model.release_step_cache()
    real = G.FixedStep._static_token

    def off_by_one(self, spec, forced=None, feed=True):
        real(self, spec, forced, feed)
        self.c.add_(1.0)  # the next condition is wrong

    monkeypatch.setattr(G.FixedStep, "_static_token", off_by_one)
    args = dict(width=48, height=32, steps=3, seed=2, cfg=3.0)
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        b = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="static", **args))
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    assert b.path == "eager" and "differs" in b.fallback
    assert torch.allclose(a.tokens, b.tokens, atol=1e-5)
    tiny_model.broken_steps.clear()


def test_the_graph_key_is_derived_from_declared_settings_fields():
    from dataclasses import fields

    from nextstep_core.generation.settings import GRAPH_BAKED, GRAPH_FREE, graph_baked

    names = {f.name for f in fields(SamplerSettings)}
    assert GRAPH_BAKED | GRAPH_FREE == names and not GRAPH_BAKED & GRAPH_FREE
    base = SamplerSettings()
    for name in GRAPH_BAKED:  # every baked field changes the key ...
        value = getattr(base, name)
        other = {bool: (not value) if isinstance(value, bool) else None}.get(type(value))
        changed = base.replace(**{name: other if other is not None else _other(value)})
        assert graph_baked(changed) != graph_baked(base), name
    for name in GRAPH_FREE:  # ... and no free one does
        changed = base.replace(**{name: _other(getattr(base, name))})
        assert graph_baked(changed) == graph_baked(base), name


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 16
    return f"{value}-other"


def test_static_path_with_gen_pos_embed_and_editing(tmp_path, tiny_vae):
    from nextstep_core.weights.testing import make_tiny_checkpoint

    d = make_tiny_checkpoint(str(tmp_path / "pe"), family="nextstep-1.1", use_gen_pos_embed=True,
                             base_image_grid_size=4, with_vae=False)
    m = ns.load_model(d, dtype="float32")
    assert m.gen_pos_embed is not None
    cond = ns.encode_edit_images(tiny_vae, Conditioning(["<image>x"]), [torch.rand(3, 32, 32)])
    args = dict(width=64, height=48, steps=3, cfg=3.0, cfg_img=2.0, seed=1)
    a = sample(m, cond, SamplerSettings(fast="eager", **args))
    b = sample(m, cond, SamplerSettings(fast="static", **args))
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    with pytest.raises(NextStepError, match="position table covers at most 64x64"):
        sample(m, Conditioning(["x"]), SamplerSettings(width=80, height=32, steps=1))


def test_static_path_honours_progress_and_cancel(tiny_model):
    seen = []
    static = SamplerSettings(width=32, height=32, steps=2, fast="static")
    sample(tiny_model, Conditioning(["a"]), static, progress=lambda d, t, tok: seen.append((d, tok.shape[1])))
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]
    with pytest.raises(ns.GenerationCancelled):
        sample(tiny_model, Conditioning(["a"]), static, should_cancel=lambda: len(seen) > 5,
               progress=lambda *a: seen.append(a))
    again = sample(tiny_model, Conditioning(["a"]), static)  # the kept step is usable after a cancel
    assert again.path == "static"


def test_fast_mode_errors(tiny_model):
    small = SamplerSettings(width=32, height=32, steps=4)
    with pytest.raises(NextStepError, match="CUDA graphs need a CUDA device"):
        sample(tiny_model, Conditioning(["a"]), small.replace(fast="graph"))
    with pytest.raises(NextStepError, match="unknown fast mode"):
        sample(tiny_model, Conditioning(["a"]), small.replace(fast="turbo"))


def test_step_annealing_runs_fewer_head_steps_later_and_keeps_the_noise_stream(tiny_model, monkeypatch):
    used, first_noise = [], {}
    real = S.sample_token

    def spy(head, c, noise, plan, *a, **k):
        used.append(len(plan.grid) - 1)
        first_noise.setdefault(run, []).append(noise[0].clone())
        return real(head, c, noise, plan, *a, **k)

    monkeypatch.setattr(S, "sample_token", spy)
    for run, end in (("plain", None), ("annealed", 2)):
        used.clear()
        sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=64, height=32, steps=8, steps_end=end, seed=4))
    assert used[0] == 8 and used[-1] == 2 and used == sorted(used, reverse=True)
    assert all(torch.equal(a, b) for a, b in zip(first_noise["plain"], first_noise["annealed"]))


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (32, 16)])
def test_one_and_two_token_images_on_the_fixed_paths(tiny_model, fake_cuda_graphs, size):
    """The fixed-shape cache has room for the warm-up steps and the last token's feed-back (no write past its end)."""
    w, h = size
    args = dict(width=w, height=h, steps=3, seed=4, cfg=2.0, images_per_prompt=2)
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    for fast in ("static", "graph"):
        b = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast=fast, **args))
        assert b.path == fast and b.tokens.shape == a.tokens.shape
        assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
        step = tiny_model.step_cache.step
        assert step.max_len == G.cache_len(step.plan) and int(step.pos) <= step.max_len


def test_the_fixed_shape_step_is_kept_and_reused_for_the_same_key(tiny_model):
    tiny_model.release_step_cache()
    args = dict(width=48, height=32, steps=3, cfg=3.0, fast="static")
    cond = Conditioning(["a cat"], negative_prompt="blurry")
    first = sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    kept = tiny_model.step_cache.step
    again = sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    assert tiny_model.step_cache.step is kept  # same buffers and caches (and on CUDA graphs) as the first call
    assert torch.equal(first.tokens, again.tokens)
    other = Conditioning(["a dog"], negative_prompt="blurry")
    reused = sample(tiny_model, other, SamplerSettings(seed=2, cfg_schedule="linear", **args))
    assert tiny_model.step_cache.step is kept
    eager = sample(tiny_model, other, SamplerSettings(seed=2, cfg_schedule="linear", **{**args, "fast": "eager"}))
    assert torch.allclose(reused.tokens, eager.tokens, atol=1e-4)
    assert tiny_model.step_cache is None  # the plain loop released it: its memory was free for the plain caches
    sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    kept = tiny_model.step_cache.step
    # weights that moved (a host offloading the model and loading it back) are a fresh step: a graph reads addresses
    head_w = tiny_model.image_head.net.input_proj.weight
    saved = head_w.data
    head_w.data = saved.clone()
    sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    assert tiny_model.step_cache.step is not kept
    head_w.data = saved
    kept = tiny_model.step_cache.step
    sample(tiny_model, cond, SamplerSettings(seed=1, **{**args, "width": 32}))  # another size: another step
    assert tiny_model.step_cache.step is not kept
    tiny_model.release_step_cache()
    assert tiny_model.step_cache is None


def test_noise_of_a_long_image_is_staged_in_chunks_with_the_same_stream(tiny_model, fake_cuda_graphs, monkeypatch):
    monkeypatch.setattr(G, "NOISE_CHUNK", 3)
    tiny_model.release_step_cache()
    args = dict(width=64, height=48, steps=2, seed=6, cfg=2.0, steps_end=1)  # 12 tokens: 4 chunks, captures mid-chunk
    a = sample(tiny_model, Conditioning(["a"]), SamplerSettings(fast="eager", **args))
    b = sample(tiny_model, Conditioning(["a"]), SamplerSettings(fast="graph", **args))
    assert tiny_model.step_cache.step.chunk == 3 and b.path == "graph"
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    tiny_model.release_step_cache()


@pytest.mark.parametrize("fast", ["eager", "static"])
def test_two_threads_on_one_model_both_get_correct_tokens(tiny_model, fast):
    settings = [SamplerSettings(width=48, height=32, steps=3, cfg=3.0, seed=s, fast=fast) for s in (1, 2)]
    conds = [Conditioning(["a cat"]), Conditioning(["the dog on the mat"], negative_prompt="blurry")]
    alone = [sample(tiny_model, c, s).tokens for c, s in zip(conds, settings)]
    for _ in range(3):
        got, errors = [None, None], []

        def run(i):
            try:
                got[i] = sample(tiny_model, conds[i], settings[i]).tokens
            except Exception as e:  # the assertion below reports it
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert all(torch.allclose(g, a, atol=1e-5) for g, a in zip(got, alone))


def test_a_progress_callback_that_samples_again_is_refused_not_corrupted(tiny_model):
    def nested(*_):
        sample(tiny_model, Conditioning(["b"]), SamplerSettings(width=16, height=16, steps=1))

    with pytest.raises(NextStepError, match="already generating on this thread"):
        sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=32, height=16, steps=1), progress=nested)
    assert sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=16, height=16, steps=1)).tokens.shape[1] == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_equals_eager_on_the_same_noise(tiny_dir):
    m = ns.load_model(tiny_dir, dtype="float32", device="cuda")
    args = dict(width=64, height=64, steps=6, images_per_prompt=2, seed=9, cfg=4.0, cfg_schedule="linear")
    a = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    b = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", **args))
    assert b.path == "graph" and b.fallback is None
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    graphs = dict(m.step_cache.step.graphs)
    again = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", **args))
    assert m.step_cache.step.graphs == graphs and torch.equal(again.tokens, b.tokens)  # replayed, not recaptured
    annealed = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", steps_end=3, **args))
    plain = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="eager", steps_end=3, **args))
    assert annealed.path == "graph" and torch.allclose(annealed.tokens, plain.tokens, atol=1e-4)
    for size in ((16, 16), (16, 32)):  # 1 and 2 tokens: no write past the cache (a device-side assert on CUDA)
        small = dict(args, width=size[0], height=size[1])
        e = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="eager", **small))
        g = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", **small))
        assert g.path == "graph" and torch.allclose(e.tokens, g.tokens, atol=1e-4)
