"""The fixed-shape per-token path (what CUDA graphs replay) equals the plain loop on the same noise."""
import pytest
import torch

import nextstep_core as ns
from nextstep_core import Conditioning, NextStepError, SamplerSettings, sample


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(cfg_schedule="linear", use_norm=False),
    dict(sampler="flow_sde", cfg=1.0),
    dict(sampler="euler", noise="reference"),
])
def test_static_path_equals_the_eager_loop(tiny_model, kwargs):
    args = dict(width=48, height=32, steps=5, images_per_prompt=2, seed=3, cfg=4.0)
    args.update(kwargs)
    cond = Conditioning(["a cat", "the dog on the mat"], negative_prompt="blurry")
    a = sample(tiny_model, cond, SamplerSettings(fast="eager", **args))
    b = sample(tiny_model, cond, SamplerSettings(fast="static", **args))
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)


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


def test_fast_mode_errors(tiny_model):
    small = SamplerSettings(width=32, height=32, steps=4)
    with pytest.raises(NextStepError, match="CUDA graphs need a CUDA device"):
        sample(tiny_model, Conditioning(["a"]), small.replace(fast="graph"))
    with pytest.raises(NextStepError, match="step annealing"):
        sample(tiny_model, Conditioning(["a"]), small.replace(steps_end=2, fast="static"))
    with pytest.raises(NextStepError, match="unknown fast mode"):
        sample(tiny_model, Conditioning(["a"]), small.replace(fast="turbo"))


def test_step_annealing_runs_fewer_head_steps_later(tiny_model, monkeypatch):
    import nextstep_core.generation.loop as G

    used = []
    real = G.sample_token

    def spy(head, c, noise, grid, *a, **k):
        used.append(len(grid.grid) - 1)
        return real(head, c, noise, grid, *a, **k)

    monkeypatch.setattr(G, "sample_token", spy)
    sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=64, height=32, steps=10, steps_end=2))
    assert used[0] == 10 and used[-1] == 2 and used == sorted(used, reverse=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_equals_eager_on_the_same_noise(tiny_dir):
    m = ns.load_model(tiny_dir, dtype="float32", device="cuda")
    args = dict(width=64, height=64, steps=6, images_per_prompt=2, seed=9, cfg=4.0, cfg_schedule="linear")
    a = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    b = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", **args))
    assert b.path == "graph"
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    graph = m.step_cache.step.graph
    again = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", **args))
    assert m.step_cache.step.graph is graph and torch.equal(again.tokens, b.tokens)  # replayed, not recaptured
    for size in ((16, 16), (16, 32)):  # 1 and 2 tokens: no write past the cache (a device-side assert on CUDA)
        small = dict(args, width=size[0], height=size[1])
        e = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="eager", **small))
        g = sample(m, Conditioning(["a cat"]), SamplerSettings(fast="graph", **small))
        assert g.path == "graph" and torch.allclose(e.tokens, g.tokens, atol=1e-4)


def test_step_annealing_keeps_the_noise_stream_of_the_plain_run(tiny_model, monkeypatch):
    import nextstep_core.generation.loop as G

    seen = {}
    real = G.sample_token

    def spy(head, c, noise, grid, *a, **k):
        seen.setdefault(run, []).append(noise[0].clone())
        return real(head, c, noise, grid, *a, **k)

    monkeypatch.setattr(G, "sample_token", spy)
    for run, end in (("plain", None), ("annealed", 2)):
        sample(tiny_model, Conditioning(["a"]), SamplerSettings(width=64, height=32, steps=8, steps_end=end, seed=4))
    assert all(torch.equal(a, b) for a, b in zip(seen["plain"], seen["annealed"]))


def test_a_failed_graph_capture_falls_back_to_the_same_results(tiny_model, monkeypatch, caplog):
    """Where a driver cannot capture, the step runs uncaptured with identical state (simulated on the CPU)."""
    import logging

    from nextstep_core.generation import graph as fast

    def broken_capture(self):
        self._step()  # the warm-up had already advanced the state when capture failed
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fast.StaticTokenStep, "_capture", broken_capture)
    monkeypatch.setattr(fast, "graphs_available", lambda device: True)
    args = dict(width=48, height=32, steps=3, seed=2, cfg=3.0)
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        b = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="graph", **args))
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    assert "continuing without graphs" in caplog.text and "operation not permitted" in caplog.text
    assert b.path == "static"  # the result says no graph ran
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)


@pytest.mark.parametrize("size", [(16, 16), (16, 32), (32, 16)])
def test_one_and_two_token_images_on_the_static_path(tiny_model, size):
    """The fixed-shape cache has room for the warm-up steps and the last token's feed-back (no write past its end)."""
    from nextstep_core.generation.graph import cache_slots

    w, h = size
    args = dict(width=w, height=h, steps=3, seed=4, cfg=2.0, images_per_prompt=2)
    a = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="eager", **args))
    b = sample(tiny_model, Conditioning(["a cat"]), SamplerSettings(fast="static", **args))
    assert b.path == "static" and b.tokens.shape == a.tokens.shape
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    step = tiny_model.step_cache.step
    assert step.cache.max_len == cache_slots(step.plan) >= step.plan.prompt_len + 2
    assert int(step.pos) <= step.cache.max_len  # every slot written was inside the cache


def test_the_fixed_shape_step_is_kept_and_reused_for_the_same_shape(tiny_model):
    tiny_model.release_step_cache()
    args = dict(width=48, height=32, steps=3, cfg=3.0, fast="static")
    cond = Conditioning(["a cat"], negative_prompt="blurry")
    first = sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    kept = tiny_model.step_cache.step
    again = sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    assert tiny_model.step_cache.step is kept  # same buffers, cache (and on CUDA graph) as the first call
    assert torch.equal(first.tokens, again.tokens)
    # another seed and another prompt of the same padded length and size: reused, and still what eager gives
    other = Conditioning(["a dog"], negative_prompt="blurry")
    reused = sample(tiny_model, other, SamplerSettings(seed=2, cfg_schedule="linear", **args))
    assert tiny_model.step_cache.step is kept
    eager = sample(tiny_model, other, SamplerSettings(seed=2, cfg_schedule="linear", **{**args, "fast": "eager"}))
    assert torch.allclose(reused.tokens, eager.tokens, atol=1e-4)
    # weights that moved (a host offloading the model and loading it back) are a fresh step: a graph reads addresses
    head_w = tiny_model.image_head.net.input_proj.weight
    saved = head_w.data
    head_w.data = saved.clone()
    sample(tiny_model, cond, SamplerSettings(seed=1, **args))
    assert tiny_model.step_cache.step is not kept
    head_w.data = saved
    kept = tiny_model.step_cache.step
    # another size is another step; the old one is released first; release frees it on demand
    sample(tiny_model, cond, SamplerSettings(seed=1, **{**args, "width": 32}))
    assert tiny_model.step_cache.step is not kept
    tiny_model.release_step_cache()
    assert tiny_model.step_cache is None


def test_noise_of_a_long_image_is_staged_in_chunks_with_the_same_stream(tiny_model, monkeypatch):
    from nextstep_core.generation import graph as fast

    monkeypatch.setattr(fast, "NOISE_CHUNK", 3)
    args = dict(width=64, height=48, steps=2, seed=6, cfg=2.0)  # 12 tokens: 4 chunks
    a = sample(tiny_model, Conditioning(["a"]), SamplerSettings(fast="eager", **args))
    b = sample(tiny_model, Conditioning(["a"]), SamplerSettings(fast="static", **args))
    assert tiny_model.step_cache.step.chunk == 3
    assert torch.allclose(a.tokens, b.tokens, atol=1e-4)
    tiny_model.release_step_cache()
