"""Each nucleus' CSV row: morphology and intensity features."""

import math

import numpy as np
import pytest

from dessam_d2.inference.features import CSV_FIELDS, nucleus_features


def test_features_of_a_disc_and_an_ellipse():
    labels = np.zeros((80, 80), np.int32)
    yy, xx = np.mgrid[:80, :80]
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2] = 1
    labels[((yy - 60) / 5.0) ** 2 + ((xx - 50) / 20.0) ** 2 <= 1] = 2
    image = np.full((80, 80, 3), 200, np.uint8)
    image[labels == 1] = 20
    rows = nucleus_features(image, labels, {1: 0.9, 2: 0.8})
    disc, ellipse = rows
    assert disc["area"] == (labels == 1).sum() and disc["score"] == 0.9
    assert disc["circularity"] == pytest.approx(1.0, abs=0.12)
    assert disc["eccentricity"] == pytest.approx(0.0, abs=0.05)
    assert ellipse["eccentricity"] == pytest.approx(math.sqrt(1 - (5 / 20) ** 2), abs=0.02)
    assert (disc["x0"], disc["y0"], disc["x1"], disc["y1"]) == (5, 5, 36, 36)
    assert disc["mean_intensity"] == pytest.approx(20, abs=0.5)
    # Background grey 200, nucleus 20: OD = log10(200/20) = 1 per pixel.
    assert disc["brightfield_integrated_od"] == pytest.approx(disc["area"], rel=1e-3)
    assert ellipse["brightfield_integrated_od"] == pytest.approx(0.0, abs=1e-6)
    assert disc["integrated_intensity"] == 20 * disc["area"]
    assert ellipse["integrated_intensity"] == 200 * ellipse["area"]


def test_fluorescence_nuclei_have_an_integrated_intensity():
    """Bright nuclei on a dark background: the sum of grey values measures them; the brightfield
    OD is negative (log10(10 / 160) = -1.204 per pixel), as the README warns."""
    labels = np.zeros((40, 40), np.int32)
    labels[10:20, 5:25] = 1  # 200 px
    image = np.full((40, 40, 3), 10, np.uint8)
    image[10:15, 5:25] = 160  # half the nucleus bright, half as dark as the background
    (row,) = nucleus_features(image, labels, {1: 0.5})
    assert row["integrated_intensity"] == 100 * 160 + 100 * 10
    assert row["mean_intensity"] == 85.0
    assert row["brightfield_integrated_od"] == pytest.approx(100 * math.log10(10 / 160), abs=1e-3)
    assert list(row) == CSV_FIELDS
