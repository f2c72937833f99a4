"""Tiles: their starts cover an image, their cores partition it, each nucleus has one owner."""

import numpy as np
import torch
from conftest import DarkBlobModel

from dessam_d2.inference.predictor import Predictor
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


# ----------------------------------------------------- a nucleus exactly on a seam, end to end

SEAM_SIZE, SEAM_TILE, SEAM_OVERLAP = 288, 128, 48  # tiles at 0, 80, 160: seams at 104 and 184
SEAMS = (104, 184)
# box centres (cy, cx): on an x seam, on a y seam, where four cores meet, and inside one core
SEAM_CENTRES = (
    (40, 104), (240, 184),
    (104, 40), (184, 240),
    (104, 104), (184, 184), (104, 184), (184, 104),
    (40, 40),
)  # fmt: skip


def seam_image():
    """A glass-grey RGB image with a dark disc of 14 px per centre, its box [c - 7, c + 7) on
    both axes (the disc is centred on the pixel corner c), and the discs' label image."""
    img = np.full((SEAM_SIZE, SEAM_SIZE, 3), 220, np.uint8)
    truth = np.zeros((SEAM_SIZE, SEAM_SIZE), np.int32)
    yy, xx = np.mgrid[:SEAM_SIZE, :SEAM_SIZE]
    for i, (cy, cx) in enumerate(SEAM_CENTRES, start=1):
        disc = (yy - (cy - 0.5)) ** 2 + (xx - (cx - 0.5)) ** 2 <= 7**2
        img[disc] = 40
        truth[disc] = i
    return img, truth


def test_the_seam_image_puts_box_centres_exactly_where_ownership_switches():
    starts = tile_starts(SEAM_SIZE, SEAM_TILE, SEAM_OVERLAP)
    cores = [tile_core(starts, i, SEAM_TILE, SEAM_SIZE) for i in range(len(starts))]
    assert starts == [0, 80, 160] and cores == [(0, 104), (104, 184), (184, 288)]
    _, truth = seam_image()
    for i, (cy, cx) in enumerate(SEAM_CENTRES, start=1):
        ys, xs = np.nonzero(truth == i)
        assert (ys.min() + ys.max() + 1, xs.min() + xs.max() + 1) == (2 * cy, 2 * cx)
        # every tile that sees a disc sees all of it: no cut piece could be kept instead
        for s in starts:
            for lo, hi in ((ys.min(), ys.max()), (xs.min(), xs.max())):
                assert hi < s or lo >= s + SEAM_TILE or (lo >= s and hi < s + SEAM_TILE)


def test_a_box_centre_on_a_seam_or_a_corner_has_exactly_one_owner():
    size, tile = (SEAM_SIZE, SEAM_SIZE), SEAM_TILE
    starts = (tile_starts(size[0], tile, SEAM_OVERLAP), tile_starts(size[1], tile, SEAM_OVERLAP))
    for cy, cx in SEAM_CENTRES:
        owners = []
        for iy, y in enumerate(starts[0]):
            for ix, x in enumerate(starts[1]):
                box = np.array([[cx - 7 - x, cy - 7 - y, cx + 7 - x, cy + 7 - y]], np.float32)
                core = tile_cores(starts, iy, ix, tile, size)
                if owned(box, x, y, core)[0]:
                    owners.append((iy, ix))
                assert owned(torch.from_numpy(box), x, y, core)[0] == owned(box, x, y, core)[0]
        assert len(owners) == 1, ((cy, cx), owners)


def test_tiled_prediction_keeps_a_nucleus_on_a_seam_or_a_corner_once_and_whole():
    img, truth = seam_image()
    model = DarkBlobModel(image_size=SEAM_TILE)
    out = Predictor(model, tile_size=SEAM_TILE, tile_overlap=SEAM_OVERLAP)(img)
    assert model.calls == 9
    found = []
    for mask, box in zip(out.pred_masks.numpy(), out.pred_boxes.tensor.tolist()):
        ids = np.unique(truth[mask])
        assert len(ids) == 1 and ids[0] > 0 and mask.sum() == (truth == ids[0]).sum()
        cy, cx = SEAM_CENTRES[ids[0] - 1]
        assert box == [cx - 7, cy - 7, cx + 7, cy + 7]  # in image pixels
        found.append(int(ids[0]))
    assert sorted(found) == list(range(1, len(SEAM_CENTRES) + 1))  # each exactly once
