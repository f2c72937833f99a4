"""NucleiEvaluator and build_nuclei_evaluators on tiny COCO-json datasets registered in tmp dirs."""

import csv
import json
import os
import uuid
from typing import Any, Dict, List, Sequence

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, Instances
from PIL import Image

from dessam_d2.engine import Trainer
from dessam_d2.evaluation import (
    NucleiEvaluator,
    annotations_to_label_map,
    build_nuclei_evaluators,
)
from dessam_d2.evaluation.nuclei_evaluator import CSV_FIELDS, RELEASE_FIELDS


def _block(h: int, w: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _compressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    """Column-major run lengths starting with a background run, as COCO's iscrowd RLEs."""
    flat = mask.reshape(-1, order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _annotation(ann_id: int, image_id: int, mask: np.ndarray, segmentation: Any) -> Dict:
    ys, xs = np.nonzero(mask)
    bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "segmentation": segmentation,
        "bbox": bbox,
        "area": int(mask.sum()),
        "iscrowd": 0,
    }


def _register(tmp_path, images: List[Dict], annotations: List[Dict]) -> str:
    """Write blank pngs and a COCO json, register it under a unique name."""
    for image in images:
        Image.new("RGB", (image["width"], image["height"])).save(tmp_path / image["file_name"])
    categories = [{"id": 1, "name": "nucleus"}]
    json_file = tmp_path / "annotations.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    name = f"dessam_test_nuclei_{uuid.uuid4().hex[:8]}"
    register_coco_instances(name, {}, str(json_file), str(tmp_path))
    return name


@pytest.fixture
def registered():
    """Yields a registering function; removes what it registered afterwards."""
    names: List[str] = []

    def register(*args) -> str:
        names.append(_register(*args))
        return names[-1]

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def _instances(masks: Sequence[np.ndarray], scores: Sequence[float], h: int, w: int) -> Instances:
    pred_masks = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, h, w), dtype=bool)
    boxes = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return Instances(
        (h, w),
        pred_masks=pred_masks,
        scores=torch.tensor(scores, dtype=torch.float32),
        pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        pred_classes=torch.zeros(len(masks), dtype=torch.int64),
    )


# --------------------------------------------------------------------------- GT label maps


def test_annotations_to_label_map_formats_overlap_and_crowd():
    h, w = 8, 10
    square = _block(h, w, 0, 4, 0, 4)
    right = _block(h, w, 2, 6, 3, 9)
    bottom = _block(h, w, 6, 8, 0, 2)
    annotations = [
        {"segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]},  # polygon
        {"segmentation": _uncompressed_rle(right)},  # overlaps the square: later wins
        {"segmentation": _compressed_rle(bottom)},
        {"segmentation": _compressed_rle(np.ones((h, w), bool)), "iscrowd": 1},  # skipped
    ]
    expected = np.zeros((h, w), dtype=np.int32)
    expected[square] = 1
    expected[right] = 2
    expected[bottom] = 3
    np.testing.assert_array_equal(annotations_to_label_map(annotations, h, w), expected)


def test_annotations_to_label_map_errors():
    with pytest.raises(ValueError, match="segmentation"):
        annotations_to_label_map([{"bbox": [0, 0, 2, 2]}], 4, 4)
    with pytest.raises(ValueError, match="does not match"):
        annotations_to_label_map([{"segmentation": _compressed_rle(np.ones((4, 5)))}], 4, 4)


# ------------------------------------------------------------------------ NucleiEvaluator


@pytest.fixture
def two_image_dataset(tmp_path, registered):
    """a.png: two nuclei (polygon, uncompressed RLE). b.png: 24 px + 8 px touching nuclei."""
    h, w = 16, 16
    images = [
        {"id": 1, "file_name": "a.png", "height": h, "width": w},
        {"id": 2, "file_name": "b.png", "height": h, "width": w},
    ]
    a1, a2 = _block(h, w, 0, 4, 0, 4), _block(h, w, 8, 12, 8, 12)
    b1, b2 = _block(h, w, 0, 4, 0, 6), _block(h, w, 0, 4, 6, 8)
    annotations = [
        _annotation(1, 1, a1, [[0, 0, 4, 0, 4, 4, 0, 4]]),
        _annotation(2, 1, a2, _uncompressed_rle(a2)),
        _annotation(3, 2, b1, _compressed_rle(b1)),
        _annotation(4, 2, b2, [[6, 0, 8, 0, 8, 4, 6, 4]]),
    ]
    name = registered(tmp_path, images, annotations)
    # a.png predicted exactly; b.png's two nuclei predicted as one merged nucleus.
    outputs = {
        1: _instances([a2, a1], [0.9, 0.8], h, w),
        2: _instances([b1 | b2], [0.7], h, w),
    }
    return name, outputs


def _run(evaluator, outputs: Dict[int, Instances]) -> Dict:
    evaluator.reset()
    for image_id in sorted(outputs, reverse=True):  # out of dataset order on purpose
        inputs = [{"image_id": image_id, "height": 16, "width": 16}]
        evaluator.process(inputs, [{"instances": outputs[image_id]}])
    return evaluator.evaluate()


def test_nuclei_evaluator_percentages_and_csv(two_image_dataset, tmp_path):
    name, outputs = two_image_dataset
    out_dir = tmp_path / "eval"
    results = _run(NucleiEvaluator(name, str(out_dir)), outputs)

    # b.png is the unbalanced merge of test_metrics: Dice 1, AJI 1/2, AJI+ 0.6, DQ 2/3,
    # SQ 0.75, PQ 0.5; object Dice: GT side 24/32 * 48/56 + 8/32 * 16/40 = 26/35, prediction
    # side 48/56 = 6/7, mean 0.8. a.png is perfect. Means over the two images, in percent:
    expected = {"Dice": 100.0, "AJI": 75.0, "AJI+": 80.0, "DQ": 250 / 3, "SQ": 87.5, "PQ": 75.0}
    expected["objDice"] = 90.0
    assert set(results) == {"nuclei", "boxes"}
    assert results["nuclei"] == pytest.approx({**expected, "num_images": 2}, abs=1e-9)
    # Boxes at IoU 0.5: a.png's two match; b.png's merged box holds the 24 px nucleus's box
    # (IoU 24/32) and misses the 8 px one: 3 of 3 detections, 3 of 4 nuclei.
    boxes = {"precision": 100.0, "recall": 75.0, "F1": 600 / 7, "detections": 3, "nuclei": 4}
    assert results["boxes"] == pytest.approx(boxes)

    csv_path = out_dir / f"nuclei_metrics_{name}.csv"
    assert os.listdir(out_dir) == [csv_path.name]  # no temp file left behind
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS
        rows = list(reader)
    fields = ("image_id", "file_name", "num_gt", "num_pred", "box_tp")
    assert [tuple(r[k] for k in fields) for r in rows] == [
        ("1", "a.png", "2", "2", "2"),
        ("2", "b.png", "2", "1", "1"),
    ]
    per_image = [
        {"Dice": 100.0, "AJI": 100.0, "AJI+": 100.0, "DQ": 100.0, "SQ": 100.0, "PQ": 100.0},
        {"Dice": 100.0, "AJI": 50.0, "AJI+": 60.0, "DQ": 200 / 3, "SQ": 75.0, "PQ": 50.0},
    ]
    per_image[1]["objDice"] = 80.0
    for row, want in zip(rows, per_image):
        assert {k: float(row[k]) for k in want} == pytest.approx(want, abs=1e-9)


def test_nuclei_evaluator_without_output_dir_and_empty_prediction(two_image_dataset):
    name, outputs = two_image_dataset
    outputs[2] = _instances([], [], 16, 16)  # nothing found on b.png: all of its metrics are 0
    results = _run(NucleiEvaluator(name, distributed=False), outputs)
    expected = {name: 50.0 for name in ("Dice", "AJI", "AJI+", "DQ", "SQ", "PQ", "objDice")}
    assert results["nuclei"] == pytest.approx({**expected, "num_images": 2})


def test_nuclei_evaluator_rejects_masks_not_at_original_size(two_image_dataset):
    name, _ = two_image_dataset
    evaluator = NucleiEvaluator(name)
    small = _instances([_block(8, 8, 0, 2, 0, 2)], [0.5], 8, 8)
    with pytest.raises(ValueError, match="original size"):
        evaluator.process([{"image_id": 1}], [{"instances": small}])


def test_nuclei_evaluator_with_no_predictions_returns_empty(two_image_dataset):
    name, _ = two_image_dataset
    evaluator = NucleiEvaluator(name)
    evaluator.reset()
    assert evaluator.evaluate() == {}


# -------------------------------------------------------------- COCO AP with > 100 nuclei


def test_coco_ap_counts_more_than_100_detections(tmp_path, registered):
    # 13 x 13 = 169 nuclei of 5 x 5 px, all predicted exactly.
    h = w = 120
    masks = [_block(h, w, 9 * r, 9 * r + 5, 9 * c, 9 * c + 5) for r in range(13) for c in range(13)]
    images = [{"id": 1, "file_name": "dense.png", "height": h, "width": w}]
    annotations = [_annotation(i + 1, 1, m, _compressed_rle(m)) for i, m in enumerate(masks)]
    name = registered(tmp_path, images, annotations)
    scores = np.linspace(1.0, 0.5, len(masks)).tolist()
    instances = _instances(masks, scores, h, w)
    inputs = [{"image_id": 1, "height": h, "width": w}]

    evaluators = build_nuclei_evaluators(name, str(tmp_path / "eval"), max_dets_per_image=1000)
    evaluators.reset()
    evaluators.process(inputs, [{"instances": instances}])
    results = evaluators.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["nuclei"]["PQ"] == pytest.approx(100.0)
    assert results["nuclei"]["num_images"] == 1
    assert results["nuclei_release"]["num_images"] == 1  # training evaluates both protocols
    # the release's clean-up keeps a mask's largest piece when all are under 70 px: the 25-px
    # nuclei stay
    assert results["nuclei_release"]["PQ"] == pytest.approx(100.0)

    # Why the limit is raised: at COCO's default of 100, recall stops at 100 / 169, so only the
    # recall points 0.00 .. 0.59 (60 of 101) reach precision 1.
    DatasetCatalog.get(name)  # sets the category id mapping COCOEvaluator reads, as training does
    default = COCOEvaluator(name, tasks=("segm",), distributed=False, use_fast_impl=False)
    default.reset()
    default.process(inputs, [{"instances": instances}])
    assert default.evaluate()["segm"]["AP"] == pytest.approx(100 * 60 / 101)


@pytest.mark.parametrize(
    "detections_per_image, recall_points",
    # maxDets = max(TEST.DETECTIONS_PER_IMAGE, 100) of 169 exact predictions: AP is the share of
    # COCO's 101 recall points (0.00 .. 1.00) up to maxDets / 169, each at precision 1.
    [(50, 60), (150, 89), (400, 101)],  # 100/169 -> 0.59, 150/169 -> 0.88, all
)
def test_trainer_evaluator_counts_up_to_detections_per_image(
    tmp_path, registered, detections_per_image, recall_points
):
    h = w = 120
    masks = [_block(h, w, 9 * r, 9 * r + 5, 9 * c, 9 * c + 5) for r in range(13) for c in range(13)]
    images = [{"id": 1, "file_name": "dense.png", "height": h, "width": w}]
    annotations = [_annotation(i + 1, 1, m, _compressed_rle(m)) for i, m in enumerate(masks)]
    name = registered(tmp_path, images, annotations)
    DatasetCatalog.get(name)  # the category id mapping COCOEvaluator reads, as training sets it
    instances = _instances(masks, np.linspace(1.0, 0.5, len(masks)).tolist(), h, w)

    cfg = tiny_cfg(**{"TEST.DETECTIONS_PER_IMAGE": detections_per_image})
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    evaluator = Trainer.build_evaluator(cfg, name)  # what training and --eval-only use
    evaluator.reset()
    evaluator.process([{"image_id": 1, "height": h, "width": w}], [{"instances": instances}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100 * recall_points / 101)
    assert results["bbox"]["AP"] == pytest.approx(100 * recall_points / 101)


def test_nuclei_evaluator_release_protocol(tmp_path, registered):
    """Two overlapping predictions: ours gives the overlap to the higher score, the release to the
    later (lower-scored) mask; a 4-px hole is filled and a far 9-px island dropped; GT relabelled
    by pieces (the release's skimage.measure.label)."""
    h, w = 24, 24
    gt_a, gt_b = _block(h, w, 0, 10, 0, 10), _block(h, w, 10, 20, 0, 10)
    images = [{"id": 1, "file_name": "c.png", "height": h, "width": w}]
    annotations = [
        _annotation(1, 1, gt_a, _compressed_rle(gt_a)),
        _annotation(2, 1, gt_b, _compressed_rle(gt_b)),
    ]
    name = registered(tmp_path, images, annotations)
    high = _block(h, w, 0, 12, 0, 10)  # reaches 2 rows into gt_b
    high[4:6, 4:6] = False  # a 4-px hole
    high[21:24, 21:24] = True  # a 9-px island
    low = gt_b.copy()
    evaluator = NucleiEvaluator(name, str(tmp_path / "eval"), release_protocol=True)
    results = _run(evaluator, {1: _instances([high, low], [0.9, 0.4], h, w)})
    # As predicted: high keeps its 2 rows of gt_b, its hole and island: high = 100 - 4 + 20 + 9
    # = 125 px, low = 80 px. Release: high = gt_a exactly, low = gt_b exactly.
    inter_a, union_a = 96, 100 + 125 - 96
    assert results["nuclei"]["AJI"] == pytest.approx(100 * (inter_a + 80) / (union_a + 100))
    assert results["nuclei"]["Dice"] == pytest.approx(100 * 2 * 196 / (200 + 205))
    assert results["nuclei_release"] == pytest.approx(
        {k: 100.0 for k in ("Dice", "AJI", "AJI+", "DQ", "SQ", "PQ", "objDice")} | {"num_images": 1}
    )
    with open(tmp_path / "eval" / f"nuclei_metrics_{name}.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == CSV_FIELDS + RELEASE_FIELDS
        row = next(reader)
    assert float(row["release_PQ"]) == pytest.approx(100.0)
    assert float(row["PQ"]) < 100.0
