"""The one model input (data/transforms.py): SAM's longest-side resize, boxes through the same
transform, the training flips named in "sam_transform", RGB or BGR channels."""

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T

from dessam_d2.data.transforms import (
    IMAGE_FORMATS,
    RANDOM_FLIPS,
    flip_augmentations,
    sam_model_input,
)


def _image(h, w):
    image = np.zeros((h, w, 3), np.uint8)
    image[..., 0] = 255  # pure red: the channel order shows
    image[0, 0] = (1, 2, 3)  # a marked corner: flips show
    return image


@pytest.mark.parametrize("size, expected", [((100, 200), (32, 64)), ((300, 30), (64, 6))])
def test_longest_side_becomes_image_size_and_boxes_follow(size, expected):
    boxes = np.array([[0, 0, size[1], size[0]], [10, 20, 30, 40]], np.float64)
    out, moved = sam_model_input(_image(*size), 64, boxes=boxes)
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, *expected)
    assert (out["height"], out["width"], out["sam_transform"]) == (*size, "longest64")
    scale = expected[1] / size[1], expected[0] / size[0]
    np.testing.assert_allclose(moved[0], [0, 0, expected[1], expected[0]])
    np.testing.assert_allclose(
        moved[1], [10 * scale[0], 20 * scale[1], 30 * scale[0], 40 * scale[1]]
    )


def test_no_boxes_give_none_and_bgr_reverses_the_channels():
    rgb, boxes = sam_model_input(_image(100, 200), 64)
    bgr, _ = sam_model_input(_image(100, 200), 64, "BGR")
    assert boxes is None and rgb["image"][0].max() == 255 and rgb["image"][2].max() < 255
    assert torch.equal(bgr["image"], rgb["image"].flip(0))


def test_flips_move_the_image_and_the_boxes_and_are_named():
    both = T.AugmentationList(
        [T.RandomFlip(prob=1.0, horizontal=True, vertical=False)]
        + [T.RandomFlip(prob=1.0, horizontal=False, vertical=True)]
    )
    out, moved = sam_model_input(
        _image(64, 64), 64, augmentations=both, boxes=np.array([[0, 0, 8, 4.0]])
    )
    assert out["sam_transform"] == "longest64+hflip+vflip"
    assert out["image"][:, -1, -1].tolist() == [1, 2, 3]  # the corner went to the other corner
    np.testing.assert_allclose(moved, [[56, 60, 64, 64]])


def test_flip_choices():
    assert IMAGE_FORMATS == ("RGB", "BGR")
    counts = {name: len(flip_augmentations(name)) for name in RANDOM_FLIPS}
    assert counts == {"none": 0, "horizontal": 1, "vertical": 1, "both": 2}
    assert all(a.prob == 0.5 for a in flip_augmentations("both"))
