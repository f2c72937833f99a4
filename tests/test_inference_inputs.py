"""What to predict: files, folders and globs, slides apart from images."""

import cv2
import numpy as np
import pytest

from dessam_d2.data.synthetic.slide import write_synthetic_slide
from dessam_d2.inference.inputs import collect_images, split_slides


def test_no_images_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images found"):
        collect_images([str(tmp_path / "*.png")])


def test_folders_and_globs_put_pyramidal_tiffs_with_the_slides(tmp_path):
    write_synthetic_slide(str(tmp_path / "slide.tif"), (256, 256), seed=1, mpp=0.5)
    for name in ("b.png", "a.tif"):
        cv2.imwrite(str(tmp_path / name), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "notes.txt").write_text("")
    slide, a, b = (str(tmp_path / n) for n in ("slide.tif", "a.tif", "b.png"))
    assert split_slides([str(tmp_path)]) == ([slide], [a, b])
    assert split_slides([str(tmp_path / "*.tif"), b, "missing.png"]) == (
        [slide],
        [a, b, "missing.png"],
    )
    assert collect_images([str(tmp_path)]) == [a, b, slide]  # images only: slides are images
    with pytest.raises(FileNotFoundError, match="no images found"):
        split_slides([str(tmp_path / "*.jpg")])
