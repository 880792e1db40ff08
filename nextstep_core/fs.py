"""The file system in the engine's words: faults named with their real cause, files written whole or not at all.

    raise fs_error("read", path, e)                    # "cannot read PATH: permission denied (...)"
    check_writable(folder)                             # before any work: can a file be created there?
    write_atomic(path, lambda f: image.save(f, format="PNG"))

Invariants: a message never blames the file's contents (truncated, corrupt) for a fault of the file system; a write
either replaces `path` with the whole new file in one rename or leaves everything as it was, with no temporary file
and no folder it created left behind, on any exception, Ctrl-C and (where the front end turns it into an exception)
SIGTERM included.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile

from .errors import NextStepError

_CAUSES = {
    errno.EACCES: "permission denied: the user running this has no {access} access to it or to a folder on its "
                  "path (check its owner and permissions)",
    errno.EPERM: "operation not permitted: the user running this has no {access} access to it (check its owner "
                 "and permissions)",
    errno.EROFS: "the file system is read-only: choose a folder on a writable disk",
    errno.ELOOP: "it is a symbolic link that loops back on itself (too many levels of symbolic links): point the "
                 "link at the real file",
    errno.EISDIR: "it is a folder, not a file",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.ENOENT: "there is no such file or folder",
    errno.ENOSPC: "no space left on the disk: free some space or choose another disk",
    errno.EIO: "input/output error: the disk or network share failed; check it and try again",
    errno.ENAMETOOLONG: "the file name is too long",
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _CAUSES[errno.EDQUOT] = "the disk quota is exceeded: free some space or choose another disk"


def cause(e: OSError, access: str = "read") -> str:
    """What went wrong, in words, from the error's errno (its own text where the errno is not one of ours)."""
    text = _CAUSES.get(e.errno)
    if text:
        return text.format(access=access)
    return e.strerror or str(e) or type(e).__name__


def fs_error(action: str, path, e: OSError, cls=NextStepError) -> NextStepError:
    """One-line error for `action` ("read", "write", ...) on `path` failing with `e`."""
    return cls(f"cannot {action} {path}: {cause(e, 'write' if action == 'write' else 'read')}.")


def is_file(path: str, cls=NextStepError) -> bool:
    """`os.path.isfile` that tells "nothing there" (False) from a fault (raised as `cls`): a folder it cannot
    enter, a symbolic link loop. Plain `isfile` says False for those too, and a missing-file message follows."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:
        raise fs_error("read", path, e, cls) from None
    return os.path.isfile(path)


def list_folder(path: str, cls=NextStepError) -> list[str]:
    """`os.listdir`, its faults raised as `cls` with their real cause."""
    try:
        return os.listdir(path)
    except OSError as e:
        raise fs_error("read", path, e, cls) from None


def _nearest_existing(folder: str) -> str:
    """The folder itself or its closest existing ancestor (what a new file or subfolder would be created in)."""
    while True:
        try:
            os.stat(folder)
            return folder
        except FileNotFoundError:
            parent = os.path.dirname(folder)
            if parent == folder:
                return folder
            folder = parent


def check_writable(folder: str, label: str = "") -> str:
    """Raises NextStepError unless a file can be created in `folder` (existing, or creatable from its nearest
    existing ancestor); returns that existing folder. Creates nothing that stays: it is probed with a real
    temporary file, because `os.access` is wrong for root, ACLs and read-only mounts."""
    try:
        base = _nearest_existing(folder)
        if not os.path.isdir(base):
            raise NextStepError(f"{label}cannot write into {folder}: {base} is a file, not a folder; choose another "
                                "folder.")
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise NextStepError(f"{label}cannot write into {folder}: {cause(e, 'write')}.") from None
    return base


def _make_folders(folder: str) -> list[str]:
    """Creates `folder` and its missing parents; returns those it created, outermost first."""
    made = []
    while not os.path.isdir(folder):
        made.insert(0, folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    for d in made:
        os.mkdir(d)
    return made


def _create_beside(path: str) -> tuple[int, str]:
    """A new file `.NAME.XXXXXXXX.part` beside `path`, opened for writing; its mode is 0o666 less the umask, as for any
    new file (mkstemp's private 0o600 would need a chmod, and reading the umask means setting it, which races with
    other threads of a server)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{secrets.token_hex(4)}.part")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def write_atomic(path: str, write) -> None:
    """`write(binary file)` into a temporary file beside `path` (unique to this call), then rename it over `path`.

    Missing folders are created and removed again if the write fails. An OSError (disk full, permission denied,
    a folder where the file should be) becomes a one-line NextStepError naming `path`; so `write` must turn faults
    of anything it reads into errors of its own first.
    """
    path = os.path.abspath(path)
    made = []
    tmp = None
    try:
        made = _make_folders(os.path.dirname(path))
        fd, tmp = _create_beside(path)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for d in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(d)  # only empty: never a folder something else has put files into meanwhile
        if isinstance(e, OSError):
            raise fs_error("write", path, e) from None
        raise
