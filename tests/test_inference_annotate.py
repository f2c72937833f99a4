"""Boxes -> masks: a mask for every valid box, teacher or student, resumable after a kill."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from segment_anything import SamPredictor
from segment_anything.modeling import Sam

from dessam_d2.data.synthetic.cytology import generate_synthetic_dataset
from dessam_d2.data.transforms import sam_model_input
from dessam_d2.errors import DatasetFormatError, ImageReadError
from dessam_d2.inference.annotate import DEGENERATE, MASKS, boxes_to_masks
from dessam_d2.inference.predictor import Predictor


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
    assert (summary.done, summary.counts[MASKS], summary.counts[DEGENERATE]) == (3, n_valid, 1)
    assert [a["id"] for a in result["annotations"]] == [a["id"] for a in coco["annotations"][:-1]]
    for ann in result["annotations"]:
        assert ann["segmentation"]["size"] == [96, 128]
        assert ann["area"] == mask_util.area(ann["segmentation"])
    assert result["images"] == coco["images"]
    assert not (tmp_path / "masks.json.partial.jsonl").exists()


@pytest.fixture(scope="module")
def sharp_predictor():
    """A tiny model whose SAM decoder gives logits as large as a trained SAM's (+-20..30; a
    random one's stay below 1), so masks are shapes, not noise around the threshold."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    last = model.roi_heads.mask_head.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    with torch.no_grad():
        last.weight.mul_(60.0)
        last.bias.mul_(60.0)
        model.roi_heads.mask_head.learnable_tokens.normal_(0.0, 3.0)
    return Predictor(model)


def _decoded(path):
    anns = json.load(open(path))["annotations"]
    return {a["id"]: mask_util.decode(a["segmentation"]).astype(bool) for a in anns}


def test_teacher_masks_are_segment_anythings_own_predictor(boxes_only, sharp_predictor, tmp_path):
    """The teacher is SAM prompted with the COCO box: segment-anything's SamPredictor on the same
    weights, given the box as XYXY in the original image (96 x 128, not the model's 256^2)."""
    path, images, coco = boxes_only
    out = tmp_path / "teacher.json"
    boxes_to_masks(sharp_predictor, str(path), str(images), str(out), progress=False)
    ours = _decoded(out)
    model = sharp_predictor.model
    parts = model.sam_parts()
    sam = Sam(
        parts["image_encoder"],
        parts["prompt_encoder"],
        parts["mask_decoder"],
        model.pixel_mean.flatten().tolist(),
        model.pixel_std.flatten().tolist(),
    ).eval()
    sam.mask_threshold = model.mask_logit_threshold
    reference = SamPredictor(sam)
    compared = 0
    for info in coco["images"]:
        image = cv2.imread(str(images / info["file_name"]))[..., ::-1].copy()
        assert image.shape[:2] == (96, 128)
        reference.set_image(image)
        for ann in coco["annotations"]:
            x, y, w, h = ann["bbox"]
            if ann["image_id"] != info["id"] or w <= 0 or h <= 0:
                continue
            masks, _, _ = reference.predict(
                box=np.array([x, y, x + w, y + h]), multimask_output=False
            )
            truth = masks[0]
            assert 0 < truth.sum() < truth.size  # a shape, not an empty or full mask
            mask = ours[ann["id"]]
            iou = (mask & truth).sum() / (mask | truth).sum()
            assert iou >= 0.99, (ann["id"], iou)
            compared += 1
    assert compared == len(coco["annotations"]) - 1


def test_student_masks_are_the_student_decoder_on_the_boxes(boxes_only, sharp_predictor, tmp_path):
    path, images, coco = boxes_only
    masks = {}
    for student in (False, True):
        out = tmp_path / f"{student}.json"
        boxes_to_masks(sharp_predictor, str(path), str(images), str(out), student, progress=False)
        masks[student] = _decoded(out)
    model = sharp_predictor.model
    differ = 0
    for info in coco["images"]:
        image = cv2.imread(str(images / info["file_name"]))[..., ::-1].copy()
        anns = [a for a in coco["annotations"] if a["image_id"] == info["id"] and a["bbox"][2] > 0]
        # By hand: XYWH -> XYXY, then the longest-side resize 128 -> 256 (96 -> 192).
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        # (The image goes through the shared input function, tested against SamPredictor above.)
        inputs, _ = sam_model_input(image, 256)
        expected = model.segment_boxes([inputs], [boxes.float() * 2.0], student=True)
        expected = expected[0]["instances"].pred_masks.numpy()
        for ann, truth in zip(anns, expected):
            student = masks[True][ann["id"]]
            assert np.array_equal(student, truth), ann["id"]
            differ += (student != masks[False][ann["id"]]).sum() > 0.05 * student.sum()
    assert differ >= len(coco["annotations"]) // 2  # the learnable token changes most masks


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
    assert (summary.skipped, summary.done) == (1, 2)
    assert json.load(open(out)) == first


def test_bad_annotation_files_fail_clearly(tmp_path, predictor):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetFormatError, match="bad.json is not valid JSON"):
        boxes_to_masks(predictor, str(bad), str(tmp_path), str(tmp_path / "o.json"))
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        boxes_to_masks(predictor, str(tmp_path / "missing.json"), ".", str(tmp_path / "o.json"))


def test_a_box_reaching_outside_the_image_is_clipped_as_in_training(
    boxes_only, sharp_predictor, tmp_path
):
    """The training mapper clips boxes to the image before they prompt the teacher; so does
    boxes_to_masks (the clipped box, converted by hand, gives the same mask)."""
    _, images, coco = boxes_only
    info = coco["images"][0]
    bbox = [-12.0, 70.0, 40.0, 40.0]  # left of and below the 96 x 128 image
    one = {
        **coco,
        "images": [info],
        "annotations": [{"id": 1, "image_id": info["id"], "bbox": bbox}],
    }
    (tmp_path / "one.json").write_text(json.dumps(one))
    out = tmp_path / "out.json"
    boxes_to_masks(
        sharp_predictor, str(tmp_path / "one.json"), str(images), str(out), progress=False
    )
    mask = _decoded(out)[1]
    image = cv2.imread(str(images / info["file_name"]))[..., ::-1].copy()
    inputs, _ = sam_model_input(image, 256)
    clipped = torch.tensor([[0.0, 70.0, 28.0, 96.0]]) * 2.0
    expected = sharp_predictor.model.segment_boxes([inputs], [clipped], student=False)
    assert np.array_equal(mask, expected[0]["instances"].pred_masks[0].numpy())


def test_not_one_readable_image_is_an_error_and_writes_nothing(boxes_only, predictor, tmp_path):
    path, _, _ = boxes_only
    out = tmp_path / "masks.json"
    with pytest.raises(ImageReadError, match=r"no image of .* could be read under .*nowhere"):
        boxes_to_masks(predictor, str(path), str(tmp_path / "nowhere"), str(out), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
