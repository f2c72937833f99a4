"""Boxes -> masks: a mask for every valid box, teacher or student, resumable after a kill."""

import json

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model

from dessam_d2.annotate import boxes_to_masks
from dessam_d2.data.datasets import DatasetFormatError
from dessam_d2.data.synthetic import generate_synthetic_dataset
from dessam_d2.predict import Predictor


@pytest.fixture(scope="module")
def boxes_only(tmp_path_factory):
    root = tmp_path_factory.mktemp("boxes")
    json_file = generate_synthetic_dataset(str(root), 3, image_size=(96, 128), seed=3)
    coco = json.load(open(json_file))
    for ann in coco["annotations"]:
        del ann["segmentation"]  # what an annotation team has: boxes only
    coco["annotations"].append(
        {"id": 9999, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0}
    )
    path = root / "boxes.json"
    path.write_text(json.dumps(coco))
    return path, root / "images", coco


@pytest.fixture(scope="module")
def predictor():
    torch.manual_seed(0)
    return Predictor(build_model(tiny_cfg()).eval())


def test_every_valid_box_gets_a_mask_of_the_image_size(boxes_only, predictor, tmp_path):
    path, images, coco = boxes_only
    out = tmp_path / "masks.json"
    summary = boxes_to_masks(predictor, str(path), str(images), str(out), progress=False)
    result = json.load(open(out))
    n_valid = len(coco["annotations"]) - 1
    assert (summary.images, summary.masks, summary.degenerate_boxes) == (3, n_valid, 1)
    assert [a["id"] for a in result["annotations"]] == [a["id"] for a in coco["annotations"][:-1]]
    for ann in result["annotations"]:
        assert ann["segmentation"]["size"] == [96, 128]
        assert ann["area"] == mask_util.area(ann["segmentation"])
    assert result["images"] == coco["images"]
    assert not (tmp_path / "masks.json.partial.jsonl").exists()


def test_teacher_and_student_differ_only_by_the_learnable_tokens(boxes_only, predictor, tmp_path):
    path, images, _ = boxes_only
    masks = {}
    for student in (False, True):
        out = tmp_path / f"{student}.json"
        boxes_to_masks(predictor, str(path), str(images), str(out), student, progress=False)
        anns = json.load(open(out))["annotations"]
        masks[student] = np.stack([mask_util.decode(a["segmentation"]) for a in anns])
    head = predictor.model.roi_heads.mask_head
    saved = head.learnable_tokens.detach().clone()
    with torch.no_grad():
        head.learnable_tokens.mul_(0).add_(5.0)
    try:
        out = tmp_path / "changed.json"
        boxes_to_masks(predictor, str(path), str(images), str(out), False, progress=False)
        teacher_again = np.stack(
            [mask_util.decode(a["segmentation"]) for a in json.load(open(out))["annotations"]]
        )
    finally:
        with torch.no_grad():
            head.learnable_tokens.copy_(saved)
    assert np.array_equal(teacher_again, masks[False])


def test_a_killed_run_resumes_and_gives_the_same_file(boxes_only, predictor, tmp_path):
    path, images, _ = boxes_only
    full = tmp_path / "full.json"
    boxes_to_masks(predictor, str(path), str(images), str(full), progress=False)
    first = json.load(open(full))
    # What a kill after the first image leaves: its line, then half a line.
    out = tmp_path / "resumed.json"
    first_image = [a for a in first["annotations"] if a["image_id"] == 1]
    partial = tmp_path / "resumed.json.partial.jsonl"
    partial.write_text(json.dumps({"image_id": 1, "annotations": first_image}) + '\n{"image_id": 2')
    summary = boxes_to_masks(predictor, str(path), str(images), str(out), progress=False)
    assert (summary.resumed, summary.images) == (1, 2)
    assert json.load(open(out)) == first


def test_bad_annotation_files_fail_clearly(tmp_path, predictor):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="bad.json is not valid JSON"):
        boxes_to_masks(predictor, str(bad), str(tmp_path), str(tmp_path / "o.json"))
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        boxes_to_masks(predictor, str(tmp_path / "missing.json"), ".", str(tmp_path / "o.json"))
