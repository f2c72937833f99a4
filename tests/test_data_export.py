"""A user's corrected boxes exported as a box set that train_net --dataset reads as it is."""

import json
import os

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from plugin_fixtures import field

from dessam_d2.data.converters.user_datasets import register_user_datasets
from dessam_d2.data.export import export_box_set
from dessam_d2.errors import DatasetFormatError, UsageError


def test_export_is_a_box_set_train_net_reads(tmp_path):
    image, boxes, masks = field()
    labels = np.zeros(image.shape[:2], np.int32)
    for k, m in enumerate(masks):
        labels[m & (labels == 0)] = k + 1
    folder = str(tmp_path / "set")
    path = export_box_set(folder, "a", image, boxes, labels=labels)
    export_box_set(folder, "b", image[:, ::-1].copy(), boxes[:2])
    path = export_box_set(folder, "a", image, boxes[:3], labels=labels)  # replaces a's entry
    coco = json.load(open(path))
    assert sorted(im["file_name"] for im in coco["images"]) == ["a.png", "b.png"]
    assert len(coco["annotations"]) == 5 and len({a["id"] for a in coco["annotations"]}) == 5
    assert np.array_equal(cv2.imread(os.path.join(folder, "a.png"))[:, :, ::-1], image)
    registered = register_user_datasets([f"mine={path}"])
    assert registered == {"mine": True}  # outlines from the labels, for evaluation
    from detectron2.data import DatasetCatalog

    records = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("mine")}
    got = np.array([a["bbox"] for a in records["a.png"]["annotations"]])
    assert np.allclose(got[:, :2], boxes[:3, :2])  # COCO XYWH
    assert np.allclose(got[:, :2] + got[:, 2:], boxes[:3, 2:])
    first = next(a for a in coco["annotations"] if a["image_id"] == records["a.png"]["image_id"])
    assert np.array_equal(mask_util.decode(first["segmentation"]).astype(bool), labels == 1)
    with pytest.raises(UsageError, match="image name"):
        export_box_set(folder, "../up", image, boxes)
    with pytest.raises(UsageError, match="not the image's size"):
        export_box_set(folder, "c", image, boxes, labels=labels[:10])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "annotations.json").write_text("{oops")
    with pytest.raises(DatasetFormatError, match="is not JSON"):
        export_box_set(str(tmp_path / "bad"), "a", image, boxes)
