"""Where a slide's tissue is, and the slide's tiles, each marked tissue or background (tiles
without tissue on an Otsu-thresholded thumbnail are not predicted)."""

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import cv2
import numpy as np

from ..tiling import tile_starts
from .reader import SlideGrid

THUMBNAIL_SIDE = 2048


def tissue_mask(slide) -> Tuple[np.ndarray, float]:
    """Tissue on a thumbnail (Otsu on grey: tissue is darker than glass) and the level-0 pixels
    per thumbnail pixel. A slide without bright glass is all tissue (Otsu would split it)."""
    thumb = np.asarray(slide.get_thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE)).convert("RGB"))
    grey = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY)
    if np.percentile(grey, 99) < 200:
        return np.ones(grey.shape, bool), slide.dimensions[0] / grey.shape[1]
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return grey < threshold, slide.dimensions[0] / grey.shape[1]


@dataclass
class Tile:
    index: int
    iy: int
    ix: int
    x: int
    y: int
    w: int
    h: int
    tissue: bool = True


def slide_tiles(
    grid: SlideGrid, tile: int, overlap: int, tissue: Optional[Tuple[np.ndarray, float]]
) -> List[Tile]:
    w, h = grid.size
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    tiles = []
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            t = Tile(len(tiles), iy, ix, x, y, min(tile, w - x), min(tile, h - y))
            if tissue is not None:
                mask, per_px = tissue
                fx0 = (grid.origin[0] + x * grid.scale) / per_px
                fy0 = (grid.origin[1] + y * grid.scale) / per_px
                fx1 = (grid.origin[0] + (x + t.w) * grid.scale) / per_px
                fy1 = (grid.origin[1] + (y + t.h) * grid.scale) / per_px
                window = mask[int(fy0) : math.ceil(fy1), int(fx0) : math.ceil(fx1)]
                t.tissue = bool(window.any())
            tiles.append(t)
    return tiles
