"""The box prior: an ellipse inscribed in each box, the baseline that needs no model.

Nuclei are ellipse-like, so outlining each box's inscribed ellipse already scores well; a
segmenter prompted with the same boxes adds something only where it beats this. The demo prints
it beside the teacher (ground-truth boxes) and beside DES-SAM (the detector's boxes).
"""

from typing import Dict

import numpy as np
import torch
from detectron2.structures import Boxes, BoxMode, Instances

__all__ = ["inscribed_ellipses", "ellipse_instances", "gt_boxes_of"]


def inscribed_ellipses(boxes: np.ndarray, height: int, width: int) -> torch.Tensor:
    """N x H x W bool masks of the ellipse inscribed in each XYXY box (pixel centres inside):
    the box prior that needs no model."""
    masks = torch.zeros((len(boxes), height, width), dtype=torch.bool)
    for i, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        cx, cy, ax, ay = (
            (x0 + x1) / 2,
            (y0 + y1) / 2,
            max((x1 - x0) / 2, 0.5),
            max((y1 - y0) / 2, 0.5),
        )
        c0, c1 = max(int(np.floor(x0)), 0), min(int(np.ceil(x1)), width)
        r0, r1 = max(int(np.floor(y0)), 0), min(int(np.ceil(y1)), height)
        if c1 <= c0 or r1 <= r0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1] + 0.5
        inside = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0
        masks[i, r0:r1, c0:c1] = torch.from_numpy(inside)
    return masks


def ellipse_instances(boxes: np.ndarray, scores: np.ndarray, height: int, width: int) -> Instances:
    """Instances whose masks are the ellipses inscribed in ``boxes`` (original image frame)."""
    inst = Instances((height, width))
    inst.pred_boxes = Boxes(torch.as_tensor(np.asarray(boxes, np.float32).reshape(-1, 4)))
    inst.scores = torch.as_tensor(np.asarray(scores, np.float32).reshape(-1))
    inst.pred_classes = torch.zeros(len(inst.scores), dtype=torch.int64)
    inst.pred_masks = inscribed_ellipses(boxes, height, width)
    return inst


def gt_boxes_of(record: Dict) -> np.ndarray:
    boxes = [
        BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
        for a in record.get("annotations", [])
        if a.get("iscrowd", 0) == 0
    ]
    return np.asarray(boxes, np.float64).reshape(-1, 4)
