"""Tissue on the thumbnail: tiles of glass are background, the others tissue."""

import numpy as np

from dessam_d2.inference.slides.reader import open_slide, slide_grid
from dessam_d2.inference.slides.tissue import slide_tiles, tissue_mask


def test_glass_corners_are_background_and_no_mask_is_all_tissue(slide):
    s = open_slide(slide)
    mask, per_px = tissue_mask(s)
    assert mask.dtype == bool and 0 < mask.mean() < 1 and per_px == 1024 / mask.shape[1]
    grid = slide_grid(s, slide)
    tiles = slide_tiles(grid, 128, 48, (mask, per_px))
    assert len(tiles) == 9 * 13 and [t.index for t in tiles] == list(range(len(tiles)))
    background = [t for t in tiles if not t.tissue]
    assert background and len(background) < len(tiles)
    corners = {(t.iy, t.ix) for t in background}
    assert corners & {(0, 0), (0, 12), (8, 0), (8, 12)}
    assert all(t.tissue for t in slide_tiles(grid, 128, 48, None))
    # a slide without bright glass is tissue everywhere
    dark = type("Dark", (), {})()
    dark.dimensions = (64, 64)
    dark.get_thumbnail = lambda size: __import__("PIL.Image").Image.fromarray(
        np.full((64, 64, 3), 90, np.uint8)
    )
    assert tissue_mask(dark)[0].all()
