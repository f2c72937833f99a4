"""The synthetic fluorescence set standing in for a lab's own small box set: unlike the demo's
cytology (dark background, bright nuclei, other sizes, clusters), laid out as CVAT exports boxes,
read by ``train_net --dataset`` as it is, masks kept apart for scoring."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest

from dessam_d2.data.converters.user_datasets import boxes_only, check_coco_file
from dessam_d2.data.synthetic.fluorescence import (
    generate_fluorescence_dataset,
    make_user_fluorescence_set,
    render_fluorescence_image,
)
from dessam_d2.errors import UsageError


def test_render_is_a_dark_field_with_bright_annotated_nuclei():
    rgb, masks = render_fluorescence_image(np.random.default_rng(3))
    assert rgb.shape == (320, 400, 3) and rgb.dtype == np.uint8
    assert 15 <= len(masks) <= 27
    blue = rgb[..., 2].astype(float)
    inside = np.any(masks, axis=0)
    assert blue[inside].mean() > 2.5 * blue[~inside].mean()  # bright on dark
    assert blue[~inside].mean() < 40
    assert not np.any(np.sum(masks, axis=0) > 1)  # packed nuclei share borders, never pixels
    areas = sorted(int(m.sum()) for m in masks)
    assert areas[-1] > 4 * areas[0]  # sizes spread well beyond the demo's


def test_dataset_is_deterministic_cvat_boxes_and_separate_masks(tmp_path):
    a = generate_fluorescence_dataset(str(tmp_path / "a"), 2, seed=5)
    b = generate_fluorescence_dataset(str(tmp_path / "b"), 2, seed=5)
    for x, y in zip(a, b):
        assert open(x).read() == open(y).read()
    boxes, masks = json.load(open(a[0])), json.load(open(a[1]))
    assert set(boxes) >= {"licenses", "info", "categories", "images", "annotations"}
    assert all(ann["segmentation"] == [] for ann in boxes["annotations"])  # boxes only
    assert boxes_only(boxes)
    assert len(boxes["annotations"]) == len(masks["annotations"])
    for box, true in zip(boxes["annotations"], masks["annotations"]):
        mask = mask_util.decode({**true["segmentation"], "counts": true["segmentation"]["counts"]})
        ys, xs = np.nonzero(mask)
        assert box["bbox"] == pytest.approx([xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1])
    image = cv2.imread(str(tmp_path / "a" / "images" / boxes["images"][0]["file_name"]))
    assert image.shape == (320, 400, 3)
    check_coco_file("fl", a[0], str(tmp_path / "a" / "images"))  # what --dataset reads


def test_user_set_splits_do_not_share_images_or_names(tmp_path):
    paths = make_user_fluorescence_set(str(tmp_path), num_train=3, num_test=1)
    train = json.load(open(paths["train_boxes"]))
    test = json.load(open(paths["test_boxes"]))
    names = [im["file_name"] for im in train["images"] + test["images"]]
    assert len(set(names)) == 4
    assert 60 <= len(train["annotations"]) <= 81  # ~25 boxes a field, ~100 in all
    with pytest.raises(UsageError, match="num_images"):
        generate_fluorescence_dataset(str(tmp_path / "x"), 0)
    with pytest.raises(UsageError, match="channel"):
        render_fluorescence_image(np.random.default_rng(0), channel="red")
