"""A synthetic whole-slide image: synthetic cytology blocks in a pyramidal, tiled TIFF.

Written with tifffile as successive pages of the main IFD chain (level 0 ``subfiletype=0``,
each reduced level ``subfiletype=1``), tiled 256 x 256, resolution in pixels per centimetre:
OpenSlide 4 opens it as ``generic-tiff`` with every level and ``openslide.mpp-x`` (the same
levels written as SubIFDs open as one level). Blocks of ``block`` pixels inside an ellipse are
cytology (``render_synthetic_image``), the rest is white glass, so tissue detection has
something to skip. Tiles are rendered as they are written: memory does not grow with the size.
"""

from typing import Iterator, Optional, Tuple

import cv2
import numpy as np

from .cytology import render_synthetic_image

TIFF_TILE = 256


def _block(seed: int, index: Tuple[int, int], grid: Tuple[int, int], block: int) -> np.ndarray:
    by, bx = index
    gy, gx = grid
    inside = ((by + 0.5) / gy - 0.5) ** 2 + ((bx + 0.5) / gx - 0.5) ** 2 * 1.0 < 0.2
    if not inside:
        return np.full((block, block, 3), 255, np.uint8)
    rng = np.random.default_rng([seed, by, bx])
    image, _ = render_synthetic_image(rng, (block, block), (4, 10))
    return image


def _region(seed, y0, x0, h, w, size, block) -> np.ndarray:
    """Level-0 pixels [y0, y0 + h) x [x0, x0 + w), glass beyond the slide."""
    out = np.full((h, w, 3), 255, np.uint8)
    grid = (size[0] // block, size[1] // block)
    for by in range(y0 // block, min((y0 + h - 1) // block + 1, grid[0])):
        for bx in range(x0 // block, min((x0 + w - 1) // block + 1, grid[1])):
            b = _block(seed, (by, bx), grid, block)
            ys, xs = by * block, bx * block
            sy0, sy1 = max(y0, ys), min(y0 + h, ys + block)
            sx0, sx1 = max(x0, xs), min(x0 + w, xs + block)
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = b[
                sy0 - ys : sy1 - ys, sx0 - xs : sx1 - xs
            ]
    return out


def _tiles(seed, size, block, down) -> Iterator[np.ndarray]:
    h, w = -(-size[0] // down), -(-size[1] // down)
    for y in range(0, h, TIFF_TILE):
        for x in range(0, w, TIFF_TILE):
            region = _region(
                seed, y * down, x * down, TIFF_TILE * down, TIFF_TILE * down, size, block
            )
            if down > 1:
                region = cv2.resize(region, (TIFF_TILE, TIFF_TILE), interpolation=cv2.INTER_AREA)
            yield region


def write_synthetic_slide(
    path: str,
    size: Tuple[int, int],
    seed: int = 0,
    mpp: Optional[float] = 0.25,
    block: int = 256,
    levels: int = 3,
) -> None:
    """A (height, width) slide, multiples of ``block``; ``mpp=None`` writes no resolution."""
    import tifffile

    if size[0] % block or size[1] % block:
        raise ValueError(f"slide size {size} must be a multiple of the block {block}")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            down = 2**level
            shape = (-(-size[0] // down), -(-size[1] // down), 3)
            extra = {}
            if mpp:
                extra = dict(resolution=(1e4 / (mpp * down),) * 2, resolutionunit="CENTIMETER")
            tif.write(
                _tiles(seed, size, block, down),
                shape=shape,
                dtype=np.uint8,
                tile=(TIFF_TILE, TIFF_TILE),
                photometric="rgb",
                compression="zlib",
                subfiletype=0 if level == 0 else 1,
                **extra,
            )


def read_level0(path: str) -> np.ndarray:
    """The whole level 0 as RGB through OpenSlide (small test slides only)."""
    import openslide

    slide = openslide.OpenSlide(path)
    rgba = np.asarray(slide.read_region((0, 0), 0, slide.dimensions))
    return rgba[..., :3].copy()
