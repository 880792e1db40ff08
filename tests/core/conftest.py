"""Fixtures of the engine's tests that stand in for what this machine cannot do on demand: a full disk, and a
check that nothing heavy is loaded before the input has been refused."""
from __future__ import annotations

import errno

import pytest


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model or VAE starts loading: bad input must be refused before that."""
    from nextstep_core.weights import loading, vae_files

    def refuse(*a, **k):
        raise AssertionError("weights were read before the input was checked")

    monkeypatch.setattr(loading, "load_model", refuse)
    monkeypatch.setattr(vae_files, "load_vae", refuse)


class _FullDisk:
    """A file on a disk that fills up after `room` bytes: write raises ENOSPC, as a real full disk answers."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(memoryview(b).cast("B"))
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """full_disk(room): files written whole (fs.write_atomic) find the disk full after `room` bytes."""
    from nextstep_core import fs

    def fill(room: int):
        real = fs.os.fdopen
        monkeypatch.setattr(fs.os, "fdopen", lambda fd, mode: _FullDisk(real(fd, mode), room))
    return fill


@pytest.fixture
def read_only(monkeypatch):
    """read_only(folder): creating a file in `folder` fails with EACCES where fs probes it (root may write anywhere,
    so the denial is simulated where it surfaces)."""
    from nextstep_core import fs

    def deny(folder):
        real = fs.tempfile.TemporaryFile

        def probe(*a, dir=None, **k):
            if str(dir) == str(folder):
                raise PermissionError(errno.EACCES, "Permission denied", str(dir))
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(fs.tempfile, "TemporaryFile", probe)
    return deny
