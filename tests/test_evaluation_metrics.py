"""Known answers and edge cases of the per-image nuclei metrics (docs/METRICS.md).

Speed (not asserted, see ``test_dense_1000x1000_map_with_500_nuclei``): all six metrics of a
1000 x 1000 map with 500 nuclei take ~0.08 s on one CPU core; ``masks_to_label_map`` on
500 x 1000 x 1000 masks ~0.04 s.
"""

import itertools
import time
from typing import Dict, Sequence, Tuple

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from dessam_d2.evaluation.metrics import (
    METRIC_NAMES,
    aji,
    aji_plus,
    dice,
    masks_to_label_map,
    mean_metrics,
    nuclei_metrics,
    object_dice,
    panoptic_quality,
)

Box = Tuple[int, int, int, int, int]  # label, y0, y1, x0, x1 (end exclusive)


def _paint(shape: Tuple[int, int], boxes: Sequence[Box], dtype=np.int32) -> np.ndarray:
    labels = np.zeros(shape, dtype=dtype)
    for label, y0, y1, x0, x1 in boxes:
        labels[y0:y1, x0:x1] = label
    return labels


def _assert_metrics(gt: np.ndarray, pred: np.ndarray, expected: Dict[str, float]) -> None:
    got = nuclei_metrics(gt, pred)
    assert got == pytest.approx(expected, abs=1e-12)
    # The single-metric functions must agree with the combined one.
    dq, sq, pq = panoptic_quality(gt, pred)
    singles = {"Dice": dice(gt, pred), "AJI": aji(gt, pred), "AJI+": aji_plus(gt, pred)}
    assert {**singles, "DQ": dq, "SQ": sq, "PQ": pq} == pytest.approx(expected, abs=1e-12)


def _all(value: float) -> Dict[str, float]:
    return {name: value for name in METRIC_NAMES}


# --------------------------------------------------------------------------- known answers


def test_one_nucleus_exactly_predicted_scores_one():
    gt = _paint((8, 8), [(1, 2, 6, 1, 5)])
    pred = _paint((8, 8), [(9, 2, 6, 1, 5)])  # same pixels, another id
    _assert_metrics(gt, pred, _all(1.0))


def test_shifted_nucleus():
    # 16 px each, overlap 12 px: IoU = 12 / 20, Dice = 24 / 32.
    gt = _paint((6, 6), [(1, 0, 4, 0, 4)])
    pred = _paint((6, 6), [(1, 1, 5, 0, 4)])
    _assert_metrics(
        gt, pred, {"Dice": 0.75, "AJI": 0.6, "AJI+": 0.6, "DQ": 1.0, "SQ": 0.6, "PQ": 0.6}
    )


def test_merge_of_two_equal_touching_nuclei():
    # g1, g2: 16 px each, side by side; one prediction covers both (32 px), IoU 0.5 with each.
    gt = _paint((4, 8), [(1, 0, 4, 0, 4), (2, 0, 4, 4, 8)])
    pred = _paint((4, 8), [(1, 0, 4, 0, 8)])
    # AJI: both GT take the prediction: I = 16 + 16, U = 32 + 32 -> 1/2.
    # AJI+: the prediction goes to one GT: I = 16, U = 32 + 16 (unpaired GT) -> 1/3.
    # PQ: IoU = 0.5 is no match: TP 0, FP 1, FN 2.
    expected = {"Dice": 1.0, "AJI": 0.5, "AJI+": 1 / 3, "DQ": 0.0, "SQ": 0.0, "PQ": 0.0}
    _assert_metrics(gt, pred, expected)
    assert aji(gt, pred) != aji_plus(gt, pred)


def test_merge_of_a_large_and_a_small_nucleus():
    # g1 24 px, g2 8 px; the merged prediction (32 px) has IoU 0.75 with g1, 0.25 with g2.
    gt = _paint((4, 8), [(1, 0, 4, 0, 6), (2, 0, 4, 6, 8)])
    pred = _paint((4, 8), [(5, 0, 4, 0, 8)])
    # AJI: I = 24 + 8, U = 32 + 32 -> 1/2.  AJI+: pred -> g1: I = 24, U = 32 + 8 -> 0.6.
    # PQ: TP 1 (IoU 0.75), FP 0, FN 1: DQ = 1 / 1.5, SQ = 0.75, PQ = 0.5.
    expected = {"Dice": 1.0, "AJI": 0.5, "AJI+": 0.6, "DQ": 2 / 3, "SQ": 0.75, "PQ": 0.5}
    _assert_metrics(gt, pred, expected)


def test_one_nucleus_split_into_two_predictions():
    # g: 32 px; p1: 24 px inside g (IoU 0.75), p2: the other 8 px (IoU 0.25).
    gt = _paint((4, 8), [(3, 0, 4, 0, 8)])
    pred = _paint((4, 8), [(1, 0, 4, 0, 6), (2, 0, 4, 6, 8)])
    # AJI = AJI+: g -> p1: I = 24, U = 32 + 8 (p2 never picked) -> 0.6.
    # PQ: TP 1, FP 1, FN 0: DQ = 1 / 1.5, SQ = 0.75, PQ = 0.5.
    expected = {"Dice": 1.0, "AJI": 0.6, "AJI+": 0.6, "DQ": 2 / 3, "SQ": 0.75, "PQ": 0.5}
    _assert_metrics(gt, pred, expected)


def test_even_split_has_no_pq_match():
    gt = _paint((4, 8), [(1, 0, 4, 0, 8)])
    pred = _paint((4, 8), [(1, 0, 4, 0, 4), (2, 0, 4, 4, 8)])
    # AJI: I = 16, U = 32 + 16 -> 1/3; PQ: TP 0, FP 2, FN 1.
    expected = {"Dice": 1.0, "AJI": 1 / 3, "AJI+": 1 / 3, "DQ": 0.0, "SQ": 0.0, "PQ": 0.0}
    _assert_metrics(gt, pred, expected)


def test_aji_tie_takes_the_smaller_prediction_id():
    # g = cols 0-5 (6 px). pa = cols 0-1: IoU 2 / 6. pb = cols 2-4 + 6-8: IoU 3 / 9. Equal IoU.
    gt = np.zeros((1, 12), dtype=np.int32)
    gt[0, 0:6] = 1
    pred = np.zeros((1, 12), dtype=np.int32)
    pred[0, 0:2] = 10
    pred[0, 2:5] = pred[0, 6:9] = 20
    # pa picked: I = 2, U = 6 + 6 (pb unpicked) -> 1/6.
    assert aji(gt, pred) == pytest.approx(1 / 6, abs=1e-12)
    # pb now has the smaller id: I = 3, U = 9 + 2 -> 3/11.
    swapped = np.select([pred == 10, pred == 20], [20, 10], 0)
    assert aji(gt, swapped) == pytest.approx(3 / 11, abs=1e-12)


# ----------------------------------------------------------------------------- edge cases


def test_both_maps_empty_score_one():
    empty = np.zeros((5, 7), dtype=np.int32)
    _assert_metrics(empty, empty, _all(1.0))


def test_empty_prediction_scores_zero():
    gt = _paint((8, 8), [(1, 0, 3, 0, 3), (2, 4, 8, 4, 8)])
    _assert_metrics(gt, np.zeros_like(gt), _all(0.0))


def test_predictions_on_empty_gt_score_zero():
    pred = _paint((8, 8), [(1, 0, 3, 0, 3)])
    _assert_metrics(np.zeros_like(pred), pred, _all(0.0))


def test_iou_exactly_half_is_not_a_match():
    gt = _paint((1, 6), [(1, 0, 1, 0, 4)])
    half = _paint((1, 6), [(1, 0, 1, 0, 2)])  # IoU 2 / 4
    # TP 0, FP 1, FN 1; AJI: I = 2, U = 4; Dice = 2 * 2 / (4 + 2).
    expected = {"Dice": 2 / 3, "AJI": 0.5, "AJI+": 0.5, "DQ": 0.0, "SQ": 0.0, "PQ": 0.0}
    _assert_metrics(gt, half, expected)
    three_quarters = _paint((1, 6), [(1, 0, 1, 0, 3)])  # IoU 3 / 4: a match
    assert panoptic_quality(gt, three_quarters) == pytest.approx((1.0, 0.75, 0.75))


@pytest.mark.parametrize(
    "gt_ids, pred_ids, dtype",
    [
        ((7, 3), (65535,), np.uint16),
        ((70000, 2**33), (123456789,), np.int64),
        ((2**32 - 1, 2**31), (2**32 - 2,), np.uint32),
        ((2**63 + 5, 17), (2**64 - 1,), np.uint64),
    ],
)
def test_large_and_non_contiguous_ids(gt_ids, pred_ids, dtype):
    # The unbalanced merge, relabelled: results must not depend on the id values.
    gt = np.zeros((4, 8), dtype=dtype)
    gt[:, 0:6] = gt_ids[0]
    gt[:, 6:8] = gt_ids[1]
    pred = np.full((4, 8), pred_ids[0], dtype=dtype)
    assert int(gt[0, 0]) == gt_ids[0] and int(pred[0, 0]) == pred_ids[0]  # no silent cast
    expected = {"Dice": 1.0, "AJI": 0.5, "AJI+": 0.6, "DQ": 2 / 3, "SQ": 0.75, "PQ": 0.5}
    _assert_metrics(gt, pred, expected)


def _grid(rows: int, cols: int, size: int = 3, pitch: int = 4) -> np.ndarray:
    boxes = [
        (1 + r * cols + c, r * pitch, r * pitch + size, c * pitch, c * pitch + size)
        for r in range(rows)
        for c in range(cols)
    ]
    return _paint((rows * pitch, cols * pitch), boxes)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_more_than_255_nuclei(dtype):
    gt = _grid(20, 15).astype(dtype)  # 300 nuclei: overflows uint8, exceeds COCO's 100
    assert len(np.unique(gt)) - 1 == 300
    reversed_ids = np.where(gt > 0, 301 - gt.astype(np.int64), 0).astype(dtype)
    _assert_metrics(gt, reversed_ids, _all(1.0))
    # Keep every other nucleus: 150 TP, 150 FN; AJI: I = 150 * 9, U = 300 * 9.
    half = np.where(gt % 2 == 1, gt, 0).astype(dtype)
    expected = {"Dice": 2 / 3, "AJI": 0.5, "AJI+": 0.5, "DQ": 2 / 3, "SQ": 1.0, "PQ": 2 / 3}
    _assert_metrics(gt, half, expected)


@pytest.mark.parametrize(
    "gt, pred, message",
    [
        (np.zeros((4, 4), np.int32), np.zeros((4, 5), np.int32), "shapes differ"),
        (np.zeros((4, 4), np.float32), np.zeros((4, 4), np.int32), "integer"),
        (np.zeros((4, 4), np.int32), np.zeros((4, 4), bool), "integer"),
        (np.zeros((1, 4, 4), np.int32), np.zeros((1, 4, 4), np.int32), "H x W"),
        (np.full((4, 4), -1, np.int32), np.zeros((4, 4), np.int32), "negative"),
    ],
)
def test_invalid_inputs_raise(gt, pred, message):
    for fn in (dice, aji, aji_plus, panoptic_quality, nuclei_metrics):
        with pytest.raises(ValueError, match=message):
            fn(gt, pred)


def test_dense_1000x1000_map_with_500_nuclei():
    # 500 squares of 30 x 30 on a 40 px pitch; the prediction is shifted by (3, 3), so every
    # nucleus overlaps its own by 27 x 27 = 729 px: IoU = 729 / 1071, Dice = 729 / 900.
    boxes = [
        (1 + r * 25 + c, r * 40, r * 40 + 30, c * 40, c * 40 + 30)
        for r in range(20)
        for c in range(25)
    ]
    gt = _paint((1000, 1000), boxes)
    pred = np.roll(gt, (3, 3), axis=(0, 1))
    start = time.perf_counter()
    got = nuclei_metrics(gt, pred)
    print(f"nuclei_metrics, 1000 x 1000, 500 nuclei: {time.perf_counter() - start:.3f} s")
    iou = 729 / 1071
    expected = {"Dice": 0.81, "AJI": iou, "AJI+": iou, "DQ": 1.0, "SQ": iou, "PQ": iou}
    assert got == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------- cross-check on random label maps


def _random_maps(seed: int, shape=(48, 48)) -> Tuple[np.ndarray, np.ndarray]:
    """Overlapping random rectangles (later ones cover earlier) and a jittered prediction."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(shape, dtype=np.int64)
    pred = np.zeros(shape, dtype=np.int64)
    for _ in range(rng.integers(0, 12)):
        y, x = rng.integers(0, shape[0] - 4, size=2)
        h, w = rng.integers(3, 14, size=2)
        gt[y : y + h, x : x + w] = rng.integers(1, 10**6)
        if rng.random() < 0.85:  # some nuclei are missed
            dy, dx, dh, dw = rng.integers(-2, 3, size=4)
            y0, x0 = max(y + dy, 0), max(x + dx, 0)
            pred[y0 : y0 + h + dh, x0 : x0 + w + dw] = rng.integers(1, 10**6)
    for _ in range(rng.integers(0, 3)):  # and some false positives
        y, x = rng.integers(0, shape[0] - 4, size=2)
        pred[y : y + 5, x : x + 5] = rng.integers(1, 10**6)
    return gt, pred


def _naive_metrics(gt: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    """Straight from METRICS.md with one boolean mask per nucleus and a loop over all pairs."""
    gt_masks = [gt == i for i in np.unique(gt) if i != 0]
    pred_masks = [pred == j for j in np.unique(pred) if j != 0]
    if not gt_masks and not pred_masks:
        return _all(1.0)
    inter = np.array([[(g & p).sum() for p in pred_masks] for g in gt_masks]).reshape(
        len(gt_masks), len(pred_masks)
    )
    union = np.array([[(g | p).sum() for p in pred_masks] for g in gt_masks]).reshape(inter.shape)
    iou = inter / np.maximum(union, 1)

    def aggregated_jaccard(pairs):
        used_p = {j for _, j in pairs}
        used_g = {i for i, _ in pairs}
        i_sum = sum(inter[i, j] for i, j in pairs)
        u_sum = sum(union[i, j] for i, j in pairs)
        u_sum += sum(g.sum() for i, g in enumerate(gt_masks) if i not in used_g)
        u_sum += sum(p.sum() for j, p in enumerate(pred_masks) if j not in used_p)
        return i_sum / u_sum

    aji_pairs = []
    for i in range(len(gt_masks)):
        best = max(range(len(pred_masks)), key=lambda j: iou[i, j], default=None)
        if best is not None and inter[i, best] > 0:
            aji_pairs.append((i, best))
    rows, cols = linear_sum_assignment(iou, maximize=True)
    plus_pairs = [(i, j) for i, j in zip(rows, cols) if inter[i, j] > 0]

    matches = [(i, j) for i, j in itertools.product(*map(range, iou.shape)) if iou[i, j] > 0.5]
    tp = len(matches)
    fp, fn = len(pred_masks) - tp, len(gt_masks) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum(iou[i, j] for i, j in matches) / tp if tp else 0.0
    fg_gt, fg_pred = gt > 0, pred > 0
    return {
        "Dice": 2 * (fg_gt & fg_pred).sum() / (fg_gt.sum() + fg_pred.sum()),
        "AJI": aggregated_jaccard(aji_pairs),
        "AJI+": aggregated_jaccard(plus_pairs),
        "DQ": dq,
        "SQ": sq,
        "PQ": dq * sq,
    }


def test_matches_naive_per_pair_implementation_on_random_maps():
    for seed in range(40):
        gt, pred = _random_maps(seed)
        assert nuclei_metrics(gt, pred) == pytest.approx(_naive_metrics(gt, pred), abs=1e-12), seed


def test_pq_matches_monai_on_random_maps():
    # MONAI is in requirements.txt: a missing one fails this test instead of skipping it.
    import monai.metrics.panoptic_quality as monai_pq

    for seed in range(40):
        gt, pred = _random_maps(seed)
        tp, fp, fn, iou_sum = monai_pq.compute_panoptic_quality(
            torch.from_numpy(pred), torch.from_numpy(gt), output_confusion_matrix=True
        ).tolist()
        if tp + fp + fn == 0:
            continue  # MONAI has no answer for two empty maps; ours is 1.0 (tested above)
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = iou_sum / tp if tp else 0.0
        # MONAI computes IoU in float32.
        assert panoptic_quality(gt, pred) == pytest.approx((dq, sq, dq * sq), abs=1e-6), seed


# ------------------------------------------------------------------ helpers around the metrics


def test_mean_metrics_averages_per_image():
    rows = [_all(1.0), {**_all(0.0), "PQ": 0.5}]
    assert mean_metrics(rows) == pytest.approx({**_all(0.5), "PQ": 0.75})
    assert all(np.isnan(v) for v in mean_metrics([]).values())


def test_masks_to_label_map_higher_score_wins():
    masks = np.zeros((3, 4, 6), dtype=bool)
    masks[0, :, 0:4] = True  # low score
    masks[1, :, 2:6] = True  # high score, overlaps mask 0 on cols 2-3
    masks[2, :, 3:4] = True  # hidden under mask 1 entirely
    labels = masks_to_label_map(masks, np.array([0.3, 0.9, 0.5]))
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels[0], [1, 1, 2, 2, 2, 2])
    assert 3 not in labels


def test_masks_to_label_map_ties_go_to_the_earlier_instance():
    masks = torch.zeros((2, 2, 4), dtype=torch.bool)  # torch input, as in Instances
    masks[0, :, 0:3] = True
    masks[1, :, 1:4] = True
    labels = masks_to_label_map(masks, torch.tensor([0.7, 0.7]))
    np.testing.assert_array_equal(labels[1], [1, 1, 1, 2])


def test_masks_to_label_map_empty_and_invalid():
    labels = masks_to_label_map(np.zeros((0, 3, 5), dtype=bool), np.zeros(0))
    assert labels.shape == (3, 5) and not labels.any()
    with pytest.raises(ValueError, match="boolean"):
        masks_to_label_map(np.zeros((1, 3, 5), dtype=np.float32), np.zeros(1))
    with pytest.raises(ValueError, match="scores"):
        masks_to_label_map(np.zeros((2, 3, 5), dtype=bool), np.zeros(3))
    with pytest.raises(ValueError, match="N x H x W"):
        masks_to_label_map(np.zeros((3, 5), dtype=bool), np.zeros(3))


# --------------------------------------------------------------------------- object Dice


def _naive_object_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """GlaS object Dice straight from its definition, one nucleus at a time."""

    def side(a: np.ndarray, b: np.ndarray) -> float:
        ids = [i for i in np.unique(a) if i]
        total = sum(int((a == i).sum()) for i in ids)
        value = 0.0
        for i in ids:
            obj = a == i
            hits = [j for j in np.unique(b[obj]) if j]
            if not hits:
                continue
            j = max(hits, key=lambda j: (int((obj & (b == j)).sum()), -j))
            other = b == j
            value += obj.sum() / total * 2 * (obj & other).sum() / (obj.sum() + other.sum())
        return value

    return (side(gt, pred) + side(pred, gt)) / 2


def test_object_dice_known_answers():
    # the unbalanced merge: GT side 24/32 * 48/56 + 8/32 * 16/40, prediction side 48/56
    gt = _paint((4, 8), [(1, 0, 4, 0, 6), (2, 0, 4, 6, 8)])
    pred = _paint((4, 8), [(5, 0, 4, 0, 8)])
    assert object_dice(gt, pred) == pytest.approx(0.8, abs=1e-12)
    assert dice(gt, pred) == 1.0  # the pixel Dice does not see the merge
    assert object_dice(gt, gt) == 1.0
    empty = np.zeros_like(gt)
    assert object_dice(empty, empty) == 1.0
    assert object_dice(gt, empty) == object_dice(empty, gt) == 0.0


def test_object_dice_equals_the_definition_on_random_maps():
    rng = np.random.default_rng(3)
    for seed in range(20):
        gt = rng.integers(0, 5, (12, 12)) * (rng.random((12, 12)) < 0.7)
        pred = rng.integers(0, 6, (12, 12)) * (rng.random((12, 12)) < 0.6)
        want = _naive_object_dice(gt, pred)
        assert object_dice(gt, pred) == pytest.approx(want, abs=1e-12)
        both = nuclei_metrics(gt, pred, with_object_dice=True)  # one table for all
        assert both["objDice"] == pytest.approx(want, abs=1e-12)
        assert {k: v for k, v in both.items() if k != "objDice"} == nuclei_metrics(gt, pred)
