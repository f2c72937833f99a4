"""Per-image nuclei instance metrics: Dice, AJI, AJI+ and DQ / SQ / PQ.

Definitions follow HoVer-Net's (the CNSeg protocol; docs/METHOD.md): every metric is computed on
one pair of instance label maps (H x W integers, 0 = background, any other value = one nucleus;
ids need not be contiguous and may be as large as the dtype allows) and the split's score is the
mean of the per-image values (:func:`mean_metrics`). All functions return fractions in [0, 1].

Edge cases (each is pinned by ``tests/test_evaluation_metrics.py``):

* both maps empty: every metric is 1.0 -- predicting nothing on an image without nuclei is a
  perfect answer, and defining it (rather than NaN) keeps the per-image mean over all images;
* empty prediction with nuclei in the GT, or predictions on an empty GT: every metric is 0.0;
* SQ when nothing is matched (TP = 0, maps not both empty) is 0.0, so PQ = DQ * SQ stays defined;
* IoU exactly 0.5 is *not* a PQ match (the test is ``2 * |g & p| > |g | p|`` on integer pixel
  counts, so no floating-point rounding decides it);
* AJI: when a GT nucleus has several predictions with the same highest IoU, the one with the
  smaller label id is picked;
* inputs must be 2-D integer arrays (bool and float are rejected) of equal shape with no negative
  labels, otherwise a ``ValueError`` explains what is wrong.

All metrics are derived from one sparse GT x prediction contingency table built with
``np.unique`` over the relabelled pixel pairs, so cost grows with the pixel count, not with the
number of nuclei squared (only AJI+'s assignment is dense, over the nuclei that overlap).
"""

from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "METRIC_NAMES",
    "aji",
    "aji_plus",
    "dice",
    "masks_to_label_map",
    "mean_metrics",
    "nuclei_metrics",
    "object_dice",
    "panoptic_quality",
]

METRIC_NAMES: Tuple[str, ...] = ("Dice", "AJI", "AJI+", "DQ", "SQ", "PQ")


@dataclass(frozen=True)
class _Overlaps:
    """Sparse contingency table of one GT / prediction pair of label maps.

    Nuclei are renumbered 0..G-1 (GT) and 0..P-1 (prediction) in increasing label order; only
    the K pairs that share at least one pixel are stored.
    """

    gt_area: np.ndarray  # G, pixels per GT nucleus
    pred_area: np.ndarray  # P, pixels per predicted nucleus
    gt_idx: np.ndarray  # K, GT nucleus of each overlapping pair
    pred_idx: np.ndarray  # K, predicted nucleus of each overlapping pair
    inter: np.ndarray  # K, |g & p| > 0

    @property
    def union(self) -> np.ndarray:  # K
        return self.gt_area[self.gt_idx] + self.pred_area[self.pred_idx] - self.inter

    @property
    def iou(self) -> np.ndarray:  # K
        return self.inter / self.union

    @property
    def both_empty(self) -> bool:
        return self.gt_area.size == 0 and self.pred_area.size == 0


def _check_label_map(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"{name} must be an H x W label map, got shape {labels.shape}")
    # bool is not an np.integer subtype: a binary mask is not an instance map.
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must hold integer instance ids, got dtype {labels.dtype}")
    if labels.size and np.issubdtype(labels.dtype, np.signedinteger) and labels.min() < 0:
        raise ValueError(f"{name} has negative labels; use 0 for background, > 0 for nuclei")
    return labels


def _compact(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Renumber a flat label map to 0 (background), 1..n; return it and the n nucleus areas."""
    ids, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if ids.size and ids[0] == 0:
        return inverse, counts[1:]
    # No background pixel at all: shift so that index 0 still means background.
    return inverse + 1, counts


def _overlaps(gt: np.ndarray, pred: np.ndarray) -> _Overlaps:
    gt = _check_label_map(gt, "gt")
    pred = _check_label_map(pred, "pred")
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred shapes differ: {gt.shape} vs {pred.shape}")
    g, gt_area = _compact(gt.reshape(-1))
    p, pred_area = _compact(pred.reshape(-1))
    both = (g > 0) & (p > 0)
    # One int64 code per (GT, pred) pixel pair; counting codes gives all intersections at once.
    stride = np.int64(pred_area.size + 1)
    codes = g[both].astype(np.int64) * stride + p[both]
    pair_codes, inter = np.unique(codes, return_counts=True)
    return _Overlaps(
        gt_area=gt_area,
        pred_area=pred_area,
        gt_idx=pair_codes // stride - 1,
        pred_idx=pair_codes % stride - 1,
        inter=inter,
    )


def _dice(ov: _Overlaps) -> float:
    if ov.both_empty:
        return 1.0
    # Every foreground pixel of both maps belongs to exactly one overlapping pair.
    return float(2 * ov.inter.sum() / (ov.gt_area.sum() + ov.pred_area.sum()))


def _jaccard_from_pairs(ov: _Overlaps, pairs: np.ndarray) -> float:
    """Aggregated Jaccard over selected pairs; unpaired nuclei of either side add to the union."""
    if ov.both_empty:
        return 1.0
    gt_used = np.zeros(ov.gt_area.size, dtype=bool)
    pred_used = np.zeros(ov.pred_area.size, dtype=bool)
    gt_used[ov.gt_idx[pairs]] = True
    pred_used[ov.pred_idx[pairs]] = True
    intersection = ov.inter[pairs].sum()
    union = ov.union[pairs].sum() + ov.gt_area[~gt_used].sum() + ov.pred_area[~pred_used].sum()
    return float(intersection / union)


def _best_pred_per_gt(ov: _Overlaps) -> np.ndarray:
    """Indices of the pairs giving each overlapping GT nucleus its highest-IoU prediction."""
    # Sorted by GT, then IoU descending, then pred id ascending: the first row of each GT wins.
    order = np.lexsort((ov.pred_idx, -ov.iou, ov.gt_idx))
    first = np.ones(order.size, dtype=bool)
    first[1:] = ov.gt_idx[order][1:] != ov.gt_idx[order][:-1]
    return order[first]


def _one_to_one_pairs(ov: _Overlaps) -> np.ndarray:
    """Indices of the pairs of a maximum-total-IoU one-to-one assignment (IoU > 0 only)."""
    if ov.inter.size == 0:
        return np.zeros(0, dtype=np.int64)
    # Nuclei without any overlap cannot be paired; leaving them out keeps the matrix small.
    rows, r = np.unique(ov.gt_idx, return_inverse=True)
    cols, c = np.unique(ov.pred_idx, return_inverse=True)
    iou = np.zeros((rows.size, cols.size))
    iou[r, c] = ov.iou
    pair_of = np.full((rows.size, cols.size), -1, dtype=np.int64)
    pair_of[r, c] = np.arange(ov.inter.size)
    ri, ci = linear_sum_assignment(iou, maximize=True)
    # The solver fills rows with zero-IoU columns too; those are not matches.
    return pair_of[ri, ci][iou[ri, ci] > 0]


def _aji(ov: _Overlaps) -> float:
    return _jaccard_from_pairs(ov, _best_pred_per_gt(ov))


def _aji_plus(ov: _Overlaps) -> float:
    return _jaccard_from_pairs(ov, _one_to_one_pairs(ov))


def _panoptic_quality(ov: _Overlaps) -> Tuple[float, float, float]:
    if ov.both_empty:
        return 1.0, 1.0, 1.0
    # IoU > 0.5 on integer counts: exact, and such a match is unique on both sides.
    matched = 2 * ov.inter > ov.union
    tp = int(matched.sum())
    fp = ov.pred_area.size - tp
    fn = ov.gt_area.size - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(ov.iou[matched].sum() / tp) if tp else 0.0
    return float(dq), sq, float(dq * sq)


def _object_side(area: np.ndarray, own: np.ndarray, other: np.ndarray, ov: _Overlaps) -> float:
    """sum_i |O_i| / sum |O| * Dice(O_i, its most-overlapping counterpart); 0 without overlap."""
    # Sorted by nucleus, then intersection descending, then counterpart ascending: first wins.
    order = np.lexsort((other, -ov.inter, own))
    first = np.ones(order.size, dtype=bool)
    first[1:] = own[order][1:] != own[order][:-1]
    best = order[first]
    pair_dice = 2 * ov.inter[best] / (ov.gt_area[ov.gt_idx[best]] + ov.pred_area[ov.pred_idx[best]])
    return float((area[own[best]] * pair_dice).sum() / area.sum())


def _object_dice(ov: _Overlaps) -> float:
    if ov.both_empty:
        return 1.0
    if ov.gt_area.size == 0 or ov.pred_area.size == 0:
        return 0.0
    gt_side = _object_side(ov.gt_area, ov.gt_idx, ov.pred_idx, ov)
    pred_side = _object_side(ov.pred_area, ov.pred_idx, ov.gt_idx, ov)
    return (gt_side + pred_side) / 2


def object_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Object-level Dice (Sirinukunwattana et al. 2017, GlaS; the release's ``dice``): each GT
    nucleus' Dice with the prediction it overlaps most (by pixels; 0 if none), weighted by its
    share of the GT area, averaged with the same from the predictions' side. The tables' Dice
    is :func:`dice` (pixel Dice, the release's ``F1``); the paper does not say which it reports."""
    return _object_dice(_overlaps(gt, pred))


def dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Dice of the binary foregrounds (HoVer-Net's Dice1): 2|G & P| / (|G| + |P|)."""
    return _dice(_overlaps(gt, pred))


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each GT nucleus takes its highest-IoU overlapping prediction (a prediction may be taken by
    several GT nuclei); GT nuclei with no overlap and predictions never taken add their area to
    the union.
    """
    return _aji(_overlaps(gt, pred))


def aji_plus(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ (HoVer-Net): AJI with a one-to-one maximum-IoU (Hungarian) GT <-> pred pairing."""
    return _aji_plus(_overlaps(gt, pred))


def panoptic_quality(gt: np.ndarray, pred: np.ndarray) -> Tuple[float, float, float]:
    """(DQ, SQ, PQ) with matches at IoU > 0.5; DQ = TP / (TP + FP/2 + FN/2), PQ = DQ * SQ."""
    return _panoptic_quality(_overlaps(gt, pred))


def nuclei_metrics(
    gt: np.ndarray, pred: np.ndarray, with_object_dice: bool = False
) -> Dict[str, float]:
    """All of :data:`METRIC_NAMES` for one image, from a single contingency table; with
    ``with_object_dice`` also "objDice" (:func:`object_dice`) from the same table."""
    ov = _overlaps(gt, pred)
    dq, sq, pq = _panoptic_quality(ov)
    scores = {
        "Dice": _dice(ov),
        "AJI": _aji(ov),
        "AJI+": _aji_plus(ov),
        "DQ": dq,
        "SQ": sq,
        "PQ": pq,
    }
    if with_object_dice:
        scores["objDice"] = _object_dice(ov)
    return scores


def mean_metrics(
    per_image: Iterable[Mapping[str, float]], names: Sequence[str] = METRIC_NAMES
) -> Dict[str, float]:
    """Mean over images of each metric (the paper averages per image, it does not pool pixels).

    Returns NaN for every metric when there are no images.
    """
    rows = list(per_image)
    if not rows:
        return {name: float("nan") for name in names}
    return {name: float(np.mean([row[name] for row in rows])) for name in names}


def masks_to_label_map(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Resolve possibly overlapping instance masks into one H x W int32 label map.

    Instance ``i`` (position in ``masks``) gets label ``i + 1``. Where masks overlap, the higher
    score wins; on equal scores the earlier instance wins. An instance hidden entirely by
    higher-scored ones does not appear in the map (COCO AP, which sees the raw masks, still
    counts it).

    Args:
        masks: N x H x W bool (CPU torch tensors are accepted too).
        scores: N confidence scores.
    """
    masks = np.asarray(masks)
    scores = np.asarray(scores)
    if masks.ndim != 3:
        raise ValueError(f"masks must be N x H x W, got shape {masks.shape}")
    if masks.dtype != bool:
        raise ValueError(f"masks must be boolean (threshold them first), got dtype {masks.dtype}")
    if scores.shape != (masks.shape[0],):
        raise ValueError(f"scores must have shape ({masks.shape[0]},), got {scores.shape}")
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    # Stable sort on -score: descending scores, ties kept in input order. Painting from the
    # lowest priority up lets the winner overwrite; one pass per mask, no N x H x W temporary
    # (an argmax over N is ~60x slower because it walks the stack with a stride of H * W).
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    for i in order[::-1]:
        np.copyto(labels, i + 1, where=masks[i])
    return labels
