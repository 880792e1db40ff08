"""Output files are checked before any work and written whole or not at all."""
import os

import pytest

from nextstep_core.errors import NextStepError
from nextstep_core.fs import write_atomic
from nextstep_core.frontend.outputs import image_outputs, latents_output


def test_an_interrupted_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    target = tmp_path / "out.png"
    target.write_bytes(b"previous image")

    def half_then_ctrl_c(f):
        f.write(b"half of a new ima")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(target), half_then_ctrl_c)
    assert target.read_bytes() == b"previous image" and os.listdir(tmp_path) == ["out.png"]
    write_atomic(str(target), lambda f: f.write(b"new image"))
    assert target.read_bytes() == b"new image" and os.listdir(tmp_path) == ["out.png"]
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~_umask()  # not the private mode of a temporary file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_image_paths_formats_and_numbering(tmp_path):
    assert image_outputs(str(tmp_path / "a.png"), 1) == [(str(tmp_path / "a.png"), "PNG")]
    assert image_outputs(str(tmp_path / "sub" / "a"), 1) == [(str(tmp_path / "sub" / "a.png"), "PNG")]
    assert not os.path.exists(tmp_path / "sub")  # probed, not created: a command that fails later leaves no folder
    assert image_outputs(str(tmp_path / "b.JPG"), 2) == [(str(tmp_path / f"b_{i:03d}.JPG"), "JPEG") for i in (0, 1)]
    assert image_outputs(str(tmp_path / "c.webp"), 1)[0][1] == "WEBP"


@pytest.mark.parametrize("name,expected", [("x.txt", "not an image file type"), ("x.npz", "not an image file type")])
def test_unknown_image_types_are_refused(tmp_path, name, expected):
    with pytest.raises(NextStepError, match=expected):
        image_outputs(str(tmp_path / name), 1)


def test_latents_need_npz_and_a_writable_folder(tmp_path):
    assert latents_output(str(tmp_path / "z.npz")) == str(tmp_path / "z.npz")
    with pytest.raises(NextStepError, match="give a .npz file name"):
        latents_output(str(tmp_path / "z.npy"))
    (tmp_path / "f").write_text("")
    with pytest.raises(NextStepError, match="cannot write into"):
        latents_output(str(tmp_path / "f" / "z.npz"))


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(NextStepError, match="cannot write into"):
        image_outputs(str(ro / "x.png"), 1)
