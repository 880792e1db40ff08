"""Output files: checked before any work starts, written so that an interrupt never leaves half a file.

    outputs = image_outputs("out/fox.png", n)      # [(path, PIL format)], folder created and probed for writing
    write_atomic(path, lambda f: image.save(f, format=fmt))
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile

from ..errors import NextStepError

DEFAULT_IMAGE_EXT = ".png"


def _image_format(ext: str) -> str:
    """The PIL format that saves files with this extension, checked to take an RGB image."""
    from PIL import Image

    fmt = Image.registered_extensions().get(ext.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise NextStepError(f"{ext!r} is not an image file type Pillow can write: use .png, .jpg or .webp.")
    try:
        Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)
    except (OSError, ValueError, KeyError) as e:
        raise NextStepError(f"Pillow cannot write RGB images as {fmt} ({e}): use .png, .jpg or .webp.") from None
    return fmt


def _writable_folder(path: str, flag: str) -> str:
    """`path` made absolute, its folder created and probed with a real file (access() lies for root and ACLs)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(path):
        raise NextStepError(f"{flag} {path} is a folder; give a file name inside it.")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise NextStepError(f"{flag}: cannot write into {folder} ({e.strerror or e}); choose another folder.") from None
    return path


def image_outputs(path: str, count: int) -> list[tuple[str, str]]:
    """(path, format) for `count` images: `path` itself for one, numbered `stem_000.ext`... for several.

    No extension means PNG (`.png` is added).
    """
    path = _writable_folder(path, "-o")
    stem, ext = os.path.splitext(path)
    if not ext:
        stem, ext = path, DEFAULT_IMAGE_EXT
    fmt = _image_format(ext)
    if count == 1:
        return [(stem + ext, fmt)]
    return [(f"{stem}_{i:03d}{ext}", fmt) for i in range(count)]


def latents_output(path: str) -> str:
    if not path.lower().endswith(".npz"):
        raise NextStepError(f"--save-latents {path}: the latents are written as a NumPy archive; give a .npz file "
                            "name.")
    return _writable_folder(path, "--save-latents")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str, write) -> None:
    """`write(binary file)` into a temporary file beside `path`, then rename it over `path` in one step."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; the result gets the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
