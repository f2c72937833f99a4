"""Anchors fitted to the training boxes (MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES).

The paper's anchors (32-256 px on a 1024 px input) suit its data sets' nuclei; a lab's own images
(another magnification, another tile size) or the demo's 256 px input hold nuclei of other
sizes, and an RPN whose anchors miss them learns slowly or not at all. Fitting keeps the
config's counts (one size per pyramid level, as many aspect ratios as configured) and takes
their values from the training boxes as the model sees them (resized so that the longest image
side is MODEL.SAM.IMAGE_SIZE): sizes are evenly spaced quantiles of sqrt(w * h), smallest on the
finest level, aspect ratios (h / w, Detectron2's convention) evenly spaced quantiles of h / w.
Only the boxes are read. The fitted values replace SIZES and ASPECT_RATIOS in the config, so
they are printed, written in the run's config.yaml, and saved with every checkpoint.
"""

import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.structures import BoxMode

from ..errors import EmptyDatasetError

__all__ = ["fit_anchor_shapes", "training_box_sizes", "fit_anchors_to_training_boxes"]

logger = logging.getLogger(__name__)


def _quantiles(values: np.ndarray, n: int) -> List[float]:
    return [float(np.quantile(values, (i + 0.5) / n)) for i in range(n)]


def fit_anchor_shapes(
    wh: np.ndarray, num_sizes: int, num_ratios: int
) -> Tuple[List[List[float]], List[List[float]]]:
    """(SIZES, ASPECT_RATIOS) for boxes of widths and heights ``wh`` (N x 2, model input px):
    ``num_sizes`` levels of one size each and one list of ``num_ratios`` ratios."""
    wh = np.asarray(wh, dtype=np.float64).reshape(-1, 2)
    wh = wh[(wh > 0).all(axis=1)]
    if len(wh) == 0:
        raise EmptyDatasetError("no training box to fit the anchors to")
    sizes = _quantiles(np.sqrt(wh[:, 0] * wh[:, 1]), num_sizes)
    ratios = _quantiles(wh[:, 1] / wh[:, 0], num_ratios)
    for values in (sizes, ratios):  # strictly increasing, two decimals
        for i in range(len(values)):
            values[i] = round(values[i], 2)
            if i and values[i] <= values[i - 1]:
                values[i] = round(values[i - 1] * 1.05 + 0.01, 2)
    return [[s] for s in sizes], [ratios]


def training_box_sizes(records: Sequence[Dict], image_size: int) -> np.ndarray:
    """N x 2 widths and heights of the records' boxes (crowd ones excluded), at the model's
    input size."""
    out = []
    for r in records:
        scale = image_size / max(r["height"], r["width"])
        for a in r.get("annotations", []):
            if a.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = BoxMode.convert(
                a["bbox"], a.get("bbox_mode", BoxMode.XYWH_ABS), BoxMode.XYXY_ABS
            )
            out.append(((x1 - x0) * scale, (y1 - y0) * scale))
    return np.asarray(out, dtype=np.float64).reshape(-1, 2)


def fit_anchors_to_training_boxes(cfg: CfgNode) -> str:
    """Replace the (unfrozen) config's anchor sizes and ratios by the ones fitted to the boxes of
    DATASETS.TRAIN; returns the line that says what was fitted (also logged)."""
    anchors = cfg.MODEL.ANCHOR_GENERATOR
    records = [r for name in cfg.DATASETS.TRAIN for r in DatasetCatalog.get(name)]
    wh = training_box_sizes(records, cfg.MODEL.SAM.IMAGE_SIZE)
    if len(wh) == 0:
        raise EmptyDatasetError(
            f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} has no box to fit the anchors to "
            "(MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES): annotate boxes, or set it False"
        )
    num_ratios = len(anchors.ASPECT_RATIOS[0])
    sizes, ratios = fit_anchor_shapes(wh, len(anchors.SIZES), num_ratios)
    line = (
        f"Anchors fitted to {len(wh)} training boxes (sqrt(area) median "
        f"{np.median(np.sqrt(wh.prod(axis=1))):.1f} px at {cfg.MODEL.SAM.IMAGE_SIZE} px input): "
        f"MODEL.ANCHOR_GENERATOR.SIZES {sizes}, ASPECT_RATIOS {ratios} (config's: "
        f"{[list(s) for s in anchors.SIZES]}, {[list(r) for r in anchors.ASPECT_RATIOS]})"
    )
    anchors.SIZES, anchors.ASPECT_RATIOS = sizes, ratios
    logger.info(line)
    return line
