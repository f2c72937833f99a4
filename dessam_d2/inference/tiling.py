"""Cutting a large image or a slide into overlapping tiles, and which tile owns which nucleus.

Tiles of side ``tile`` start at ``tile_starts`` along each axis; each tile owns its core
(``tile_core``: seams halfway through each overlap), and keeps only the nuclei whose box centre
lies in it (``owned``), so a nucleus at a seam comes out once and whole."""

import math
from typing import List, Tuple


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_core(starts: List[int], index: int, tile: int, length: int) -> Tuple[int, int]:
    """The part of tile ``index`` it owns: seams halfway through each overlap, so the cores of
    all tiles partition [0, length) and every nucleus is kept by exactly one tile."""
    lo = 0 if index == 0 else (starts[index] + starts[index - 1] + tile) // 2
    hi = length if index == len(starts) - 1 else (starts[index + 1] + starts[index] + tile) // 2
    return lo, hi
