"""What each nucleus gets in the outputs: its CSV row (``nucleus_features``, the columns of
``CSV_FIELDS``) and its GeoJSON outline with that row as QuPath measurements (``to_geojson``).
"""

import math
from typing import Dict, List, Tuple

import cv2
import numpy as np
from scipy import ndimage

from .outlines import Polygon, mask_polygons, nucleus_feature

CSV_FIELDS = [
    "id",
    "score",
    "x0",
    "y0",
    "x1",
    "y1",
    "area",
    "perimeter",
    "circularity",
    "eccentricity",
    "mean_intensity",
    "integrated_intensity",
    "brightfield_integrated_od",
]


def nucleus_features(image: np.ndarray, labels: np.ndarray, scores: Dict[int, float]) -> List[Dict]:
    """Per-nucleus morphology and intensity features from the label image.

    mean_intensity and integrated_intensity are the mean and the sum of the grey image (ITU-R
    601 luma, 0-255) over the nucleus' pixels. brightfield_integrated_od is the integrated optical
    density (IOD), the sum over those pixels of OD = log10(I0 / I), I0 the median grey level of
    the background (label 0), I >= 1: an absorbance measure of stained brightfield images; on a
    fluorescence image (nuclei brighter than the background) it is negative and meaningless, and
    integrated_intensity is the measure to use.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)
    background = grey[labels == 0]
    i0 = float(np.median(background)) if background.size else 255.0
    od = np.log10(max(i0, 1.0) / np.maximum(grey, 1.0))
    rows = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        mask = labels[sl] == idx
        area = int(mask.sum())
        contours, _ = cv2.findContours(
            np.pad(mask, 1).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        perimeter = float(sum(cv2.arcLength(c, True) for c in contours))
        m = cv2.moments(mask.astype(np.uint8), binaryImage=True)
        cov = np.array([[m["mu20"], m["mu11"]], [m["mu11"], m["mu02"]]]) / max(m["m00"], 1.0)
        lo, hi = np.sort(np.linalg.eigvalsh(cov))
        rows.append(
            {
                "id": idx,
                "score": round(scores.get(idx, float("nan")), 4),
                "x0": sl[1].start,
                "y0": sl[0].start,
                "x1": sl[1].stop,
                "y1": sl[0].stop,
                "area": area,
                "perimeter": round(perimeter, 2),
                "circularity": round(4 * math.pi * area / perimeter**2, 4) if perimeter else 0.0,
                "eccentricity": round(math.sqrt(1 - lo / hi), 4) if hi > 0 else 0.0,
                "mean_intensity": round(float(grey[sl][mask].mean()), 2),
                "integrated_intensity": round(float(grey[sl][mask].sum()), 1),
                "brightfield_integrated_od": round(float(od[sl][mask].sum()), 3),
            }
        )
    return rows


def label_polygons(
    labels: np.ndarray, offset: Tuple[float, float] = (0, 0)
) -> Dict[int, List[Polygon]]:
    """Each labelled nucleus as polygons (shell, holes...) along its pixels' outer edges, in
    pixel-corner coordinates shifted by ``offset`` = (x, y): a nucleus' polygon area equals its
    pixel count (see dessam_d2/inference/outlines.py); one polygon per 4-connected piece."""
    polygons = {}
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None:
            origin = (offset[0] + sl[1].start, offset[1] + sl[0].start)
            polygons[idx] = mask_polygons(labels[sl] == idx, origin)
    return polygons


def to_geojson(labels: np.ndarray, rows: List[Dict], offset: Tuple[float, float] = (0, 0)) -> Dict:
    """A FeatureCollection QuPath imports as detections classified "Nucleus": a Polygon per
    nucleus (a MultiPolygon for one split into pieces) with its CSV row as measurements."""
    by_id = {r["id"]: r for r in rows}
    features = [
        nucleus_feature(
            polygons, f"nucleus {idx}", {k: v for k, v in by_id[idx].items() if k != "id"}
        )
        for idx, polygons in label_polygons(labels, offset).items()
    ]
    return {"type": "FeatureCollection", "features": features}
