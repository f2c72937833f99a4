"""The authors' release's evaluation protocol (dessam_d2/evaluation/release_protocol.py).

The independent truth for the clean-up is segment-anything's own ``remove_small_regions`` (the
function the release's metric code copies), run on the whole image; the label maps are drawn by
hand.
"""

import numpy as np
import pytest
from scipy import ndimage

from dessam_d2.evaluation.metrics import masks_to_label_map
from dessam_d2.evaluation.release_protocol import (
    clean_mask,
    keep_largest_piece,
    relabel_components,
    release_label_map,
    remove_small_regions,
)

_EIGHT = np.ones((3, 3), dtype=bool)


def _random_mask(rng: np.random.Generator) -> np.ndarray:
    h, w = rng.integers(3, 40, 2)
    yy, xx = np.ogrid[:h, :w]
    mask = np.zeros((h, w), dtype=bool)
    for _ in range(rng.integers(0, 4)):
        y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(1, 12)
        mask |= (yy - y) ** 2 + (xx - x) ** 2 < r * r
    return mask ^ (rng.random((h, w)) < rng.choice([0.0, 0.05, 0.2]))


def _tied_small_islands(mask: np.ndarray, min_area: int) -> bool:
    """Every island is small and two share the largest size: SAM keeps the first in OpenCV's
    label order, which need not be the raster order used here (the one case left undefined)."""
    regions, n = ndimage.label(mask, structure=_EIGHT)
    sizes = np.bincount(regions.ravel())[1:]
    return n > 1 and sizes.max() < min_area and (sizes == sizes.max()).sum() > 1


def test_remove_small_regions_equals_sams_on_the_whole_image():
    from segment_anything.utils.amg import remove_small_regions as sam_remove_small_regions

    rng = np.random.default_rng(0)
    compared = 0
    for _ in range(400):
        mask, min_area = _random_mask(rng), int(rng.integers(1, 80))
        for mode in ("holes", "islands"):
            if mode == "islands" and _tied_small_islands(mask, min_area):
                continue
            want = np.asarray(sam_remove_small_regions(mask, min_area, mode)[0], dtype=bool)
            np.testing.assert_array_equal(remove_small_regions(mask, min_area, mode), want)
            compared += 1
    assert compared > 700


def test_holes_by_hand_inside_at_the_border_and_outside():
    mask = np.zeros((12, 30), dtype=bool)
    mask[0:8, 0:8] = True
    mask[2:4, 2:4] = False  # 4-px hole inside: filled
    mask[0:3, 5:7] = False  # 6-px notch open to the image's top edge only: a hole too (SAM)
    mask[2:10, 15:25] = True
    mask[4:8, 18:22] = False  # 16-px hole
    out = remove_small_regions(mask, 10, "holes")
    want = mask.copy()
    want[2:4, 2:4] = want[0:3, 5:7] = True
    want[4:8, 18:22] = False  # 16 >= 10: stays
    np.testing.assert_array_equal(out, want)
    # the background outside the boxes is far larger than 10 px: never a hole
    assert not out[11].any()


def test_islands_by_hand_and_all_small_keeps_the_largest():
    mask = np.zeros((10, 20), dtype=bool)
    mask[0:5, 0:5] = True  # 25 px
    mask[7:9, 10:12] = True  # 4 px
    mask[5, 5] = True  # 1 px, touching the block at a corner: the same 8-connected island
    out = remove_small_regions(mask, 10, "islands")
    want = mask.copy()
    want[7:9, 10:12] = False
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(remove_small_regions(mask, 100, "islands"), want)
    assert not remove_small_regions(np.zeros((4, 4), bool), 10, "islands").any()
    with pytest.raises(ValueError, match="mode"):
        remove_small_regions(mask, 10, "both")


def test_clean_mask_fills_holes_before_removing_islands():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:12, 2:12] = True
    mask[6:8, 6:8] = False
    mask[16:18, 16:18] = True
    want = np.zeros((20, 20), dtype=bool)
    want[2:12, 2:12] = True
    np.testing.assert_array_equal(clean_mask(mask, 70), want)


def test_relabel_components_splits_pieces_and_keeps_touching_ids_apart():
    labels = np.zeros((6, 10), dtype=np.int64)
    labels[0:2, 0:2] = 70000  # large id
    labels[2, 2] = 70000  # diagonal neighbour: same 8-connected piece
    labels[4:6, 0:2] = 70000  # a second piece
    labels[0:2, 2:4] = 3  # touches 70000 but is another nucleus
    out = relabel_components(labels)
    assert out.dtype == np.int32
    pieces = {tuple(sorted(set(out[labels == v].tolist()))) for v in (3, 70000)}
    assert pieces == {(1,), (2, 3)}
    assert out[0, 0] == out[2, 2] != out[4, 0]
    assert (out == 0).sum() == (labels == 0).sum()
    full = np.full((3, 3), 4)  # no background at all
    np.testing.assert_array_equal(relabel_components(full), np.ones((3, 3), np.int32))


def test_release_label_map_by_hand_against_ours():
    h, w = 30, 40
    a = np.zeros((h, w), dtype=bool)  # score 0.9
    a[2:12, 2:14] = True
    a[5:7, 5:7] = False  # 4-px hole: filled
    a[25:28, 35:38] = True  # 9-px island: removed
    b = np.zeros((h, w), dtype=bool)  # score 0.5, overlaps a at rows 8-12, cols 10-14
    b[8:16, 10:20] = True
    c = np.zeros((h, w), dtype=bool)  # score 0.7, two 80-px pieces: two nuclei
    c[20:28, 0:10] = True
    c[20:28, 20:30] = True
    masks, scores = np.stack([a, b, c]), np.array([0.9, 0.5, 0.7])

    want = np.zeros((h, w), dtype=np.int32)
    want[2:12, 2:14] = 1
    want[20:28, 0:10] = 2
    want[20:28, 20:30] = 3
    want[8:16, 10:20] = 4  # painted last (lowest score): wins the overlap
    np.testing.assert_array_equal(release_label_map(masks, scores), want)

    ours = masks_to_label_map(masks, scores)
    assert (ours[8:12, 10:14] == 1).all()  # ours: the higher score wins
    assert (ours[5:7, 5:7] == 0).all() and (ours[25:28, 35:38] == 1).all()
    assert np.unique(ours[20:28, :30]).tolist() == [0, 3]  # one nucleus in two pieces


def test_release_label_map_empty_and_invalid():
    assert not release_label_map(np.zeros((0, 4, 5), bool), np.zeros(0)).any()
    assert release_label_map(np.zeros((2, 4, 5), bool), np.zeros(2)).shape == (4, 5)
    with pytest.raises(ValueError, match="bool"):
        release_label_map(np.zeros((1, 4, 5), np.uint8), np.zeros(1))


def test_keep_largest_piece_four_and_eight_connected():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0:2, 0:2] = True  # 4 px
    mask[2, 2] = mask[3, 3] = mask[4, 4] = True  # diagonal chain: 3 4-connected pieces of 1
    mask[5, 0:3] = True  # 3 px
    four = keep_largest_piece(mask)
    np.testing.assert_array_equal(four, np.pad(np.ones((2, 2), bool), ((0, 4), (0, 4))))
    eight = keep_largest_piece(mask, connectivity=8)
    assert eight.sum() == 7 and not eight[5].any()
    assert not keep_largest_piece(np.zeros((3, 3), bool)).any()
