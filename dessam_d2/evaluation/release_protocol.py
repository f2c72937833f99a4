"""The authors' release's evaluation protocol, as an option next to ours.

Ours (``metrics.masks_to_label_map``) keeps every mask as predicted and, where masks overlap,
gives the pixel to the higher score. The release's metric code (its ``NucleiMetric``) instead

1. cleans each predicted mask with SAM's ``remove_small_regions``: background regions ("holes")
   under 70 px are filled, then pieces ("islands") under 70 px are removed (if every piece is
   that small, the largest stays); both with 8-connectivity;
2. paints the masks in the detector's output order, best score first, so that *later* (lower
   scored) masks overwrite earlier ones where they overlap; the GT the same way, later wins;
3. relabels both label maps by connected components (8-connectivity, ``skimage.measure.label``):
   every piece of a nucleus becomes a nucleus of its own.

Metrics are then ours (``metrics.nuclei_metrics``) on the two maps. Here the clean-up runs on
each mask's bounding box (1 px wider), which gives SAM's full-image answer exactly (tested
against ``segment_anything.utils.amg.remove_small_regions``); where the image outside the box is
too small to decide it from the box alone, it runs on the whole image.
"""

from typing import List, Tuple

import numpy as np
from scipy import ndimage

__all__ = [
    "RELEASE_MIN_AREA",
    "clean_mask",
    "keep_largest_piece",
    "relabel_components",
    "release_label_map",
    "remove_small_regions",
]

RELEASE_MIN_AREA = 70  # px, the release's min_area for holes and islands
_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, as cv2's and skimage's defaults there


def _box(mask: np.ndarray) -> Tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _outside_pieces(shape: Tuple[int, int], box: Tuple[int, int, int, int]) -> List[int]:
    """Areas of the connected pieces of the image outside an axis-aligned box."""
    (h, w), (y0, y1, x0, x1) = shape, box
    full_w, full_h = x0 == 0 and x1 == w, y0 == 0 and y1 == h
    if full_w and full_h:
        return []
    if full_w:
        pieces = [y0 * w, (h - y1) * w]
    elif full_h:
        pieces = [x0 * h, (w - x1) * h]
    else:
        pieces = [h * w - (y1 - y0) * (x1 - x0)]
    return [a for a in pieces if a > 0]


def remove_small_regions(mask: np.ndarray, min_area: int, mode: str) -> np.ndarray:
    """SAM's ``remove_small_regions(mask, min_area, mode)[0]``: ``mode="holes"`` fills background
    regions under ``min_area`` px, ``"islands"`` removes pieces under it (keeping the largest if
    all are). 8-connected regions; H x W bool in, a new H x W bool out."""
    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    mask = np.asarray(mask, dtype=bool)
    out = mask.copy()
    if not mask.any():  # SAM: no hole is small (the one background region is the image)...
        return out  # ...and no island exists
    box = _box(mask)
    h, w = mask.shape
    whole = mode == "holes" and any(a < min_area for a in _outside_pieces(mask.shape, box))
    if whole:  # a small piece outside the box could be a hole: decide on the whole image
        y0, y1, x0, x1 = 0, h, 0, w
    else:  # the box and 1 px around it (where the image has it)
        y0, y1 = max(box[0] - 1, 0), min(box[1] + 1, h)
        x0, x1 = max(box[2] - 1, 0), min(box[3] + 1, w)
    crop = mask[y0:y1, x0:x1]
    regions, n = ndimage.label(~crop if mode == "holes" else crop, structure=_EIGHT)
    if n == 0:
        return out
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    if mode == "holes":
        small = sizes < min_area
        if not whole:  # regions reaching past the box join a piece outside of >= min_area px
            inside = np.zeros(crop.shape, dtype=bool)
            inside[box[0] - y0 : box[1] - y0, box[2] - x0 : box[3] - x0] = True
            outer = np.unique(regions[~inside])
            small[outer[outer > 0] - 1] = False
        out[y0:y1, x0:x1] |= small[regions - 1] & (regions > 0)
        return out
    keep = sizes >= min_area
    if not keep.any():
        keep[int(np.argmax(sizes))] = True  # SAM keeps the largest piece
    out[y0:y1, x0:x1] = keep[regions - 1] & (regions > 0)
    return out


def clean_mask(mask: np.ndarray, min_area: int = RELEASE_MIN_AREA) -> np.ndarray:
    """The release's clean-up of one mask: holes under ``min_area`` px filled, then islands
    under it removed (SAM's ``remove_small_regions`` in that order)."""
    return remove_small_regions(remove_small_regions(mask, min_area, "holes"), min_area, "islands")


def keep_largest_piece(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Only the largest connected piece of ``mask`` (the first in raster order on a tie)."""
    structure = _EIGHT if connectivity == 8 else None  # None: ndimage's 4-connectivity
    regions, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return np.asarray(mask, dtype=bool).copy()
    sizes = np.bincount(regions.ravel(), minlength=n + 1)[1:]
    return regions == int(np.argmax(sizes)) + 1


def relabel_components(labels: np.ndarray) -> np.ndarray:
    """Every 8-connected piece of every id its own id 1..n (ids by first id, then raster order
    of the piece in the id's box), as ``skimage.measure.label`` does with background 0."""
    out = np.zeros(labels.shape, dtype=np.int32)
    ids, compact = np.unique(labels, return_inverse=True)
    compact = compact.reshape(labels.shape)
    if ids.size and ids[0] != 0:  # no background pixel: index 0 is a nucleus too
        compact = compact + 1
    next_id = 1
    for index, sl in enumerate(ndimage.find_objects(compact), start=1):
        if sl is None:
            continue
        pieces, n = ndimage.label(compact[sl] == index, structure=_EIGHT)
        np.copyto(out[sl], pieces + (next_id - 1), where=pieces > 0)
        next_id += n
    return out


def release_label_map(
    masks: np.ndarray, scores: np.ndarray, min_area: int = RELEASE_MIN_AREA
) -> np.ndarray:
    """The release's predicted label map (H x W int32) from N x H x W bool masks: each cleaned
    (:func:`clean_mask`), painted best score first with later masks overwriting, then
    :func:`relabel_components`."""
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.dtype != bool:
        raise ValueError(f"masks must be N x H x W bool, got {masks.dtype} {masks.shape}")
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    # MMDetection hands its detections over sorted by score, best first; ties keep input order.
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    for k, i in enumerate(order, start=1):
        if masks[i].any():
            labels[clean_mask(masks[i], min_area)] = k
    return relabel_components(labels)
