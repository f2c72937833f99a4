"""read_image_rgb: any input layout becomes H x W x 3 uint8 RGB; bad files give one-line errors."""

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from dessam_d2.data.image_io import read_image_rgb, to_uint8
from dessam_d2.errors import ImageNotFoundError, ImageReadError


def _ramp_rgb(h: int = 6, w: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_rgb_png_is_returned_unchanged(tmp_path):
    rgb = _ramp_rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = read_image_rgb(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 5, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_repeated_to_three_channels(tmp_path):
    gray = _ramp_rgb()[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.png")
    out = read_image_rgb(str(tmp_path / "g.png"))
    assert out.shape == (6, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_rgba_drops_alpha_without_compositing(tmp_path):
    rgba = np.dstack([_ramp_rgb(), np.full((6, 5), 7, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "a.png"), rgba[..., :3])


def test_16bit_png_is_min_max_scaled_per_image(tmp_path):
    gray16 = np.array([[1000, 2000], [3000, 3000]], np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), gray16)
    out = read_image_rgb(tmp_path / "g16.png")
    # (v - 1000) / 2000 * 255: 0, 127.5 -> 128 (round half to even), 255
    np.testing.assert_array_equal(out[..., 0], [[0, 128], [255, 255]])
    np.testing.assert_array_equal(out[..., 2], out[..., 0])


def test_16bit_rgb_tiff_scales_all_channels_together(tmp_path):
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[0, 0] = (100, 200, 300)
    rgb16[1, 1] = (500, 500, 500)
    tifffile.imwrite(tmp_path / "c.tif", rgb16)
    out = read_image_rgb(tmp_path / "c.tif")
    # min 0, max 500 over all channels: colour balance is kept
    np.testing.assert_array_equal(out[0, 0], [51, 102, 153])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])


def test_16bit_rgba_png_keeps_all_16_bits(tmp_path):
    rgba16 = np.zeros((2, 2, 4), np.uint16)
    rgba16[0, 0, :3] = (100, 200, 300)
    rgba16[1, 1, :3] = 500
    rgba16[..., 3] = 65535  # alpha is dropped before scaling
    cv2.imwrite(str(tmp_path / "c16.png"), rgba16[..., [2, 1, 0, 3]])  # OpenCV writes BGRA
    out = read_image_rgb(tmp_path / "c16.png")
    np.testing.assert_array_equal(out[0, 0], [51, 102, 153])
    np.testing.assert_array_equal(out[1, 1], [255, 255, 255])


def test_channel_first_float_tiff(tmp_path):
    chw = np.zeros((3, 4, 6), np.float32)
    chw[1, 2, 3] = 0.5
    chw[2, 0, 0] = 1.0
    tifffile.imwrite(tmp_path / "f.tiff", chw)
    out = read_image_rgb(tmp_path / "f.tiff")
    assert out.shape == (4, 6, 3)
    assert out[2, 3, 1] == 128 and out[0, 0, 2] == 255 and out.sum() == 128 + 255


def test_to_uint8_constant_nan_and_bool():
    np.testing.assert_array_equal(to_uint8(np.full((2, 2), 9.0)), np.zeros((2, 2)))
    np.testing.assert_array_equal(to_uint8(np.array([np.nan, 0.0, 2.0])), [0, 0, 255])
    np.testing.assert_array_equal(to_uint8(np.array([True, False])), [255, 0])


def test_jpeg_keeps_colours_approximately(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:] = (200, 40, 90)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    out = read_image_rgb(tmp_path / "a.jpg").astype(int)
    assert np.abs(out - rgb).max() <= 3


def test_missing_file(tmp_path):
    with pytest.raises(ImageNotFoundError, match="nope.png: image file not found") as info:
        read_image_rgb(tmp_path / "nope.png")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty.jpg: image file is empty \(0 bytes\)"):
        read_image_rgb(tmp_path / "empty.jpg")


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif", ".tiff"])
def test_truncated_file(tmp_path, suffix):
    path = tmp_path / f"full{suffix}"
    pixels = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    if suffix == ".tiff":  # tifffile puts the page directory first, OpenCV last
        tifffile.imwrite(path, pixels)
    else:
        cv2.imwrite(str(path), pixels)
    data = path.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=f"cut{suffix}: cannot decode image") as info:
        read_image_rgb(cut)
    assert "\n" not in str(info.value)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageReadError, match="notes.png: cannot decode image"):
        read_image_rgb(tmp_path / "notes.png")


def test_volume_tiff_is_rejected(tmp_path):
    tifffile.imwrite(tmp_path / "z.tif", np.zeros((5, 8, 8), np.uint8))
    with pytest.raises(ImageReadError, match=r"z.tif: unsupported image layout \(5, 8, 8\)"):
        read_image_rgb(tmp_path / "z.tif")
