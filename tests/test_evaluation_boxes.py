"""Box matching at IoU 0.5 (greedy by score, each true box once) and the pooled precision /
recall / F1 the evaluator and the threshold fit report."""

import numpy as np
import pytest
import torch

from dessam_d2.evaluation.boxes import box_scores, match_boxes, true_boxes


def test_match_boxes_greedy_by_score_each_true_box_once():
    gt = torch.tensor([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    pred = torch.tensor(
        [
            [0, 0, 10, 9],  # IoU 0.9 with the first box, low score
            [0, 0, 10, 10],  # exact, high score: it takes the first box
            [21, 21, 31, 31],  # IoU 81/119 = 0.68 with the second
            [50, 50, 60, 60],  # nothing
        ],
        dtype=torch.float32,
    )
    scores = torch.tensor([0.6, 0.9, 0.7, 0.95])
    is_tp, n = match_boxes(pred, scores, gt)
    assert n == 2
    assert is_tp.tolist() == [False, True, True, False]


def test_match_boxes_iou_threshold_is_inclusive_and_edge_cases():
    gt = torch.tensor([[0, 0, 10, 10]], dtype=torch.float32)
    half = torch.tensor([[0, 0, 10, 5]], dtype=torch.float32)  # IoU exactly 0.5
    assert match_boxes(half, torch.tensor([1.0]), gt)[0].tolist() == [True]
    assert match_boxes(half, torch.tensor([1.0]), gt, iou_threshold=0.51)[0].tolist() == [False]
    is_tp, n = match_boxes(torch.zeros(0, 4), torch.zeros(0), gt)
    assert is_tp.shape == (0,) and n == 1
    is_tp, n = match_boxes(half, torch.tensor([1.0]), torch.zeros(0, 4))
    assert is_tp.tolist() == [False] and n == 0
    with pytest.raises(ValueError, match="scores"):
        match_boxes(half, torch.tensor([1.0, 0.5]), gt)


def test_box_scores_pool_over_images():
    rows = [
        {"box_tp": 2, "num_pred": 2, "num_gt": 4},
        {"box_tp": 1, "num_pred": 3, "num_gt": 1},
    ]
    out = box_scores(rows)
    assert out["precision"] == pytest.approx(60.0)
    assert out["recall"] == pytest.approx(60.0)
    assert out["F1"] == pytest.approx(60.0)
    assert (out["detections"], out["nuclei"]) == (5, 5)
    empty = box_scores([{"box_tp": 0, "num_pred": 0, "num_gt": 3}])
    assert (empty["precision"], empty["recall"], empty["F1"]) == (0.0, 0.0, 0.0)


def test_true_boxes_reads_boxes_only_and_skips_crowds():
    class NoMask(dict):
        def __getitem__(self, key):
            if key == "segmentation":
                raise AssertionError("a mask was read")
            return super().__getitem__(key)

    record = {
        "annotations": [
            NoMask(bbox=[1, 2, 3, 4], bbox_mode=1, iscrowd=0),  # XYWH_ABS
            NoMask(bbox=[0, 0, 5, 5], bbox_mode=0, iscrowd=0),  # XYXY_ABS
            NoMask(bbox=[0, 0, 9, 9], bbox_mode=0, iscrowd=1),
        ]
    }
    boxes = true_boxes(record)
    np.testing.assert_allclose(boxes.numpy(), [[1, 2, 4, 6], [0, 0, 5, 5]])
    assert true_boxes({}).shape == (0, 4)
