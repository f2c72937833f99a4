"""Nuclei evaluation: per-image instance metrics and the Detectron2 evaluators built on them."""

from .metrics import (
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
from .nuclei_evaluator import (
    NucleiEvaluator,
    annotations_to_label_map,
    build_nuclei_evaluators,
    segmentation_to_rle,
)
from .release_protocol import (
    RELEASE_MIN_AREA,
    clean_mask,
    keep_largest_piece,
    relabel_components,
    release_label_map,
)

__all__ = [
    "METRIC_NAMES",
    "NucleiEvaluator",
    "aji",
    "aji_plus",
    "annotations_to_label_map",
    "build_nuclei_evaluators",
    "dice",
    "masks_to_label_map",
    "mean_metrics",
    "nuclei_metrics",
    "object_dice",
    "panoptic_quality",
    "RELEASE_MIN_AREA",
    "clean_mask",
    "keep_largest_piece",
    "relabel_components",
    "release_label_map",
    "segmentation_to_rle",
]
