"""The one model input (data/transforms.py): SAM's longest-side resize, boxes through the same
transform, the training flips named in "sam_transform", RGB or BGR channels; and
INPUT.STAIN_AUGMENT, HED stain jitter of the training images only (scikit-image's colour
deconvolution), image only — boxes unchanged, masks never read; off by default."""

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import transforms as T

from dessam_d2.data.mapper import DESSAMDatasetMapper
from dessam_d2.data.transforms import (
    IMAGE_FORMATS,
    RANDOM_FLIPS,
    HEDJitter,
    HEDJitterTransform,
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


# ------------------------------------------------------------- stain augmentation


def _mapper(is_train, **overrides):
    return DESSAMDatasetMapper(tiny_cfg(**overrides), is_train=is_train)


def test_off_by_default_and_never_at_test_time(stained_record):
    assert not any(isinstance(a, HEDJitter) for a in _mapper(True).augmentations.augs)
    on = {"INPUT.STAIN_AUGMENT": True}
    assert any(isinstance(a, HEDJitter) for a in _mapper(True, **on).augmentations.augs)
    plain = _mapper(False)(dict(stained_record))["image"]
    np.testing.assert_array_equal(_mapper(False, **on)(dict(stained_record))["image"], plain)


def test_training_jitter_changes_the_image_not_the_boxes(stained_record):
    np.random.seed(3)
    on = {"INPUT.STAIN_AUGMENT": True, "INPUT.STAIN_AUGMENT_SIGMA": 0.3}
    jittered = _mapper(True, **on)(dict(stained_record))
    plain = _mapper(True)(dict(stained_record))
    assert jittered["image"].shape == plain["image"].shape
    assert jittered["image"].dtype == plain["image"].dtype
    assert (jittered["image"].int() - plain["image"].int()).abs().float().mean() > 1.0
    assert jittered["sam_transform"].endswith("+hed")
    np.testing.assert_array_equal(
        jittered["instances"].gt_boxes.tensor.numpy(), plain["instances"].gt_boxes.tensor.numpy()
    )


def test_no_jitter_is_the_identity_and_haematoxylin_stays_haematoxylin():
    from skimage.color import hed2rgb, rgb2hed

    rng = np.random.default_rng(1)
    any_colour = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)  # green ones included
    same = HEDJitterTransform(np.ones(3), np.zeros(3)).apply_image(any_colour)
    assert np.abs(same.astype(int) - any_colour.astype(int)).max() <= 1
    # stained tissue: colours inside the three stains' gamut
    image = np.rint(hed2rgb(rng.uniform(0.0, 0.08, (16, 16, 3))) * 255).astype(np.uint8)
    darker_h = HEDJitterTransform(np.array([1.5, 1.0, 1.0]), np.zeros(3)).apply_image(image)
    before, after = rgb2hed(image), rgb2hed(darker_h)
    gain = np.median(after[..., 0] / np.where(np.abs(before[..., 0]) > 1e-3, before[..., 0], 1))
    assert gain == pytest.approx(1.5, rel=0.15)  # H scaled, E and D about unchanged
    assert np.median(np.abs(after[..., 1] - before[..., 1])) < 0.1 * np.abs(before[..., 1]).max()
    boxes = np.array([[1.0, 2.0, 5.0, 9.0]])
    np.testing.assert_array_equal(
        HEDJitterTransform(np.ones(3), np.zeros(3)).apply_box(boxes), boxes
    )
