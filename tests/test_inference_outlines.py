"""Nucleus outlines along the pixels' outer edges: polygon area = pixel area, valid geometry."""

import cv2
import numpy as np
import shapely
from shapely.geometry import shape

from dessam_d2.data.synthetic import render_synthetic_image
from dessam_d2.evaluation.metrics import masks_to_label_map
from dessam_d2.inference.outlines import mask_polygons, ring_area
from dessam_d2.inference.predictor import label_polygons, to_geojson


def test_one_pixel_is_its_unit_square_counter_clockwise_as_numbers():
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    assert mask_polygons(mask, offset=(10, 20)) == [
        [[[12, 21], [13, 21], [13, 22], [12, 22], [12, 21]]]
    ]
    assert ring_area([[0, 0], [1, 0], [1, 1], [0, 1], [0, 0]]) == 1.0


def test_holes_pinches_and_pieces_give_valid_polygons_of_the_pixel_area():
    ring_with_hole = np.ones((3, 3), bool)
    ring_with_hole[1, 1] = False
    (polygon,) = mask_polygons(ring_with_hole)
    assert [ring_area(r) for r in polygon] == [9.0, -1.0]

    c_touching_itself = np.array(
        [[1, 1, 1, 0], [1, 0, 0, 1], [1, 1, 1, 0]], bool
    )  # the right column's pixel touches the top and bottom rows only at corners
    diagonal_pieces = np.eye(3, dtype=bool)
    for mask, pieces in ((c_touching_itself, 2), (diagonal_pieces, 3)):
        polygons = mask_polygons(mask)
        geometry = shape({"type": "MultiPolygon", "coordinates": polygons})
        assert len(polygons) == pieces and geometry.is_valid and geometry.area == mask.sum()

    enclosed = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], bool)  # 4 pieces around a hole
    assert len(mask_polygons(enclosed)) == 4


def test_random_masks_are_reproduced_exactly_by_their_polygons():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:18, :21]
    for trial in range(60):
        if trial % 2:
            mask = np.kron(rng.random((6, 7)) < 0.55, np.ones((3, 3), bool))
        else:
            mask = rng.random((18, 21)) < 0.55
        geometry = shape({"type": "MultiPolygon", "coordinates": mask_polygons(mask, (5, 9))})
        assert geometry.is_valid, shapely.is_valid_reason(geometry)
        assert geometry.area == mask.sum()
        # independent truth: shapely's point-in-polygon at every pixel centre
        inside = shapely.contains_xy(geometry, xx + 5.5, yy + 9.5)
        assert (inside == mask).all()


def test_geojson_polygon_areas_equal_the_label_image_areas():
    image, masks = render_synthetic_image(np.random.default_rng(3), (128, 160), (25, 30))
    labels = masks_to_label_map(np.stack(masks), np.linspace(1, 0.5, len(masks)))
    ids = [i for i in np.unique(labels) if i]
    rows = [{"id": int(i), "area": int((labels == i).sum())} for i in ids]
    geo = to_geojson(labels, rows, offset=(1000, 2000))
    assert len(geo["features"]) == len(ids) > 20
    for feature, i in zip(geo["features"], ids):
        geometry = shape(feature["geometry"])
        assert geometry.is_valid
        assert geometry.area == feature["properties"]["measurements"]["area"]
        x0, y0, x1, y1 = geometry.bounds
        rows_i, cols_i = np.nonzero(labels == i)
        assert (x0, y0, x1, y1) == (
            cols_i.min() + 1000,
            rows_i.min() + 2000,
            cols_i.max() + 1001,
            rows_i.max() + 2001,
        )
    # OpenCV's contours through the boundary pixels' centres, the former outlines, fall short
    largest = max(ids, key=lambda i: (labels == i).sum())
    contours, _ = cv2.findContours(
        (labels == largest).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
    )
    assert cv2.contourArea(max(contours, key=len)) < 0.95 * (labels == largest).sum()
    assert sum(len(p) for p in label_polygons(labels).values()) >= len(ids)
