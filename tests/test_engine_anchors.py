"""Anchors fitted to the training boxes (dessam_d2/engine/anchors.py)."""

import json

import numpy as np
import pytest
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog

from dessam_d2.engine.anchors import (
    fit_anchor_shapes,
    fit_anchors_to_training_boxes,
    training_box_sizes,
)
from dessam_d2.errors import EmptyDatasetError


def test_sizes_are_quantiles_of_sqrt_area_and_ratios_of_h_over_w():
    rng = np.random.default_rng(0)
    side = rng.uniform(10, 30, 2000)
    ratio = rng.uniform(0.5, 2.0, 2000)  # h / w
    wh = np.stack([side / np.sqrt(ratio), side * np.sqrt(ratio)], 1)
    sizes, ratios = fit_anchor_shapes(wh, 3, 3)
    # sqrt(w h) = side: U(10, 30) quantiles 1/6, 1/2, 5/6 = 13.3, 20, 26.7
    assert [s[0] for s in sizes] == pytest.approx([13.33, 20.0, 26.67], abs=0.6)
    assert ratios[0] == pytest.approx([0.75, 1.25, 1.75], abs=0.06)  # U(0.5, 2) quantiles
    assert len(ratios) == 1 and all(len(s) == 1 for s in sizes)


def test_equal_boxes_still_give_increasing_sizes_and_ratios():
    sizes, ratios = fit_anchor_shapes(np.full((50, 2), 16.0), 3, 3)
    flat = [s[0] for s in sizes]
    assert flat[0] == 16.0 and flat[0] < flat[1] < flat[2]
    assert ratios[0][0] == 1.0 and ratios[0][0] < ratios[0][1] < ratios[0][2]


def test_boxes_are_measured_at_the_models_input_size():
    records = [
        {"height": 512, "width": 1024, "annotations": [{"bbox": [0, 0, 40, 20], "bbox_mode": 1}]},
        {"height": 256, "width": 256, "annotations": [{"bbox": [0, 0, 8, 8], "bbox_mode": 1}]},
        {"height": 256, "width": 256, "annotations": [{"bbox": [0, 0, 99, 99], "iscrowd": 1}]},
    ]
    assert training_box_sizes(records, 256).tolist() == [[10.0, 5.0], [8.0, 8.0]]


def _register(tmp_path, name, boxes):
    from dessam_d2.data.datasets import register_nuclei_coco

    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 512, "width": 512}],
        "annotations": [
            {"id": i + 1, "image_id": 1, "category_id": 1, "bbox": b, "area": b[2] * b[3],
             "iscrowd": 0}
            for i, b in enumerate(boxes)
        ],
        "categories": [{"id": 1, "name": "nucleus"}],
    }  # fmt: skip
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(coco))
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    register_nuclei_coco(name, str(path), str(tmp_path))


def test_the_config_gets_the_fitted_anchors_with_its_counts(tmp_path):
    _register(tmp_path, "anchor_fit_train", [[0, 0, 40, 40], [0, 0, 60, 30], [0, 0, 30, 60]])
    cfg = tiny_cfg(**{"DATASETS.TRAIN": ("anchor_fit_train",)})  # 4 levels, 3 ratios; 256 px
    line = fit_anchors_to_training_boxes(cfg)
    sizes = [s[0] for s in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    assert len(sizes) == 4 and len(cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0]) == 3
    # sqrt(w h) of the halved boxes: 20, 21.2, 21.2 (ties nudged up 5 % each)
    assert 20.0 <= sizes[0] < sizes[-1] <= 21.22 * 1.05**2 + 0.03
    assert (
        "Anchors fitted to 3 training boxes" in line
        and str(cfg.MODEL.ANCHOR_GENERATOR.SIZES) in line
    )


def test_no_box_to_fit_is_a_one_line_error(tmp_path):
    _register(tmp_path, "anchor_fit_empty", [])
    cfg = tiny_cfg(**{"DATASETS.TRAIN": ("anchor_fit_empty",)})
    with pytest.raises(EmptyDatasetError, match="no box to fit the anchors to"):
        fit_anchors_to_training_boxes(cfg)
