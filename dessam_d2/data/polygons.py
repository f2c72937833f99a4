"""Polygon checks of the converters: area, self-intersection, clipping to the image."""

import numpy as np
from detectron2.structures.masks import polygon_area as d2_polygon_area

__all__ = ["polygon_area", "polygon_self_intersects", "clip_polygon", "dedup_vertices"]


def polygon_area(points: np.ndarray) -> float:
    """Area of an N x 2 polygon (Detectron2's shoelace ``polygon_area``)."""
    return float(d2_polygon_area(points[:, 0], points[:, 1]))


def _cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a[..., 0] - o[..., 0]) * (b[..., 1] - o[..., 1]) - (a[..., 1] - o[..., 1]) * (
        b[..., 0] - o[..., 0]
    )


def polygon_self_intersects(points: np.ndarray) -> bool:
    """True when two edges of the closed N x 2 polygon cross or touch anywhere other than the
    shared vertex of neighbouring edges, or two neighbouring edges double back on each other."""
    n = len(points)
    a, b = points, np.roll(points, -1, axis=0)  # edge i: a[i] -> b[i]
    d = b - a
    # neighbouring edges: collinear and pointing backwards = a spike
    d_next = np.roll(d, -1, axis=0)
    turn = d[:, 0] * d_next[:, 1] - d[:, 1] * d_next[:, 0]
    if np.any((np.abs(turn) <= 1e-12) & ((d * d_next).sum(1) < 0)):
        return True
    i, j = np.triu_indices(n, k=2)
    keep = ~((i == 0) & (j == n - 1))  # first and last edge are neighbours too
    i, j = i[keep], j[keep]
    if len(i) == 0:
        return False
    p, q, r, s = a[i], b[i], a[j], b[j]
    o1, o2, o3, o4 = _cross(p, q, r), _cross(p, q, s), _cross(r, s, p), _cross(r, s, q)
    boxes_overlap = (
        (np.minimum(p[:, 0], q[:, 0]) <= np.maximum(r[:, 0], s[:, 0]))
        & (np.minimum(r[:, 0], s[:, 0]) <= np.maximum(p[:, 0], q[:, 0]))
        & (np.minimum(p[:, 1], q[:, 1]) <= np.maximum(r[:, 1], s[:, 1]))
        & (np.minimum(r[:, 1], s[:, 1]) <= np.maximum(p[:, 1], q[:, 1]))
    )
    # o1*o2 <= 0 and o3*o4 <= 0: each segment's ends straddle (or touch) the other's line;
    # the box test rules out collinear segments that do not overlap
    return bool(np.any((o1 * o2 <= 0) & (o3 * o4 <= 0) & boxes_overlap))


def clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland–Hodgman clip of an N x 2 polygon to [0, width] x [0, height] (M x 2, M >= 0)."""
    # each boundary: (axis, limit, keep_if_less_equal)
    for axis, limit, below in (
        (0, 0.0, False),
        (0, width, True),
        (1, 0.0, False),
        (1, height, True),
    ):
        if len(points) == 0:
            break
        inside = points[:, axis] <= limit if below else points[:, axis] >= limit
        out = []
        for k in range(len(points)):
            cur, prev = points[k], points[k - 1]
            if inside[k] != inside[k - 1]:
                t = (limit - prev[axis]) / (cur[axis] - prev[axis])
                out.append(prev + t * (cur - prev))
            if inside[k]:
                out.append(cur)
        points = np.array(out, dtype=np.float64).reshape(-1, 2)
    return points


def dedup_vertices(points: np.ndarray) -> np.ndarray:
    """Drop consecutive repeats, including a closing point equal to the first."""
    if len(points) < 2:
        return points
    different = np.any(points != np.roll(points, 1, axis=0), axis=1)
    return points[different] if different.any() else points[:1]
