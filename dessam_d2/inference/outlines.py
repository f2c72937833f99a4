"""Nucleus outlines along the pixels' outer edges: a polygon's area is its pixel count.

OpenCV's contours join the centres of a region's boundary pixels, so they cut half a pixel off
every side (a 50-px nucleus keeps about 0.77 of its area). Here a pixel (row r, column c) is the
square [c, c + 1] x [r, r + 1], and an outline walks the edges between a nucleus' pixels and the
others: its shoelace area is exactly the number of pixels, and a point lies inside the polygon
exactly when the pixel holding it belongs to the nucleus.

Each 4-connected component of a mask becomes one polygon (shell, then holes); components that
touch only at a corner are separate polygons of a multipolygon. Where a component touches itself
at a corner (a C whose tips meet diagonally), the walk turns so as to keep to the background
pixel it came along: the enclosed background becomes a hole touching the shell at that corner,
not a shell that crosses itself, so polygons are valid (OGC) whatever the mask.
Coordinates follow the image (x right, y down); shells have a positive shoelace sum
(counter-clockwise as numbers, as RFC 7946 asks) and holes a negative one.
"""

from typing import Dict, List, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..evaluation.release_protocol import RELEASE_MIN_AREA, clean_mask, keep_largest_piece

# Walking directions, clockwise on the screen: right, down, left, up. Turning left is d + 3.
_STEPS = ((1, 0), (0, 1), (-1, 0), (0, -1))

Ring = List[List[float]]  # closed: first point == last point
Polygon = List[Ring]  # shell, then holes


def _directed_edges(mask: np.ndarray) -> Dict[Tuple[int, int], List[int]]:
    """Start corner (x, y) -> directions of the boundary edges leaving it, interior on the right."""
    m = np.pad(mask, 1)
    inner = m[1:-1, 1:-1]
    edges: Dict[Tuple[int, int], List[int]] = {}
    # (exposed side, start corner of that side relative to the pixel's top-left, direction)
    sides = (
        (inner & ~m[:-2, 1:-1], (0, 0), 0),  # top side, walked right
        (inner & ~m[1:-1, 2:], (1, 0), 1),  # right side, walked down
        (inner & ~m[2:, 1:-1], (1, 1), 2),  # bottom side, walked left
        (inner & ~m[1:-1, :-2], (0, 1), 3),  # left side, walked up
    )
    for exposed, (dx, dy), direction in sides:
        rows, cols = np.nonzero(exposed)
        for x, y in zip((cols + dx).tolist(), (rows + dy).tolist()):
            edges.setdefault((x, y), []).append(direction)
    return edges


def _trace_rings(mask: np.ndarray) -> List[Ring]:
    """Every boundary ring of ``mask``, corners only. Each edge is followed by the one edge
    leaving its end corner; where two leave it (the component touches itself at that corner),
    the left turn, which keeps to the background pixel the walk came along."""
    edges = _directed_edges(mask)
    used = set()
    rings = []
    for start, directions in edges.items():
        for first in directions:
            if (start, first) in used:
                continue
            corner, direction, came, ring = start, first, -1, []
            while True:
                used.add((corner, direction))
                if direction != came:
                    ring.append(list(corner))
                came = direction
                dx, dy = _STEPS[direction]
                corner = (corner[0] + dx, corner[1] + dy)
                out = edges[corner]
                direction = out[0] if len(out) == 1 else (came + 3) % 4
                if (corner, direction) == (start, first):
                    break
            if came == first:  # the start lies in the middle of a side: not a corner
                ring.pop(0)
            rings.append(ring + [list(ring[0])])
    return rings


def ring_area(ring: Sequence[Sequence[float]]) -> float:
    """Shoelace sum of a closed ring: positive for shells, negative for holes (see above)."""
    xy = np.asarray(ring, dtype=np.float64)
    return 0.5 * float(np.sum(xy[:-1, 0] * xy[1:, 1] - xy[1:, 0] * xy[:-1, 1]))


def mask_polygons(mask: np.ndarray, offset: Tuple[float, float] = (0, 0)) -> List[Polygon]:
    """One polygon (shell, holes...) per 4-connected component of ``mask``, in pixel-corner
    coordinates shifted by ``offset`` = (x, y); their areas add up to ``mask.sum()``."""
    components, n = ndimage.label(mask)  # 4-connectivity: corner-touching pixels are apart
    polygons = []
    for index, sl in enumerate(ndimage.find_objects(components), start=1):
        ox, oy = offset[0] + sl[1].start, offset[1] + sl[0].start
        rings = _trace_rings(components[sl] == index)
        rings.sort(key=ring_area, reverse=True)  # the shell is the one positive ring
        polygons.append([[[x + ox, y + oy] for x, y in ring] for ring in rings])
    return polygons


def geojson_geometry(polygons: List[Polygon]) -> Dict:
    """A GeoJSON Polygon for one component, a MultiPolygon for several."""
    if len(polygons) == 1:
        return {"type": "Polygon", "coordinates": polygons[0]}
    return {"type": "MultiPolygon", "coordinates": polygons}


def nucleus_feature(polygons: List[Polygon], name: str, measurements: Dict) -> Dict:
    """A GeoJSON Feature QuPath imports as a detection classified "Nucleus"."""
    return {
        "type": "Feature",
        "geometry": geojson_geometry(polygons),
        "properties": {
            "objectType": "detection",
            "classification": {"name": "Nucleus"},
            "name": name,
            "measurements": measurements,
        },
    }


def one_piece_per_nucleus(
    masks: np.ndarray, scores: np.ndarray, min_area: int = RELEASE_MIN_AREA
) -> np.ndarray:
    """Masks with one outline each: N x H x W bool -> N x H x W bool, disjoint.

    Best score first, each mask gets the release's clean-up (holes and islands under
    ``min_area`` px; ``evaluation.release_protocol.clean_mask``), loses the pixels of better
    nuclei (the label image's rule: the higher score owns a pixel) and keeps its largest
    4-connected piece, so its outline is one polygon. A mask left empty stays empty (the nucleus
    gets no pixel, as one hidden by better ones in the label image)."""
    masks = np.asarray(masks, dtype=bool)
    out = np.zeros_like(masks)
    taken = np.zeros(masks.shape[1:], dtype=bool)
    for i in np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"):
        mask = clean_mask(masks[i], min_area) if min_area > 0 else masks[i]
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if not rows.size:
            continue
        box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
        piece = keep_largest_piece(mask[box] & ~taken[box])
        out[i][box] = piece
        taken[box] |= piece
    return out
