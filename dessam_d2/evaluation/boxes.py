"""Box precision and recall at an IoU threshold: how many nuclei the detector finds and how many
of its detections are nuclei, at the score threshold in use.

COCO's box AP averages over every threshold; a user sees one. Each detection, in decreasing
score, is matched to the unmatched true box it overlaps most if their IoU reaches the threshold
(0.5, as in COCO's AP50 and StarDist's matching); a matched detection is a true positive.
Precision = matched / detections, recall = matched / true boxes, pooled over a set's images.
"""

from typing import Dict, Iterable, Tuple

import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = ["BOX_IOU", "box_scores", "match_boxes", "true_boxes"]

BOX_IOU = 0.5


def true_boxes(record: Dict) -> torch.Tensor:
    """The non-crowd annotation boxes of a dataset dict, M x 4 XYXY (boxes only, never a mask)."""
    boxes = [
        BoxMode.convert(a["bbox"], a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS)
        for a in record.get("annotations", [])
        if a.get("iscrowd", 0) == 0
    ]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def match_boxes(
    pred_boxes: torch.Tensor,
    scores: torch.Tensor,
    gt_boxes: torch.Tensor,
    iou_threshold: float = BOX_IOU,
) -> Tuple[np.ndarray, int]:
    """Greedy matching by score of ``pred_boxes`` (N x 4, XYXY) to ``gt_boxes`` (M x 4, XYXY).

    Returns ``(is_tp, M)``: ``is_tp[i]`` (bool, in the order of ``pred_boxes``) says whether
    detection i matched a true box, each true box being matched at most once.
    """
    pred_boxes = torch.as_tensor(pred_boxes, dtype=torch.float32).reshape(-1, 4)
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32).reshape(-1, 4)
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if len(scores) != len(pred_boxes):
        raise ValueError(f"{len(pred_boxes)} boxes but {len(scores)} scores")
    is_tp = np.zeros(len(pred_boxes), dtype=bool)
    if len(pred_boxes) == 0 or len(gt_boxes) == 0:
        return is_tp, len(gt_boxes)
    iou = pairwise_iou(Boxes(pred_boxes), Boxes(gt_boxes)).numpy()
    free = np.ones(len(gt_boxes), dtype=bool)
    for i in np.argsort(-scores.numpy(), kind="stable"):
        candidates = np.where(free, iou[i], -1.0)
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_threshold:
            is_tp[i], free[j] = True, False
    return is_tp, len(gt_boxes)


def box_scores(rows: Iterable[Dict]) -> Dict[str, float]:
    """Pooled box precision / recall / F1 (percent) from per-image rows with ``box_tp`` (matched
    detections), ``num_pred`` (detections) and ``num_gt`` (true boxes)."""
    tp = pred = gt = 0
    for row in rows:
        tp, pred, gt = tp + int(row["box_tp"]), pred + int(row["num_pred"]), gt + int(row["num_gt"])
    precision = tp / pred if pred else 0.0
    recall = tp / gt if gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": 100.0 * precision,
        "recall": 100.0 * recall,
        "F1": 100.0 * f1,
        "detections": float(pred),
        "nuclei": float(gt),
    }
