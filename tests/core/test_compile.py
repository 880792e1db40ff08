"""The optional torch.compile of the fused head step: off by default, the same tokens when on, and a fallback with
one warning wherever it cannot work."""
import logging

import pytest
import torch

from nextstep_core import Conditioning, NextStepError, SamplerSettings, load_model, sample
from nextstep_core.generation import compile as head_compile
from nextstep_core.weights import cpu_pack
from nextstep_core.weights.cpu_pack import packing_works, unpack_linears
from nextstep_core.model.family import NEXTSTEP_1
from nextstep_core.generation.sampling import Guidance, HeadPlan, sample_token

CPU_COMPILE = head_compile.compile_support("cpu")


@pytest.fixture(autouse=True)
def fresh_compile_state():
    head_compile.reset()
    yield
    head_compile.reset()


@pytest.fixture(scope="module")
def unpacked_model(tiny_dir):
    """The tiny model with plain dense weights (F.linear), as on a CPU where packing is unavailable."""
    model = load_model(tiny_dir, dtype="float32")
    unpack_linears(model)
    return model


def _token(model, compile_head, guidance=Guidance(2, 4.0, 1.0)):
    settings = SamplerSettings(sampler="euler_maruyama", compile_head=compile_head)
    plan = HeadPlan.build(model.image_head, NEXTSTEP_1, 4, settings, model.device, model.dtype)
    g = torch.Generator().manual_seed(5)
    c = torch.randn(guidance.branches, model.config.hidden_size, generator=g)
    noise = torch.randn(plan.draws, 1, model.config.token_dim, generator=g)
    with torch.inference_mode():
        return plan, sample_token(model.image_head, c, noise, plan, guidance)


def test_compile_is_off_by_default_and_validated():
    assert SamplerSettings().compile_head is False
    with pytest.raises(NextStepError, match="compile_head must be True or False, got 'yes'"):
        SamplerSettings(compile_head="yes").validate()
    with pytest.raises(NextStepError, match="use head loop 'fused' with it, not 'plain'"):
        SamplerSettings(compile_head=True, head_loop="plain").validate()
    SamplerSettings(compile_head=True).validate()


def test_devices_where_compile_cannot_work_say_why(monkeypatch):
    import shutil

    assert "not attempted on mps" in head_compile.compile_support("mps")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    head_compile.compile_support.cache_clear()
    assert "needs a C++ compiler" in head_compile.compile_support("cpu")
    monkeypatch.setattr(head_compile.importlib.util, "find_spec", lambda name: None)
    assert head_compile.compile_support("cuda") == "Triton is not installed"


def test_without_a_compiler_the_head_runs_uncompiled_with_one_warning(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(head_compile, "compile_support", lambda device_type: "no compiler here")
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("torch.compile must not be called"))
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        plan, tok = _token(tiny_model, True)
        _token(tiny_model, True)
    assert not plan.compiled
    assert caplog.text.count("compile_head: no compiler here") == 1
    assert torch.equal(tok, _token(tiny_model, False)[1])


def test_a_compilation_that_raises_falls_back_to_the_same_token_once(unpacked_model, monkeypatch, caplog):
    tiny_model = unpacked_model
    monkeypatch.setattr(head_compile, "compile_support", lambda device_type: None)
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(1)
            raise RuntimeError("InductorError: CppCompileError: C++ compile error\nlong log")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        plan, tok = _token(tiny_model, True)
        _, again = _token(tiny_model, True)
    assert plan.compiled and len(calls) == 1  # tried once, then never again in this process
    assert caplog.text.count("compilation failed (RuntimeError: InductorError: CppCompileError") == 1
    reference = _token(tiny_model, False)[1]
    assert torch.equal(tok, reference) and torch.equal(again, reference)


def test_the_graph_path_runs_the_head_uncompiled():
    grid = NEXTSTEP_1.time_grid(4, 1.0)
    plan = HeadPlan(grid, grid, None, "euler", NEXTSTEP_1, compiled=True)
    assert plan.for_graph_capture().compiled is False and plan.compiled is True


@pytest.mark.skipif(not packing_works(torch.float32), reason="this CPU does not pack weights")
def test_a_head_with_packed_weights_runs_uncompiled_and_says_why(tiny_dir, monkeypatch, caplog):
    """Packed weights beat compiling the head on the CPU (bench/RESULTS.md), and dynamo cannot trace them."""
    monkeypatch.setattr(cpu_pack, "MIN_FP32_WEIGHT", 0)  # the tiny layers are below the size fp32 packs from
    tiny_model = load_model(tiny_dir, dtype="float32")
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        plan, token = _token(tiny_model, True)
        _, ref = _token(tiny_model, False)
    assert plan.compiled is False and "packed for the CPU's matmul" in caplog.text
    assert torch.equal(token, ref)


@pytest.mark.skipif(CPU_COMPILE is not None, reason=f"torch.compile cannot run here: {CPU_COMPILE}")
def test_the_compiled_head_gives_the_uncompiled_tokens(unpacked_model, caplog):
    """One real compilation on the CPU (~10-25 s: inductor builds C++), shared by the eager and static paths."""
    tiny_model = unpacked_model
    args = dict(width=32, height=16, steps=4, cfg=4.0, seed=11)
    cond = Conditioning(["a red fox"], negative_prompt="blurry")
    ref = sample(tiny_model, cond, SamplerSettings(fast="eager", **args)).tokens
    with caplog.at_level(logging.WARNING, logger="nextstep"):
        eager = sample(tiny_model, cond, SamplerSettings(fast="eager", compile_head=True, **args)).tokens
        static = sample(tiny_model, cond, SamplerSettings(fast="static", compile_head=True, **args)).tokens
    assert head_compile._compiled is not None and "compile_head" not in caplog.text  # it really ran compiled
    scale = ref.abs().max()
    assert (eager - ref).abs().max() <= 1e-5 * scale
    assert (static - ref).abs().max() <= 1e-5 * scale
