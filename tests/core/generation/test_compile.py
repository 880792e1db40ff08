"""torch.compile of the fixed-shape step's blocks (one decoder layer, one head step): whole graphs, compiled once and
reused for every layer, step, token, seed, prompt length and step count; the same tokens as the plain loop; and an
uncompiled fallback with one warning wherever compiling cannot work."""
import logging

import pytest
import torch

from nextstep_core import Conditioning, NextStepError, SamplerSettings, load_model, sample
from nextstep_core.generation import compile as compiling

CPU_COMPILE = compiling.compile_support("cpu")
needs_compiler = pytest.mark.skipif(CPU_COMPILE is not None, reason=f"torch.compile cannot run here: {CPU_COMPILE}")
ARGS = dict(width=48, height=32, steps=4, cfg=4.0, seed=11)


@pytest.fixture(autouse=True)
def fresh_compile_state():
    compiling.reset()
    yield
    compiling.reset()


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir, dtype="float32")


def test_auto_compiles_on_cuda_only_and_the_mode_is_validated():
    assert SamplerSettings().compile == "auto"
    assert not compiling.wanted("auto", "cpu")
    with pytest.raises(NextStepError, match="unknown compile mode 'yes'"):
        SamplerSettings(compile="yes").validate()
    with pytest.raises(NextStepError, match="use head loop 'fused' with it, not 'plain'"):
        SamplerSettings(compile="on", head_loop="plain").validate()


def test_devices_where_compile_cannot_work_say_why(monkeypatch):
    import shutil

    assert "not attempted on mps" in compiling.compile_support("mps")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    compiling.compile_support.cache_clear()
    assert "needs a C++ compiler" in compiling.compile_support("cpu")
    monkeypatch.setattr(compiling.importlib.util, "find_spec", lambda name: None)
    assert compiling.compile_support("cuda") == "Triton is not installed"


def test_without_a_compiler_the_step_runs_uncompiled_with_one_warning(model, monkeypatch, caplog):
    monkeypatch.setattr(compiling, "compile_support", lambda device_type: "no compiler here")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile must not be called"))
    model.release_step_cache()
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        a = sample(model, Conditioning(["a cat"]), SamplerSettings(fast="static", compile="on", **ARGS))
        sample(model, Conditioning(["a cat"]), SamplerSettings(fast="static", compile="on", **ARGS))
    assert a.path == "static" and caplog.text.count("no compiler here") == 1
    ref = sample(model, Conditioning(["a cat"]), SamplerSettings(fast="static", compile="off", **ARGS))
    assert torch.equal(a.tokens, ref.tokens)


def test_a_compilation_that_raises_falls_back_to_the_same_tokens_once(model, monkeypatch, caplog):
    monkeypatch.setattr(compiling, "compile_support", lambda device_type: None)
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong log")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model.release_step_cache()
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        a = sample(model, Conditioning(["a cat"]), SamplerSettings(fast="static", compile="on", **ARGS))
        b = sample(model, Conditioning(["a cat"]), SamplerSettings(fast="static", compile="on", **ARGS))
    assert len(calls) == 1  # tried once, then never again in this process
    assert caplog.text.count("compilation failed (RuntimeError: InductorError: CppCompileError") == 1
    assert a.path == b.path == "static" and a.fallback is None  # uncompiled, still on the fixed-shape step
    ref = sample(model, Conditioning(["a cat"]), SamplerSettings(fast="static", compile="off", **ARGS))
    assert torch.equal(b.tokens, ref.tokens)  # from then on, the uncompiled step exactly
    assert torch.allclose(a.tokens, ref.tokens, atol=1e-5)  # the failing token's steps ran the compiled form uncompiled
    model.release_step_cache()


@needs_compiler
def test_the_compiled_step_is_whole_graphs_that_never_recompile_and_gives_the_plain_tokens(model, monkeypatch):
    """One real compilation on the CPU (inductor builds C++: ~20-60 s here). Then: two prompt lengths, another seed,
    another cfg and step annealing reuse the two graphs (dynamo's counters), without a graph break, and every
    generation agrees with the plain loop."""
    from torch._dynamo.utils import counters

    assert compiling.compile_support("cpu") is None  # its probe compiles a graph of its own: before counting
    torch._dynamo.reset()  # nothing compiled by earlier tests in this process
    counters.clear()
    model.release_step_cache()
    runs = [(Conditioning(["a cat"]), dict()),
            (Conditioning(["the red fox on the hill at dawn"], negative_prompt="blurry"), dict(seed=12)),
            (Conditioning(["a cat"]), dict(cfg=2.5, cfg_schedule="linear")),
            (Conditioning(["a cat"]), dict(steps=6, steps_end=3))]
    for i, (cond, changes) in enumerate(runs):
        s = SamplerSettings(**{**ARGS, **changes})
        got = sample(model, cond, s.replace(fast="static", compile="on"))
        ref = sample(model, cond, s.replace(fast="eager"))
        assert got.path == "static+compile" and got.fallback is None, (i, got.path, got.fallback)
        assert (got.tokens - ref.tokens).abs().max() <= 1e-4 * ref.tokens.abs().max(), i
        if i == 0:
            graphs = counters["stats"]["unique_graphs"]
            assert graphs == 2  # one decoder layer, one head step
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled after the first generation
    assert not counters["graph_break"] and not counters["recompiles"]
    model.release_step_cache()


@needs_compiler
def test_dynamo_explain_finds_no_graph_break_in_either_block(model):
    from nextstep_core.generation.plan import GenerationPlan
    from nextstep_core.model.attention import RowSlots
    from nextstep_core.model.family import family_of

    cfg = model.config
    model.setup_caches(2, 32)
    pos = torch.tensor([9])
    mask = RowSlots(torch.tensor([0, 2]), 32, model.dtype).decode_mask(pos, 32, model.group)
    x = torch.randn(2, 1, cfg.hidden_size)
    table = model.rope_rows(32, model.dtype, "cpu").index_select(0, pos)
    layer = torch._dynamo.explain(compiling._run_layer)(model.layers[0], x, table, pos, mask, 32)
    model.install_caches(None)
    s = SamplerSettings(**ARGS).with_family(cfg.family)
    head_plan = GenerationPlan(s, family_of(cfg), 2, 3, 2, 8, 1).head_plan(model, 4)
    mods = model.image_head.modulations(head_plan.grid_dev[:4], torch.randn(2, cfg.hidden_size), head_plan.temb,
                                        plus_one=True)
    xt = torch.randn(1, cfg.token_dim)
    head = torch._dynamo.explain(compiling._head_update)(model.image_head, xt, [m[1:2] for m in mods], 2,
                                                         torch.tensor(4.0), torch.tensor(0.9), torch.tensor(0.1),
                                                         torch.zeros(1, cfg.token_dim))
    assert (layer.graph_count, layer.graph_break_count) == (1, 0)
    assert (head.graph_count, head.graph_break_count) == (1, 0)
