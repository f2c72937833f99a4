"""Nucleus outlines along the pixels' outer edges: polygon area = pixel area, valid geometry."""

import cv2
import numpy as np
import shapely
from shapely.geometry import shape

from dessam_d2.data.synthetic.cytology import render_synthetic_image
from dessam_d2.evaluation.metrics import masks_to_label_map
from dessam_d2.inference.features import label_polygons, to_geojson
from dessam_d2.inference.outlines import mask_polygons, one_piece_per_nucleus, ring_area


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


def test_one_piece_per_nucleus_by_hand():
    h, w = 40, 40
    a = np.zeros((h, w), dtype=bool)  # score 0.9: a 120-px block, a 4-px hole, a 9-px island and
    a[2:12, 2:14] = True  # an 80-px fragment 16 px away
    a[5:7, 5:7] = False
    a[30:33, 35:38] = True
    a[28:36, 2:12] = True
    b = np.zeros((h, w), dtype=bool)  # score 0.5: cut in two by c, loses its overlap with a
    b[8:22, 10:30] = True
    c = np.zeros((h, w), dtype=bool)  # score 0.7: a bar through b
    c[8:22, 18:21] = True
    out = one_piece_per_nucleus(np.stack([a, b, c]), np.array([0.9, 0.5, 0.7]))

    want_a = np.zeros((h, w), dtype=bool)
    want_a[2:12, 2:14] = True  # hole filled, island and the smaller fragment gone
    want_c = c.copy()  # nothing better overlaps it
    want_b = np.zeros((h, w), dtype=bool)
    want_b[8:22, 21:30] = True  # 126 px right of the bar, against 96 left (16 went to a)
    np.testing.assert_array_equal(out[0], want_a)
    np.testing.assert_array_equal(out[2], want_c)
    np.testing.assert_array_equal(out[1], want_b)
    # disjoint, so the label image keeps them whole: one Polygon each
    labels = masks_to_label_map(out, np.array([0.9, 0.5, 0.7]))
    assert all(len(p) == 1 for p in label_polygons(labels).values())
    assert len(label_polygons(masks_to_label_map(np.stack([a, b, c]), np.zeros(3) + 1))[1]) == 3


def test_one_piece_per_nucleus_without_clean_up_and_hidden_nuclei():
    a = np.zeros((10, 10), dtype=bool)
    a[0:2, 0:2] = a[5:9, 5:9] = True  # 4 + 16 px: with min_area 0 only the larger piece stays
    hidden = np.zeros_like(a)
    hidden[6:8, 6:8] = True
    rest = a.copy()  # takes the 4-px piece that ``a`` dropped
    out = one_piece_per_nucleus(np.stack([a, hidden, rest]), np.array([0.8, 0.3, 0.2]), min_area=0)
    assert out[0].sum() == 16 and out[0][5:9, 5:9].all()
    assert not out[1].any()  # all of it belongs to a better nucleus
    assert out[2].sum() == 4 and out[2][0:2, 0:2].all()
    assert one_piece_per_nucleus(np.zeros((0, 4, 4), bool), np.zeros(0)).shape == (0, 4, 4)
