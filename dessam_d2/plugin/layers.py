"""Between napari layers' data and the project's types, both ways, in one place.

napari puts pixel (row r, column c) at the integer coordinate (r, c), its area spanning
r - 0.5 .. r + 0.5; the project's boxes (Detectron2, COCO) are XYXY in pixel-corner coordinates,
pixel (r, c) spanning x = c .. c + 1. So a box's rectangle in napari is shifted by half a pixel:
its vertices are (y - 0.5, x - 0.5), and it covers exactly the box's pixels on screen.
"""

from typing import Dict, List, Sequence

import numpy as np

from ..data.image_io import array_to_rgb
from ..errors import UsageError

__all__ = [
    "boxes_to_rectangles",
    "rectangles_to_boxes",
    "polygon_to_vertices",
    "image_data_to_rgb",
    "labels_data",
    "rows_to_features",
]


def boxes_to_rectangles(boxes: np.ndarray) -> List[np.ndarray]:
    """N x 4 XYXY boxes -> N napari rectangles (4 x 2 vertices, (row, column), clockwise from
    the top left)."""
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
        t, l_, b, r = y0 - 0.5, x0 - 0.5, y1 - 0.5, x1 - 0.5
        out.append(np.array([[t, l_], [t, r], [b, r], [b, l_]]))
    return out


def rectangles_to_boxes(shapes: Sequence[np.ndarray]) -> np.ndarray:
    """napari shapes (each V x 2 or V x D vertices; the last two axes are row, column) -> N x 4
    XYXY boxes: each shape's bounding box (a rotated rectangle becomes its axis-aligned box)."""
    boxes = np.zeros((len(shapes), 4))
    for i, vertices in enumerate(shapes):
        v = np.asarray(vertices, dtype=np.float64)[:, -2:]
        (r0, c0), (r1, c1) = v.min(axis=0), v.max(axis=0)
        boxes[i] = (c0 + 0.5, r0 + 0.5, c1 + 0.5, r1 + 0.5)
    return boxes


def polygon_to_vertices(points: Sequence[Sequence[float]]) -> np.ndarray:
    """A polygon in pixel-corner (x, y) coordinates (GeoJSON, COCO) -> napari (row, column)
    vertices; the closing point of a GeoJSON ring is dropped."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(p) > 1 and np.array_equal(p[0], p[-1]):
        p = p[:-1]
    return p[:, ::-1] - 0.5


def image_data_to_rgb(data, name: str, rgb: bool) -> np.ndarray:
    """An Image layer's data (2-D grey, or H x W x 3/4 with ``rgb``; multiscale: its first level)
    -> H x W x 3 uint8 RGB, as ``read_image_rgb`` converts a file."""
    if isinstance(data, (list, tuple)):  # multiscale: full resolution first
        data = data[0]
    array = np.asarray(data)
    if array.ndim == 3 and not rgb:
        raise UsageError(
            f"image layer '{name}' is a stack of {array.shape[0]} planes: pick a 2-D grey or "
            "RGB image, or split the stack (Layers > Split Stack)"
        )
    if array.ndim not in (2, 3):
        raise UsageError(f"image layer '{name}' has {array.ndim} dimensions: pick a 2-D image")
    return array_to_rgb(array, f"image layer '{name}'")


def labels_data(data, name: str, shape) -> np.ndarray:
    """A Labels layer's data as an int32 label image of ``shape`` (H, W)."""
    if isinstance(data, (list, tuple)):
        data = data[0]
    array = np.asarray(data)
    if array.shape != tuple(shape):
        raise UsageError(
            f"labels layer '{name}' is {array.shape[1]} x {array.shape[0]} px, the image "
            f"{shape[1]} x {shape[0]}: pick the labels of this image"
        )
    return array.astype(np.int32)


def rows_to_features(rows: Sequence[Dict]) -> Dict[str, list]:
    """Per-nucleus rows (``tools/predict.py``'s CSV) -> layer features (a column per field;
    ``index`` = the nucleus' label, which napari's Labels layer matches)."""
    if not rows:
        return {}
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    columns["index"] = columns["id"]
    return columns
