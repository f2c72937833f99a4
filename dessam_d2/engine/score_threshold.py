"""The box score threshold fitted after training (TEST.SCORE_THRESH_AUTO), and the detector's
precision and recall on its training boxes that every training run reports.

Detectron2's MODEL.ROI_HEADS.SCORE_THRESH_TEST is one number for every model; the release's
0.55 suits its ViT-B detector, and a small or short-trained one may score every nucleus below
it and predict nothing. The threshold here is the one that maximises box F1 at IoU 0.5 on the
training images (StarDist's ``optimize_thresholds`` picks its thresholds the same way): the
detector runs once over them, boxes only, at a score floor, each detection is matched to the
true boxes greedily by score (``evaluation.boxes.match_boxes``), and precision, recall and F1
follow for every candidate threshold at once. Only the annotations' boxes are read, never a
mask.
"""

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog

from ..data.mapper import DESSAMDatasetMapper
from ..evaluation.boxes import match_boxes, true_boxes
from ..utils.io import atomic_write_text

__all__ = ["ThresholdFit", "fit_score_threshold", "best_f1_threshold", "report_fit"]

logger = logging.getLogger(__name__)

# Detections scored below this are not candidates (and not kept while fitting).
SCORE_FLOOR = 0.01
# Box recall on the training boxes below this gets a warning at the end of training.
LOW_RECALL = 0.5


@dataclass(frozen=True)
class ThresholdFit:
    """The fitted threshold and the detector's box precision / recall / F1 (IoU 0.5, fractions)
    on the training boxes at it, and at the config's fixed threshold."""

    threshold: float
    precision: float
    recall: float
    f1: float
    fixed_threshold: float
    fixed_precision: float
    fixed_recall: float
    images: int
    boxes: int


def best_f1_threshold(
    scores: np.ndarray, is_tp: np.ndarray, num_gt: int, fixed: float
) -> ThresholdFit:
    """From every detection's score and whether it matched a true box, the threshold of maximum
    F1 (the midway point between the last kept score and the next lower one, so that a score
    exactly at a fitted boundary does not decide) and the figures at it and at ``fixed``."""
    order = np.argsort(-scores, kind="stable")
    scores, is_tp = scores[order], is_tp[order].astype(np.float64)
    tp = np.cumsum(is_tp)
    kept = np.arange(1, len(scores) + 1)
    precision = tp / np.maximum(kept, 1)
    recall = tp / max(num_gt, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)

    def at(threshold: float) -> Tuple[float, float]:
        n = int((scores > threshold).sum())
        return (float(precision[n - 1]), float(recall[n - 1])) if n else (0.0, 0.0)

    if len(scores) == 0:
        threshold, best = float(fixed), (0.0, 0.0, 0.0)
    else:
        i = int(np.argmax(f1))  # the first (highest-threshold) maximum
        below = scores[i + 1] if i + 1 < len(scores) else SCORE_FLOOR
        threshold = float((scores[i] + below) / 2)
        best = (float(precision[i]), float(recall[i]), float(f1[i]))
    fixed_p, fixed_r = at(fixed)
    return ThresholdFit(threshold, *best, float(fixed), fixed_p, fixed_r, 0, int(num_gt))


def training_records(cfg: CfgNode) -> List[Dict]:
    """The training images the fit uses: all, or a fixed random subset of
    TEST.SCORE_THRESH_AUTO_MAX_IMAGES of them."""
    records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    cap = cfg.TEST.SCORE_THRESH_AUTO_MAX_IMAGES
    if cap > 0 and len(records) > cap:
        pick = np.random.default_rng(0).choice(len(records), cap, replace=False)
        records = [records[i] for i in sorted(pick)]
    return records


@torch.no_grad()
def fit_score_threshold(
    cfg: CfgNode, model: torch.nn.Module, records: Sequence[Dict]
) -> ThresholdFit:
    """Run ``model``'s detector (boxes only) over ``records`` and fit the threshold; the model's
    mode, score threshold and mask branch are restored afterwards."""
    model = getattr(model, "module", model)
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    was_training, mask_on = model.training, model.roi_heads.mask_on
    previous = model.set_score_threshold(SCORE_FLOOR)
    model.eval()
    model.roi_heads.mask_on = False
    scores, matched, num_gt = [], [], 0
    try:
        for record in records:
            inst = model([mapper(record)])[0]["instances"].to("cpu")
            gt = true_boxes(record)
            tp, n = match_boxes(inst.pred_boxes.tensor, inst.scores, gt, iou_threshold=0.5)
            scores.append(inst.scores.numpy())
            matched.append(np.asarray(tp, dtype=bool))
            num_gt += n
    finally:
        model.roi_heads.mask_on = mask_on
        model.set_score_threshold(previous)
        model.train(was_training)
    fit = best_f1_threshold(
        np.concatenate(scores) if scores else np.zeros(0),
        np.concatenate(matched) if matched else np.zeros(0, bool),
        num_gt,
        cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
    )
    return ThresholdFit(**{**asdict(fit), "images": len(records)})


def report_fit(fit: ThresholdFit, auto: bool, output_dir: str = "") -> List[str]:
    """Log the fit (one line, and a warning when the recall at the threshold in use is low) and
    write it to OUTPUT_DIR/score_threshold.json; returns the lines."""
    used = fit.threshold if auto else fit.fixed_threshold
    p, r = (fit.precision, fit.recall) if auto else (fit.fixed_precision, fit.fixed_recall)
    how = (
        "fitted: best box F1 on the training boxes" if auto else "MODEL.ROI_HEADS.SCORE_THRESH_TEST"
    )
    lines = [
        f"Box score threshold {used:.3f} ({how}): box precision {100 * p:.1f}%, recall "
        f"{100 * r:.1f}% at IoU 0.5 on {fit.boxes} training boxes of {fit.images} images "
        f"(at the fixed {fit.fixed_threshold:g}: precision {100 * fit.fixed_precision:.1f}%, "
        f"recall {100 * fit.fixed_recall:.1f}%)"
    ]
    logger.info(lines[0])
    if r < LOW_RECALL:
        lines.append(
            f"WARNING: the detector finds only {100 * r:.0f}% of the training nuclei at score "
            f"threshold {used:.3f}: train longer (SOLVER.EPOCHS), fit the anchors to your nuclei "
            "(MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES True) or let the threshold be fitted "
            "(TEST.SCORE_THRESH_AUTO True)"
        )
        logger.warning(lines[-1])
    if output_dir:
        text = json.dumps({**asdict(fit), "used": used, "auto": auto}, indent=1)
        atomic_write_text(os.path.join(output_dir, "score_threshold.json"), text + "\n")
    return lines
