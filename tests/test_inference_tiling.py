"""Tiles: their starts cover an image, their cores partition it, each nucleus has one owner."""

import numpy as np
import torch

from dessam_d2.inference.tiling import owned, tile_core, tile_cores, tile_starts


def test_tiles_cover_the_image_and_their_cores_partition_it():
    for length, tile, overlap in [(200, 64, 24), (64, 64, 10), (1000, 256, 64), (257, 256, 32)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        cores = [tile_core(starts, i, tile, length) for i in range(len(starts))]
        assert cores[0][0] == 0 and cores[-1][1] == length
        assert all(a[1] == b[0] for a, b in zip(cores, cores[1:]))


def test_each_box_centre_has_one_owner_in_numpy_and_torch():
    size, tile, overlap = (150, 200), 64, 24
    starts = (tile_starts(size[0], tile, overlap), tile_starts(size[1], tile, overlap))
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, 1, (200, 2)) * size  # (cy, cx) in image pixels
    owners = np.zeros(len(centres), int)
    for iy, y in enumerate(starts[0]):
        for ix, x in enumerate(starts[1]):
            # the boxes as the tile sees them: centre moved to the tile's pixels, 6 x 4 px
            cy, cx = centres[:, 0] - y, centres[:, 1] - x
            boxes = np.stack([cx - 2, cy - 3, cx + 2, cy + 3], axis=1).astype(np.float32)
            core = tile_cores(starts, iy, ix, tile, size)
            mine = owned(boxes, x, y, core)
            assert np.array_equal(mine, owned(torch.from_numpy(boxes), x, y, core).numpy())
            owners += mine
    assert (owners == 1).all()
