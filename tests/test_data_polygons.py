"""Polygon checks of the converters (data/polygons.py): numbers worked out by hand."""

import numpy as np
import pytest

from dessam_d2.data.polygons import clip_polygon, polygon_area, polygon_self_intersects

SQUARE = [[10, 10], [30, 10], [30, 20], [10, 20]]


def test_area_of_a_square_and_of_a_triangle_either_orientation():
    square = np.array(SQUARE, float)
    assert polygon_area(square) == 200 and polygon_area(square[::-1]) == 200
    assert polygon_area(np.array([[0, 0], [4, 0], [0, 3]], float)) == 6


@pytest.mark.parametrize(
    "points, expected",
    [
        (SQUARE, False),
        ([[0, 0], [10, 10], [10, 0], [0, 10]], True),  # bow-tie
        ([[0, 0], [4, 0], [2, 0], [2, 3]], True),  # spike doubling back
        ([[0, 0], [4, 0], [4, 4], [2, 0], [0, 4]], True),  # vertex touching an edge
        ([[0, 0], [4, 0], [4, 4], [2, 1], [0, 4]], False),  # concave but simple
    ],
)
def test_self_intersection(points, expected):
    assert polygon_self_intersects(np.array(points, float)) is expected


def test_clip_polygon_numbers():
    clipped = clip_polygon(np.array([[-5, -5], [10, -5], [10, 10], [-5, 10]], float), 8, 6)
    assert polygon_area(clipped) == 48
    np.testing.assert_array_equal(clipped.min(0), [0, 0])
    np.testing.assert_array_equal(clipped.max(0), [8, 6])
    assert len(clip_polygon(np.array([[20, 20], [30, 20], [30, 30]], float), 8, 6)) == 0
