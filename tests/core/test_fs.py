"""File-system faults are named as themselves, with the file: one line, never "truncated or corrupt, download it
again", never "no such file" for a folder or a link loop, never a traceback; a failed command leaves no folders.

This machine runs the tests as root, which no permission bit stops, so "permission denied" is simulated where the
system reports it (open, stat, listdir raise PermissionError for paths under one folder); link loops, folders in
place of files and the folders a command creates are real. `test_real_permissions` runs where the tests are not
root.
"""
from __future__ import annotations

import builtins
import errno
import os
import re
import shutil

import pytest
from PIL import Image

import nextstep_core as ns
from nextstep_core import fs
from nextstep_core.errors import CheckpointError, NextStepError

PERMISSION = "permission denied: the user running this has no read access to it or to a folder on its path"


@pytest.fixture
def model(tiny_dir, tmp_path):
    d = tmp_path / "NextStep-copy"
    shutil.copytree(tiny_dir, d)
    return d


@pytest.fixture
def deny(monkeypatch):
    """deny(path): fail as for a user without rights: a file (mode 000) cannot be opened; a folder (mode 000) cannot
    be listed, and nothing in it opened or stat'ed."""
    def install(path):
        path = os.fspath(path)

        def guard(real, also_itself: bool):
            def call(p, *a, **k):
                q = os.fspath(p) if isinstance(p, (str, os.PathLike)) else ""
                if q.startswith(path + os.sep) or (also_itself and q == path):
                    raise PermissionError(errno.EACCES, "Permission denied", q)
                return real(p, *a, **k)
            return call

        if os.path.isdir(path):
            monkeypatch.setattr(builtins, "open", guard(builtins.open, False))
            monkeypatch.setattr(os, "stat", guard(os.stat, False))
            monkeypatch.setattr(os, "listdir", guard(os.listdir, True))
        else:
            monkeypatch.setattr(builtins, "open", guard(builtins.open, True))
    return install


def run_main(capsys, *argv) -> tuple[int, str]:
    from nextstep_core.frontend.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return code, errors[0]


# --- reading --------------------------------------------------------------------------------------------------------

def test_an_unreadable_config_says_permission_denied(model, deny, capsys):
    deny(model / "config.json")  # the file itself: open fails, as for mode 000
    with pytest.raises(CheckpointError) as e:
        ns.load_model(str(model))
    assert str(e.value) == f"cannot read {model / 'config.json'}: {PERMISSION} (check its owner and permissions)."


def test_an_unreadable_shard_is_not_called_corrupt(model, deny):
    shard = model / "model-00002-of-00002.safetensors"
    deny(shard)
    with pytest.raises(CheckpointError) as e:
        ns.load_model(str(model))
    assert str(e.value).startswith(f"cannot read {shard}: {PERMISSION}")
    assert "corrupt" not in str(e.value) and "download" not in str(e.value)


def test_an_unreadable_vae_folder_is_not_a_missing_one(model, deny, capsys, tmp_path):
    deny(model / "vae")
    code, line = run_main(capsys, "generate", "--model", model, "--prompt", "x", "-o", tmp_path / "x.png")
    assert code == 2 and line.startswith(f"error: cannot read {model / 'vae' / 'config.json'}: {PERMISSION}")
    with pytest.raises(CheckpointError, match=f"cannot read {model / 'vae' / 'config.json'}: permission denied"):
        ns.load_vae(str(model / "vae"))


def test_a_symlink_loop_is_named_as_one(model, tmp_path, capsys):
    loop = re.escape("it is a symbolic link that loops back on itself (too many levels of symbolic links)")
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    code, line = run_main(capsys, "info", tmp_path / "a")
    expected = f"error: cannot read {tmp_path / 'a'}: {loop}: point the link at the real file\\."
    assert code == 2 and re.fullmatch(expected, line)
    with pytest.raises(CheckpointError, match=f"cannot read {tmp_path / 'a'}: {loop}"):
        ns.load_model(str(tmp_path / "a"))
    with pytest.raises(CheckpointError, match=f"cannot read {tmp_path / 'a'}: {loop}"):
        ns.load_vae(str(tmp_path / "a"))
    shard = model / "model-00001-of-00002.safetensors"
    shard.unlink()
    os.symlink(shard, shard)  # a link to itself
    with pytest.raises(CheckpointError, match=f"cannot read {shard}: {loop}"):
        ns.load_model(str(model))
    (model / "config.json").unlink()
    os.symlink(model / "config.json", model / "config.json")
    with pytest.raises(CheckpointError, match=f"cannot read {model / 'config.json'}: {loop}"):
        ns.load_model(str(model))


def test_a_folder_in_place_of_a_file_is_not_missing(model, tmp_path, capsys):
    shard = model / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.mkdir()
    with pytest.raises(CheckpointError) as e:
        ns.load_model(str(model))
    assert str(e.value) == f"cannot read {shard}: it is a folder, not a file."
    (tmp_path / "photo.png").mkdir()
    code, line = run_main(capsys, "generate", "--model", model, "--prompt", "x", "--edit-image",
                          tmp_path / "photo.png", "-o", tmp_path / "x.png")
    assert code == 2 and line == f"error: cannot read the image {tmp_path / 'photo.png'}: it is a folder, not a file."


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads everything")
def test_real_permissions(model):
    (model / "config.json").chmod(0)
    with pytest.raises(CheckpointError, match="config.json: permission denied"):
        ns.load_model(str(model))


# --- writing --------------------------------------------------------------------------------------------------------

def _generate(model, out, *more):
    return ("generate", "--model", model, "--prompt", "x", "--width", "16", "--height", "16", "--steps", "1",
            "--dtype", "float32", "-o", out, *more)


def test_a_full_disk_when_writing_an_image(model, tmp_path, capsys, full_disk):
    full_disk(100)
    out = tmp_path / "out" / "x.png"
    code, line = run_main(capsys, *_generate(model, out))
    assert code == 2 and line == f"error: cannot write {out}: no space left on the disk: free some space or choose " \
                                 "another disk."
    assert not (tmp_path / "out").exists()  # no .part, and not the folder made for it


def test_a_folder_that_cannot_be_written_is_refused_before_loading(model, tmp_path, capsys, monkeypatch,
                                                                    read_only):
    from nextstep_core.weights import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    code, line = run_main(capsys, *_generate(model, tmp_path / "a" / "x.png"))
    assert code == 2 and line.startswith("error: -o: cannot write") and "a symbolic link that loops back" in line
    (tmp_path / "ro").mkdir()
    read_only(tmp_path / "ro")
    code, line = run_main(capsys, *_generate(model, tmp_path / "ro" / "new" / "x.png"))
    assert code == 2 and line == f"error: -o: cannot write into {tmp_path / 'ro' / 'new'}: permission denied: the " \
                                 "user running this has no write access to it or to a folder on its path (check " \
                                 "its owner and permissions)."


def test_a_failed_command_creates_no_output_folders(model, tmp_path, capsys):
    shard = model / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:1000])  # fails while loading, after every input was checked
    code, line = run_main(capsys, *_generate(model, tmp_path / "a" / "b" / "x.png", "--save-latents",
                                             tmp_path / "c" / "z.npz"))
    assert code == 2 and "truncated or corrupt" in line
    assert sorted(os.listdir(tmp_path)) == ["NextStep-copy"]


def test_write_atomic_names_the_file_and_the_cause(tmp_path, monkeypatch):
    real = os.open

    def denied(path, *a, **k):  # creating files in new/ fails, as in a folder the user may not write to
        if os.fspath(path).startswith(str(tmp_path / "new")):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(NextStepError) as e:
        fs.write_atomic(str(tmp_path / "new" / "x.png"), lambda f: f.write(b"x"))
    assert str(e.value) == f"cannot write {tmp_path / 'new' / 'x.png'}: permission denied: the user running this " \
                           "has no write access to it or to a folder on its path (check its owner and permissions)."
    assert os.listdir(tmp_path) == []


def test_an_unreadable_edit_image_is_not_called_corrupt(tmp_path, deny):
    from nextstep_core.frontend.images import read_image

    Image.new("RGB", (16, 16)).save(tmp_path / "p.png")
    deny(tmp_path)
    with pytest.raises(NextStepError) as e:
        read_image(str(tmp_path / "p.png"))
    assert str(e.value).startswith(f"cannot read the image {tmp_path / 'p.png'}: permission denied")
