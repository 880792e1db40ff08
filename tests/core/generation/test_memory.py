"""Memory is refused up front, from the configs, counting activations and the VAE decode, without optional packages."""
from __future__ import annotations

import ctypes
import io
import sys

import pytest
import torch

import nextstep_core as ns
from nextstep_core import Conditioning, NextStepError, SamplerSettings, sample
from nextstep_core.generation import memory
from nextstep_core.generation.loop import prompt_batch
from nextstep_core.model.kv_cache import KVCache

FAST = dict(width=32, height=32, steps=4, cfg=3.0)


@pytest.fixture
def no_psutil(monkeypatch):
    """A clean install: `import psutil` fails."""
    monkeypatch.setitem(sys.modules, "psutil", None)


def _meminfo_available() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/meminfo")
def test_free_memory_is_known_without_psutil(no_psutil):
    free = memory.available_bytes(torch.device("cpu"))
    assert free is not None and abs(free - _meminfo_available()) < 2**30  # other processes come and go meanwhile


def _fake_files(monkeypatch, files: dict):
    def fake_open(path, *a, **k):
        if path in files:
            return io.StringIO(files[path])
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(memory, "open", fake_open, raising=False)


def test_old_kernels_and_container_limits(monkeypatch):
    _fake_files(monkeypatch, {"/proc/meminfo": "MemTotal: 8000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n"})
    assert memory._meminfo() == 420 * 1024  # before Linux 3.14 there is no MemAvailable
    _fake_files(monkeypatch, {"/proc/meminfo": "MemAvailable: 4000000 kB\n", "/sys/fs/cgroup/memory.max": "3000\n",
                              "/sys/fs/cgroup/memory.current": "1000\n"})
    assert memory._meminfo() == 2000  # a container's limit is what it can have
    _fake_files(monkeypatch, {"/proc/meminfo": "MemAvailable: 4 kB\n", "/sys/fs/cgroup/memory.max": "max\n",
                              "/sys/fs/cgroup/memory.current": "1000\n"})
    assert memory._meminfo() == 4096


def test_other_systems_without_psutil(monkeypatch, no_psutil):
    monkeypatch.setattr(memory.sys, "platform", "darwin")  # no /proc: sysconf's free pages
    free = memory.system_available_bytes()
    assert free is not None and 0 < free <= _meminfo_available() + 2**30


def test_windows_reads_global_memory_status(monkeypatch, no_psutil):
    class Kernel32:
        def GlobalMemoryStatusEx(self, ref):
            status = ref._obj
            assert status.dwLength == ctypes.sizeof(status) == 64  # MEMORYSTATUSEX as Windows defines it
            status.ullAvailPhys = 123 << 20
            return 1

    monkeypatch.setattr(memory.sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "windll", type("WinDLL", (), {"kernel32": Kernel32()})(), raising=False)
    assert memory.system_available_bytes() == 123 << 20


def test_the_check_is_skipped_with_a_warning_where_nothing_can_tell(tiny_model, monkeypatch, caplog):
    monkeypatch.setattr(memory, "available_bytes", lambda device: None)
    monkeypatch.setattr(memory, "_warned", set())
    sample(tiny_model, Conditioning(["a"]), SamplerSettings(**FAST))
    sample(tiny_model, Conditioning(["a"]), SamplerSettings(**FAST))
    assert [r.getMessage() for r in caplog.records if "cannot tell" in r.getMessage()] == [
        "cannot tell how much memory is free on cpu; generations are not checked against it"]


def test_sample_counts_activations_not_only_the_kv_cache(tiny_model, monkeypatch):
    """Free memory for twice the KV cache: enough for the cache, not for the head's modulations of every step."""
    rows = 2  # cfg 3: conditional + unconditional
    prompt = prompt_batch(tiny_model, Conditioning(["a"]), 32, 32, 1, rows).input_ids.shape[1]
    kv = KVCache.bytes_per_token(tiny_model.config, tiny_model.dtype) * rows * (prompt + 4)
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(2 * kv / memory.HEADROOM))
    monkeypatch.setattr(tiny_model, "setup_caches", lambda *a, **k: pytest.fail("allocated before the check"))
    with pytest.raises(NextStepError, match=r"this job needs .*KV cache .*activations .* is free on cpu: use fewer "
                                            r"images or a smaller size\.$"):
        sample(tiny_model, Conditioning(["a"]), SamplerSettings(**FAST))


def test_a_batch_that_fits_runs(tiny_model, no_psutil):
    assert sample(tiny_model, Conditioning(["a"]), SamplerSettings(**FAST)).tokens.shape == (1, 4, 64)


def test_memory_estimate_grows_with_size_rows_and_steps(tiny_model):
    small = ns.estimate_memory_bytes(tiny_model, 256, 256, 2)
    assert ns.estimate_memory_bytes(tiny_model, 512, 512, 2) > small
    assert ns.estimate_memory_bytes(tiny_model, 256, 256, 6) > small
    assert ns.estimate_memory_bytes(tiny_model, 256, 256, 2, steps=1000) > small  # the head's modulations
    assert small > sum(p.numel() * 4 for p in tiny_model.parameters())


def test_weights_are_counted_as_the_loader_keeps_them(tiny_dir, tmp_path):
    from nextstep_core.weights.convert import convert
    from nextstep_core.weights.loading import read_model_config

    for path, dtype in ((tiny_dir, torch.bfloat16), (convert(tiny_dir, str(tmp_path / "q.safetensors"), "int8"),
                                                     torch.bfloat16)):
        _, src = read_model_config(path)
        model = ns.load_model(path, dtype=dtype)
        loaded = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        keys = {k: s for k, s in src.shapes.items() if not k.startswith("lm_head.")}
        assert abs(memory.weight_bytes(keys, src.dtypes, dtype) - loaded) <= 0.02 * loaded  # packing adds a little


# --- the command line refuses before loading ----------------------------------------------------------------------

def test_the_command_line_refuses_a_huge_batch_before_loading(tiny_dir, tmp_path, capsys, no_loading, no_psutil):
    """500 prompts x 64 images at 256x256: on a 23 GB machine this once ran to 21 GB before anyone stopped it."""
    from nextstep_core.frontend.cli import main

    prompts = [a for i in range(500) for a in ("--prompt", f"prompt {i}")]
    code = main(["generate", "--model", tiny_dir, *prompts, "--images-per-prompt", "64", "--width", "256",
                 "--height", "256", "-o", str(tmp_path / "out" / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: this job needs ") and "VAE decode" in err and "is free on cpu" in err
    assert not (tmp_path / "out").exists()


def test_the_vae_decode_is_counted_per_pixel_and_image(tiny_dir):
    from nextstep_core.weights.vae_files import vae_files

    cfg = vae_files(tiny_dir + "/vae")[0]
    one = memory.decode_bytes(cfg, 1, 256, 256)
    assert memory.decode_bytes(cfg, 64, 256, 256) == 64 * one
    assert memory.decode_bytes(cfg, 1, 512, 512) == 4 * one
    full = ns.VAEConfig(ch=128, ch_mult=(1, 2, 4, 4))  # the f8ch16 tokenizer: measured 3.1-3.5 KB per pixel in fp32
    assert 3.5e3 < memory.decode_bytes(full, 1, 256, 256) / (256 * 256) < 4.5e3
