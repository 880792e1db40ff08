"""One place turns a device string into a checked torch.device: auto picks the best, a wrong name says what exists."""
import pytest
import torch

from nextstep_core.frontend.devices import available_devices, resolve_device
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
