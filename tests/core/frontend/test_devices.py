"""One place turns a device string into a checked torch.device: auto picks the best, a wrong name says what exists;
and one rule picks the dtype `auto` computes in: bf16 only where the device has bf16 arithmetic."""
import pytest
import torch

from nextstep_core.frontend import devices
from nextstep_core.frontend.devices import auto_dtype, available_devices, resolve_device, resolve_dtype
from nextstep_core.errors import NextStepError


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == expected
    assert available_devices()[-1] == "cpu"


@pytest.mark.parametrize("spec", ["gpu0", "cuda:x", "cuda:-1", "cu da", "0", "meta", "nosuchdevice", "nn", "opengl"])
def test_a_name_that_is_no_device_is_refused_with_the_choices(spec):
    with pytest.raises(NextStepError, match="use auto, cpu, cuda, cuda:N or mps") as e:
        resolve_device(spec)
    assert "cpu" in str(e.value).split("here:")[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_says_what_is_available():
    with pytest.raises(NextStepError, match=r"'cuda' is not available on this machine.*available: .*cpu"):
        resolve_device("cuda")


def test_a_device_index_beyond_the_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert available_devices()[:2] == ["cuda", "cuda:1"]
    with pytest.raises(NextStepError, match=r"has 2 cuda device\(s\) \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:2")


def test_a_backend_that_fails_to_initialise_counts_as_absent(monkeypatch):
    def broken():
        raise RuntimeError("driver too old")

    monkeypatch.setattr(torch.cuda, "is_available", broken)
    with pytest.raises(NextStepError, match="not available"):
        resolve_device("cuda")


# ---- the auto dtype

def _cpu_flags(monkeypatch, avx512_bf16=False, amx=False, machine="x86_64"):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(devices.platform, "machine", lambda: machine)


def test_auto_is_float32_on_a_cpu_without_bf16_arithmetic_like_an_avx2_only_one(monkeypatch):
    _cpu_flags(monkeypatch)
    assert auto_dtype("cpu") == torch.float32 and resolve_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("flags", [dict(avx512_bf16=True), dict(amx=True)], ids=["avx512-bf16", "amx"])
def test_auto_is_bf16_on_a_cpu_with_bf16_arithmetic(monkeypatch, flags):
    _cpu_flags(monkeypatch, **flags)
    assert auto_dtype(torch.device("cpu")) == torch.bfloat16


def test_a_cpu_whose_probes_are_missing_or_broken_gets_float32(monkeypatch):
    def broken():
        raise RuntimeError("no cpuinfo")

    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    assert auto_dtype("cpu") == torch.float32


@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float32), ((8, 0), torch.bfloat16),
                                                  ((9, 0), torch.bfloat16)])
def test_auto_on_cuda_is_bf16_from_ampere_on(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert auto_dtype("cuda") == expected


def test_auto_on_other_devices_is_bf16_where_the_device_computes_it(monkeypatch):
    from nextstep_core.weights import loading

    def refuse(dtype, device):
        raise NextStepError("no bf16 here")

    monkeypatch.setattr(loading, "check_dtype_supported", lambda dtype, device: None)
    assert auto_dtype("mps") == torch.bfloat16
    monkeypatch.setattr(loading, "check_dtype_supported", refuse)
    assert auto_dtype("mps") == torch.float32


def test_an_explicit_dtype_is_taken_as_given_and_an_unknown_one_says_what_to_use(monkeypatch):
    _cpu_flags(monkeypatch)
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("Float32", "cpu") == torch.float32
    with pytest.raises(NextStepError, match="unknown dtype 'half8'"):
        resolve_dtype("half8", "cpu")
