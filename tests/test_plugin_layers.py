"""napari layers' data <-> the project's types, both ways (dessam_d2/plugin/layers.py)."""

import numpy as np
import pytest

from dessam_d2.errors import UsageError
from dessam_d2.plugin.layers import (
    boxes_to_rectangles,
    image_data_to_rgb,
    polygon_to_vertices,
    rectangles_to_boxes,
    rows_to_features,
)


def test_boxes_become_rectangles_over_their_pixels_and_back():
    boxes = np.array([[3, 2, 7, 5], [0.5, 10.25, 20, 30]])
    rects = boxes_to_rectangles(boxes)
    # box x 3..7, y 2..5 covers columns 3-6 and rows 2-4: napari centres pixels on integers
    assert np.allclose(rects[0].min(0), [1.5, 2.5]) and np.allclose(rects[0].max(0), [4.5, 6.5])
    assert np.allclose(rectangles_to_boxes(rects), boxes)
    # a shape drawn in 3-D (a leading plane axis) and a rotated one: their bounding boxes
    tilted = np.array([[0, 5, 5], [0, 10, 10], [0, 5, 15], [0, 0, 10]], dtype=float)
    assert np.allclose(rectangles_to_boxes([tilted]), [[5.5, 0.5, 15.5, 10.5]])


def test_polygons_and_images_and_rows_convert():
    ring = [[1, 2], [5, 2], [5, 6], [1, 2]]  # GeoJSON x, y, closed
    assert np.allclose(polygon_to_vertices(ring), [[1.5, 0.5], [1.5, 4.5], [5.5, 4.5]])
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    rgb = image_data_to_rgb(grey, "g", rgb=False)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8 and rgb.max() == 255
    assert image_data_to_rgb([rgb, rgb[::2, ::2]], "pyramid", rgb=True).shape == (3, 4, 3)
    with pytest.raises(UsageError, match="stack of 5 planes"):
        image_data_to_rgb(np.zeros((5, 8, 8)), "stack", rgb=False)
    table = rows_to_features([{"id": 1, "area": 3}, {"id": 2, "area": 4}])
    assert table == {"id": [1, 2], "area": [3, 4], "index": [1, 2]}
