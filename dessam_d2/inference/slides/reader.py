"""Reading a whole-slide image (anything OpenSlide reads): opening it, the grid of "work" pixels
the model sees (a pyramid level or a resolution, cut to a region), its tiles' pixels and its
resolution."""

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import cv2
import numpy as np

from ...errors import InputNotFoundError, SlideError


def open_slide(path: str):
    import openslide

    if not os.path.isfile(path):
        raise InputNotFoundError(f"slide {path} does not exist: check the path")
    try:
        return openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(
            f"slide {path} cannot be opened by OpenSlide ({e}): is it complete, and a format "
            "OpenSlide reads (svs, ndpi, mrxs, scn, tiled pyramidal tif, ...)?"
        ) from None


def parse_roi(text: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    if not text:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise SlideError(f"--roi {text!r}: write x,y,w,h in level-0 pixels, e.g. 0,0,4096,4096")
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise SlideError(f"--roi {text!r}: x and y must be >= 0, w and h > 0")
    return x, y, w, h


@dataclass
class SlideGrid:
    """Where the work pixels come from: level ``level`` of the slide, ``scale`` level-0 pixels per
    work pixel, the work space's level-0 ``origin`` and its ``size`` (w, h) in work pixels."""

    level: int
    scale: float
    origin: Tuple[int, int]
    size: Tuple[int, int]


def slide_grid(
    slide,
    path: str,
    level: Optional[int] = None,
    mpp: Optional[float] = None,
    slide_mpp: Optional[float] = None,
    roi: Optional[Tuple[int, int, int, int]] = None,
) -> SlideGrid:
    """The level and scale for ``--level`` or ``--mpp`` (default: level 0), cut to ``--roi``."""
    import openslide

    if level is not None and mpp is not None:
        raise SlideError("give --level or --mpp, not both")
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise SlideError(
                f"slide {path} has levels 0..{slide.level_count - 1}; --level {level} is not one"
            )
        scale = float(slide.level_downsamples[level])
    elif mpp is not None:
        base = slide_mpp or float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, 0) or 0)
        if base <= 0:
            raise SlideError(
                f"slide {path} does not say its resolution ({openslide.PROPERTY_NAME_MPP_X}): "
                "pass --slide-mpp <its µm per pixel> with --mpp, or choose --level instead"
            )
        if mpp <= 0:
            raise SlideError(f"--mpp {mpp}: a resolution in µm per pixel is > 0")
        scale = mpp / base
        level = slide.get_best_level_for_downsample(max(scale, 1.0))
    else:
        level, scale = 0, 1.0
    width, height = slide.dimensions
    x, y, w, h = roi or (0, 0, width, height)
    if x >= width or y >= height:
        raise SlideError(f"--roi starts outside slide {path} ({width} x {height} at level 0)")
    w, h = min(w, width - x), min(h, height - y)
    return SlideGrid(level, scale, (x, y), (max(1, int(w / scale)), max(1, int(h / scale))))


def read_work_tile(slide, grid: SlideGrid, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The work pixels [y, y + h) x [x, x + w) as H x W x 3 uint8 RGB (transparent = white)."""
    down = float(slide.level_downsamples[grid.level])
    x0 = int(round(grid.origin[0] + x * grid.scale))
    y0 = int(round(grid.origin[1] + y * grid.scale))
    lw = max(1, int(round(w * grid.scale / down)))
    lh = max(1, int(round(h * grid.scale / down)))
    rgba = np.asarray(slide.read_region((x0, y0), grid.level, (lw, lh)))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255  # outside the scanned area
    if (lw, lh) != (w, h):
        shrink = lw > w
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return rgb


def level0_mpp(slide) -> Optional[float]:
    import openslide

    try:
        mpp = float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, 0) or 0)
    except ValueError:
        return None
    return mpp if mpp > 0 else None
