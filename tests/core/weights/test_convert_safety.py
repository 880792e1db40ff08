"""`convert` never harms its source or its output: refusals before any weight is read, a temporary file of its own
that is removed on every failure, and concurrent conversions that leave one whole file."""
from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading

import pytest
import torch

from nextstep_core import fs
from nextstep_core.errors import CheckpointError, GenerationCancelled, NextStepError
from nextstep_core.frontend.info import size_text
from nextstep_core.weights import convert as C
from nextstep_core.weights.st_io import TensorReader

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _copy(tiny_dir, tmp_path, name="m"):
    d = tmp_path / name
    shutil.copytree(tiny_dir, d)
    return d


def _snapshot(folder) -> dict:
    return {p: (folder / p).read_bytes() for p in sorted(os.listdir(folder)) if (folder / p).is_file()}


@pytest.fixture
def no_weights_read(monkeypatch):
    """Fails the test if a tensor is read: every refusal must come before that."""
    def refuse(self, key):
        raise AssertionError(f"{key} was read before the conversion was refused")

    monkeypatch.setattr(TensorReader, "get", refuse)


# --- the source is never harmed ------------------------------------------------------------------------------------

def test_converting_a_folder_into_one_of_its_own_shards_is_refused(tiny_dir, tmp_path, no_weights_read):
    d = _copy(tiny_dir, tmp_path)
    before = _snapshot(d)
    with pytest.raises(CheckpointError, match="is inside the folder being converted"):
        C.convert(str(d), str(d / "model-00001-of-00002.safetensors"), "bf16")
    with pytest.raises(CheckpointError, match="is inside the folder being converted"):
        C.convert(str(d), str(d / "model_bf16.safetensors"), "bf16")  # would be read as one more shard
    assert _snapshot(d) == before


def test_a_file_is_never_converted_over_itself(tiny_dir, tmp_path, monkeypatch):
    src = C.convert(tiny_dir, str(tmp_path / "one.safetensors"), "fp32")
    os.link(src, tmp_path / "same_inode.safetensors")
    os.symlink(src, tmp_path / "link.safetensors")
    before = (tmp_path / "one.safetensors").read_bytes()
    monkeypatch.setattr(TensorReader, "get", lambda self, key: pytest.fail("a weight was read"))
    for dst in ("one.safetensors", "same_inode.safetensors", "link.safetensors"):
        with pytest.raises(CheckpointError, match="is the source file .*one.safetensors: converting would overwrite"):
            C.convert(src, str(tmp_path / dst), "bf16")
        with pytest.raises(CheckpointError, match="is the source file"):  # with the roles swapped
            C.convert(str(tmp_path / dst), src, "bf16")
    assert (tmp_path / "one.safetensors").read_bytes() == before


def test_a_vae_folder_is_not_converted_into_itself(tiny_dir, tmp_path, no_weights_read):
    d = _copy(tiny_dir, tmp_path)
    with pytest.raises(CheckpointError, match="is inside the folder being converted"):
        C.convert(str(d / "vae"), str(d / "vae" / "vae.safetensors"))


# --- the output is checked before any weight is read --------------------------------------------------------------

def test_bad_outputs_are_refused_before_any_weight_is_read(tiny_dir, tmp_path, no_weights_read, read_only):
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.safetensors").mkdir()
    os.symlink(tmp_path / "loop_b", tmp_path / "loop_a")
    os.symlink(tmp_path / "loop_a", tmp_path / "loop_b")
    cases = [(tmp_path / "x.pt", "must be a .safetensors file"),
             (tmp_path / "folder.safetensors", "is a folder; give a file name inside it"),
             (tmp_path / "a_file" / "x.safetensors", "a_file is a file, not a folder"),
             (tmp_path / "a_file" / "sub" / "x.safetensors", "a part of the path is a file, not a folder"),
             (tmp_path / "loop_a" / "x.safetensors", "symbolic link that loops back on itself")]
    for dst, expected in cases:
        with pytest.raises(NextStepError, match=expected) as e:
            C.convert(tiny_dir, str(dst), "bf16")
        assert "\n" not in str(e.value)
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    with pytest.raises(NextStepError, match="convert: cannot write into .*ro/new: permission denied"):
        C.convert(tiny_dir, str(tmp_path / "ro" / "new" / "x.safetensors"), "bf16")
    assert sorted(os.listdir(tmp_path)) == ["a_file", "folder.safetensors", "loop_a", "loop_b", "ro"]
    assert os.listdir(tmp_path / "ro") == []  # the missing folder was not created for a refused conversion


def test_a_disk_without_room_is_refused_before_any_weight_is_read(tiny_dir, tmp_path, no_weights_read, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"needs 0\.00 GiB but .* has only 0\.00 GiB free; free some space"):
        C.convert(tiny_dir, str(tmp_path / "x.safetensors"), "bf16")
    assert os.listdir(tmp_path) == []


def test_the_planned_size_is_the_size_written(tiny_dir, tmp_path):
    for dtype in C.TARGETS:
        job = C.plan_conversion(tiny_dir, str(tmp_path / f"{dtype}.safetensors"), dtype)
        assert os.path.getsize(job.run()) == job.size


def test_a_quantised_source_is_refused_with_what_to_do(tiny_dir, tmp_path):
    q = C.convert(tiny_dir, str(tmp_path / "q.safetensors"), "int8")
    with pytest.raises(CheckpointError, match="already quantised as int8, so it cannot become fp8: convert from the "
                                              "original"):
        C.convert(q, str(tmp_path / "again.safetensors"), "fp8")
    with pytest.raises(CheckpointError, match="already an int8 file: load it as it is"):
        C.convert(q, str(tmp_path / "again.safetensors"), "int8")
    assert os.listdir(tmp_path) == ["q.safetensors"]


# --- tensor dtypes --------------------------------------------------------------------------------------------------

def _retype(shard, key: str, dtype: str, tensor: torch.Tensor | None = None):
    """Rewrites one header entry of a safetensors file (adding `key` with `tensor`'s bytes when given)."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    if tensor is not None:
        blob = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    else:
        header[key]["dtype"] = dtype
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_a_tensor_dtype_it_cannot_read_is_one_line_before_any_work(tiny_dir, tmp_path, no_weights_read):
    d = _copy(tiny_dir, tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    key = next(k for k, e in TensorReader(str(shard)).entries.items() if e["dtype"] == "F32")
    _retype(shard, key, "C64")  # complex: stored by some exporters, read by nothing here
    for dtype in ("bf16", "int8"):
        with pytest.raises(CheckpointError) as e:
            C.convert(str(d), str(tmp_path / "out" / "x.safetensors"), dtype)
        assert f"tensor {key} is stored as C64, which NextStep cannot read" in str(e.value)
        assert "\n" not in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_integer_tensors_are_kept_as_they_are(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    ids = torch.arange(7, dtype=torch.int64)
    _retype(d / "model-00002-of-00002.safetensors", "extra.position_ids", "I64", ids)
    out = C.convert(str(d), str(tmp_path / "x.safetensors"), "bf16")
    reader = TensorReader(out)
    assert reader.entries["extra.position_ids"]["dtype"] == "I64" and torch.equal(reader.get("extra.position_ids"), ids)
    assert reader.entries["layers.0.mlp.up_proj.weight"]["dtype"] == "BF16"


# --- the temporary file ---------------------------------------------------------------------------------------------

def test_disk_full_is_one_line_and_leaves_no_partial_file(tiny_dir, tmp_path, full_disk):
    full_disk(50_000)
    out = tmp_path / "new" / "x.safetensors"
    with pytest.raises(NextStepError) as e:
        C.convert(tiny_dir, str(out), "bf16")
    assert str(e.value) == f"cannot write {out}: no space left on the disk: free some space or choose another disk."
    assert os.listdir(tmp_path) == []  # neither the temporary file nor the folder made for it


@pytest.mark.parametrize("failure", ["ctrl_c", "cancel", "a folder took its name"])
def test_every_failure_removes_the_temporary_file(tiny_dir, tmp_path, failure):
    out = tmp_path / "x.safetensors"
    out.write_bytes(b"the previous file")
    seen = []

    def progress(done, total):
        seen.append(done)
        assert [p for p in os.listdir(tmp_path) if p.endswith(".part")]  # it is being written beside the target
        if failure == "ctrl_c" and done == 3:
            raise KeyboardInterrupt
        if failure == "a folder took its name" and done == 1:
            out.unlink()
            out.mkdir()

    expected = {"ctrl_c": KeyboardInterrupt, "cancel": GenerationCancelled, "a folder took its name": NextStepError}
    with pytest.raises(expected[failure]) as e:
        C.convert(tiny_dir, str(out), "bf16", progress=progress,
                  should_cancel=lambda: failure == "cancel" and len(seen) == 2)
    assert os.listdir(tmp_path) == ["x.safetensors"]
    if failure == "a folder took its name":
        assert str(e.value) == f"cannot write {out}: it is a folder, not a file."
    else:
        assert out.read_bytes() == b"the previous file"


def test_progress_counts_every_source_tensor(tiny_dir, tmp_path):
    calls = []
    job = C.plan_conversion(tiny_dir, str(tmp_path / "x.safetensors"), "int4")
    job.run(progress=lambda done, total: calls.append((done, total)))
    n = len(job.items)
    assert calls == [(i, n) for i in range(1, n + 1)]


def test_sigterm_ends_convert_like_ctrl_c_without_a_partial_file(tiny_dir, tmp_path):
    """The conversion is held inside its first tensor (a marker file says so), then sent SIGTERM."""
    marker = tmp_path / "writing"
    script = ("import pathlib, sys, time\n"
              "from nextstep_core.weights import convert\n"
              "def held(*a):\n"
              "    pathlib.Path(sys.argv[1]).touch()\n"
              "    time.sleep(120)\n"
              "convert._convert_one = held\n"
              "from nextstep_core.frontend.cli import main\n"
              "sys.exit(main(sys.argv[2:]))\n")
    out = tmp_path / "out" / "x.safetensors"
    p = subprocess.Popen([sys.executable, "-c", script, str(marker), "convert", tiny_dir, str(out)], cwd=ROOT,
                         stderr=subprocess.PIPE, text=True)
    try:
        while not marker.exists():
            assert p.poll() is None, p.stderr.read()
            threading.Event().wait(0.05)
        assert [f for f in os.listdir(out.parent) if f.endswith(".part")]
        p.send_signal(signal.SIGTERM)
        err = p.stderr.read()
        assert p.wait(timeout=60) == 143, err
    finally:
        if p.poll() is None:
            p.kill()
    assert err.strip() == "terminated" and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["writing"]  # no .part, no output, not even the folder made for it


# --- concurrent conversions to one output ---------------------------------------------------------------------------

def test_concurrent_conversions_to_one_output_leave_one_whole_file(tiny_dir, tmp_path):
    """A is held half-way while B converts to the same name from start to end; A then finishes. A's file must be
    the one left, byte for byte what A alone writes: one temporary file each, renamed whole."""
    ref = {dt: (tmp_path / f"ref_{dt}.safetensors") for dt in ("bf16", "fp32")}
    for dt, path in ref.items():
        C.convert(tiny_dir, str(path), dt)
    out = tmp_path / "shared" / "x.safetensors"
    half, b_done = threading.Event(), threading.Event()
    errors = []

    def a_progress(done, total):
        if done == total // 2:
            half.set()
            assert b_done.wait(60)

    def run(dtype, progress=None):
        try:
            C.convert(tiny_dir, str(out), dtype, progress=progress)
        except BaseException as e:  # noqa: BLE001  reported below
            errors.append(e)

    a = threading.Thread(target=run, args=("bf16", a_progress))
    a.start()
    assert half.wait(60)
    run("fp32")
    assert out.read_bytes() == ref["fp32"].read_bytes()  # B's whole file, while A is still writing its own
    b_done.set()
    a.join(60)
    assert errors == []
    assert out.read_bytes() == ref["bf16"].read_bytes()
    assert os.listdir(out.parent) == ["x.safetensors"]


def test_three_processes_racing_to_one_output(tiny_dir, tmp_path):
    """Real processes, real timing: whatever the interleaving, one complete file of one dtype is left, and each
    process reports the dtype and size of the file it wrote itself."""
    out = tmp_path / "race" / "x.safetensors"
    dtypes = ("bf16", "fp16", "fp32")
    ref = {dt: C.convert(tiny_dir, str(tmp_path / f"ref_{dt}.safetensors"), dt) for dt in dtypes}
    procs = [subprocess.Popen([sys.executable, "-m", "nextstep_core", "convert", tiny_dir, str(out), "--dtype", dt],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for dt in dtypes]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outs
    data = out.read_bytes()
    assert sum(data == open(r, "rb").read() for r in ref.values()) == 1
    for dt, (stdout, _) in zip(dtypes, outs):
        assert f"({dt}, {size_text(os.path.getsize(ref[dt]))})" in stdout
    assert os.listdir(out.parent) == ["x.safetensors"]
