"""Input images: one reader for every front end, every common PIL mode mapped to RGB in 0..1 as the reference does."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from nextstep_core.errors import NextStepError
from nextstep_core.frontend.images import prepare_edit_images, read_image, to_pixels


def px(image) -> np.ndarray:
    """[H,W,3] float array of what the engine makes of an image."""
    return to_pixels(image).permute(1, 2, 0).numpy()


def test_rgba_is_composited_on_white_as_the_reference_does():
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0], rgba[:, :8, 3], rgba[:, 8:, 3] = 200, 0, 128
    out = px(Image.fromarray(rgba, "RGBA")) * 255
    assert np.allclose(out[:, :8], 255)  # fully transparent -> white
    expected = (np.array([200, 0, 0]) * 128 + 255 * 127) / 255
    assert np.abs(out[:, 8:] - expected).max() <= 1


def test_gray_with_alpha_is_composited_on_white():
    la = Image.fromarray(np.stack([np.full((16, 16), 40, np.uint8), np.tile(np.array([0, 255], np.uint8), (16, 8))], -1), "LA")
    out = px(la) * 255
    assert np.allclose(out[:, 0::2], 255) and np.allclose(out[:, 1::2], 40)


def test_palette_images_with_and_without_transparency():
    p = Image.new("P", (16, 16))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.paste(1, (0, 0, 8, 16))
    assert np.allclose(px(p) * 255, np.asarray(p.convert("RGB"), np.float32))
    p.info["transparency"] = 0  # index 0 (the right half) is transparent
    out = px(p) * 255
    assert np.allclose(out[:, 8:], 255) and np.allclose(out[:, :8], [200, 100, 50])


def test_plain_modes_follow_pillow():
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8))
    assert px(rgb).shape == (16, 32, 3)
    assert np.array_equal(px(rgb) * 255, np.asarray(rgb, np.float32))
    gray = rgb.convert("L")
    assert np.array_equal(px(gray)[..., 1] * 255, np.asarray(gray, np.float32))
    cmyk = rgb.convert("CMYK")
    assert np.array_equal(px(cmyk) * 255, np.asarray(cmyk.convert("RGB"), np.float32))


def test_16_bit_gray_keeps_its_range_instead_of_clipping_to_white(tmp_path):
    ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I;16")  # what Pillow makes of a 16-bit grayscale PNG
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (3, 32, 32)
    assert torch.allclose(out[0], torch.from_numpy(ramp / 65535).float(), atol=1e-6)
    assert abs(out.mean().item() - 0.5) < 0.01  # Pillow's convert("RGB") would give 1.0 almost everywhere
    as_i = Image.fromarray(ramp.astype(np.int32))  # mode I, as older Pillow opens 16-bit PNGs
    assert np.allclose(px(as_i)[..., 0], ramp / 65535, atol=1e-6)


def test_32_bit_and_float_gray():
    wide = Image.fromarray(np.array([[-1000, 0], [1000, 3000]] * 8, np.int32).repeat(8, 1))  # not 16-bit data
    out = px(wide)[..., 0]
    assert out.min() == 0 and out.max() == 1 and np.isclose(out[0, 8], 0.25)
    unit = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    assert np.allclose(px(Image.fromarray(unit, "F"))[..., 2], unit)
    with pytest.raises(NextStepError, match="NaN or infinite"):
        to_pixels(Image.fromarray(np.full((16, 16), np.nan, np.float32), "F"))


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (32, 16), (255, 0, 0))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "photo.jpg", exif=exif)
    assert read_image(str(tmp_path / "photo.jpg")).shape == (3, 32, 16)


def test_unreadable_files_are_one_clear_error(tmp_path):
    with pytest.raises(NextStepError, match="no such file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(NextStepError, match="not an image format"):
        read_image(tmp_path / "notes.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(NextStepError, match="truncated or corrupt"):
        read_image(tmp_path / "cut.png")


def test_tensors_from_comfyui_and_uint8():
    hwc = torch.rand(32, 16, 3)
    assert torch.equal(to_pixels(hwc), hwc.permute(2, 0, 1))
    assert torch.equal(to_pixels(torch.full((3, 16, 16), 255, dtype=torch.uint8)), torch.ones(3, 16, 16))
    with pytest.raises(NextStepError, match="NaN"):
        to_pixels(torch.full((3, 16, 16), float("nan")))


def test_edit_images_are_checked_before_encoding(tmp_path):
    Image.new("RGB", (48, 40)).save(tmp_path / "odd.png")
    with pytest.raises(NextStepError, match=r"input image 0 is 48x40.*multiples of 16.*e\.g\. to 48x32"):
        prepare_edit_images([tmp_path / "odd.png"], 1)
    with pytest.raises(NextStepError, match=r"2 input image\(s\) for 1 prompt"):
        prepare_edit_images([torch.rand(3, 16, 16)] * 2, 1)
    out = prepare_edit_images([Image.new("RGBA", (32, 16)), torch.rand(1, 3, 16, 16)], 2)
    assert [tuple(p.shape) for p in out] == [(3, 16, 32), (3, 16, 16)]


def test_an_image_larger_than_any_supported_size_is_refused_from_its_header(tmp_path, monkeypatch):
    Image.new("1", (9472, 9472)).save(tmp_path / "huge.png")  # a small file that decodes to 90 M pixels
    Image.new("RGB", (4112, 16)).save(tmp_path / "wide.png")
    assert os.path.getsize(tmp_path / "huge.png") < 100_000
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("the pixels were decoded"))
    with pytest.raises(NextStepError, match=r"huge.png is 9472x9472; no side may be above 4096 pixels"):
        read_image(tmp_path / "huge.png")
    with pytest.raises(NextStepError, match=r"wide.png is 4112x16; no side may be above 4096"):
        prepare_edit_images([tmp_path / "wide.png"], 1)
