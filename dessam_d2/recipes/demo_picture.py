"""The demo's picture: one held-out image with the outlines of the ground truth, the teacher (SAM
prompted with the true boxes) and DES-SAM side by side."""

import numpy as np
import torch
from detectron2.data import DatasetCatalog

from ..data.image_io import read_image_rgb
from ..data.mapper import DESSAMDatasetMapper
from ..utils.io import atomic_open
from .box_prior import gt_boxes_of

__all__ = ["comparison_picture"]


def _outlined(image: np.ndarray, label_map: np.ndarray, colour, scale: int) -> np.ndarray:
    """``image`` enlarged ``scale`` times (nearest) with each labelled object's outline drawn."""
    import cv2

    big = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    labels = cv2.resize(label_map, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)
    for i in np.unique(labels)[1:]:
        contours, _ = cv2.findContours(
            (labels == i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(big, contours, -1, colour, 2)
    return big


def _label_map(masks: torch.Tensor, scores: torch.Tensor) -> np.ndarray:
    """H x W int32 map of N bool masks, the higher score on top."""
    masks = masks.cpu().numpy()
    out = np.zeros(masks.shape[1:], np.int32)
    for rank, i in enumerate(np.argsort(scores.cpu().numpy())):
        out[masks[i]] = rank + 1
    return out


@torch.no_grad()
def comparison_picture(cfg, model, dataset_name: str, path: str, index: int = 0, scale: int = 3):
    """PNG of one held-out image: ground truth | teacher (SAM + true boxes) | DES-SAM outlines,
    enlarged ``scale`` times so outlines are visible. Returns the path."""
    import cv2

    from ..evaluation.nuclei_evaluator import annotations_to_label_map

    record = DatasetCatalog.get(dataset_name)[index]
    inputs = DESSAMDatasetMapper(cfg, is_train=False)(record)
    h, w = record["height"], record["width"]
    image = read_image_rgb(record["file_name"])
    scale_in = inputs["image"].shape[-1] / w
    boxes = torch.as_tensor(gt_boxes_of(record), dtype=torch.float32) * scale_in
    model.eval()
    teacher = model.segment_boxes([inputs], [boxes], student=False)[0]["instances"]
    student = model([inputs])[0]["instances"]
    panels = [
        ("ground truth", annotations_to_label_map(record["annotations"], h, w), (0, 200, 0)),
        ("teacher: SAM + true boxes", _label_map(teacher.pred_masks, teacher.scores), (0, 0, 255)),
        ("DES-SAM", _label_map(student.pred_masks, student.scores), (255, 0, 0)),
    ]
    tiles = []
    for title, labels, colour in panels:
        tile = _outlined(image, labels.astype(np.int32), colour, scale)
        cv2.putText(tile, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3)
        cv2.putText(tile, title, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
        tiles.append(tile)
    gap = np.full((tiles[0].shape[0], 6, 3), 255, np.uint8)
    picture = np.concatenate([tiles[0], gap, tiles[1], gap, tiles[2]], axis=1)
    with atomic_open(path) as f:
        f.write(cv2.imencode(".png", cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))[1].tobytes())
    return path
