
import cv2
import numpy as np
import pytest
from PIL import Image

from pipeline.images import ImageReadError, read_image_rgb


def test_png_rgb_order_and_unicode_path_with_spaces(tmp_path):
    bgr = np.zeros((3, 4, 3), np.uint8)
    bgr[..., 0] = 255  # blue in OpenCV's order
    path = tmp_path / "dir with spaces" / "bild ü 1.png"
    path.parent.mkdir()
    path.write_bytes(cv2.imencode(".png", bgr)[1].tobytes())
    rgb = read_image_rgb(path)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize(
    "array",
    [
        np.full((5, 6), 77, np.uint8),  # grayscale
        np.dstack([np.full((5, 6, 3), 77, np.uint8), np.zeros((5, 6), np.uint8)]),  # RGBA
        np.full((5, 6, 3), 77 * 257, np.uint16),  # 16-bit
    ],
    ids=["gray", "rgba", "16bit"],
)
def test_gray_rgba_16bit_become_8bit_rgb(tmp_path, array):
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), array)
    rgb = read_image_rgb(path)
    assert rgb.shape == (5, 6, 3) and rgb.dtype == np.uint8
    assert np.all(rgb == 77)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))  # 10 high, 20 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    path = tmp_path / "r.jpg"
    img.save(path, exif=exif.tobytes())
    assert read_image_rgb(path).shape == (20, 10, 3)


def test_huge_image_is_downscaled_to_max_side(tmp_path):
    path = tmp_path / "big.png"
    cv2.imwrite(str(path), np.zeros((300, 1200, 3), np.uint8))
    assert read_image_rgb(path, max_side=400).shape == (100, 400, 3)
    assert read_image_rgb(path, max_side=2000).shape == (300, 1200, 3)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty file"), (b"hello, not an image", "not a decodable image")],
)
def test_unreadable_files_raise_short_reason(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason):
        read_image_rgb(path)


def test_truncated_png_raises(tmp_path):
    buf = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))[1]
    path = tmp_path / "t.png"
    path.write_bytes(buf.tobytes()[: len(buf) // 2])
    with pytest.raises(ImageReadError):
        read_image_rgb(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(ImageReadError, match="cannot read file"):
        read_image_rgb(tmp_path / "nope.png")
