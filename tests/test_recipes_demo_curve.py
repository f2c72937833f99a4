"""The demo's schedule curve: each length's overrides (decay at 75 % / 90 %, warm-up capped),
its table and picture from the points it wrote (docs/demo_curve.json's layout)."""

import json
import os

import cv2

from dessam_d2.recipes.demo_curve import curve_picture, curve_table, schedule_of

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")


def _opts(flat):
    return dict(zip(flat[::2], flat[1::2]))


def test_schedule_of_a_length():
    opts = _opts(schedule_of(300, warmup=50))
    assert opts["SOLVER.EPOCHS"] == 0 and opts["SOLVER.MAX_ITER"] == 300
    assert opts["SOLVER.STEPS"] == (225, 270)
    assert opts["SOLVER.WARMUP_ITERS"] == 50 and opts["SOLVER.CHECKPOINT_PERIOD"] == 300
    short = _opts(schedule_of(4, warmup=50))
    assert short["SOLVER.STEPS"] == (3,) and short["SOLVER.WARMUP_ITERS"] == 1


def test_table_and_picture_of_the_shipped_curve(tmp_path):
    points = json.load(open(os.path.join(DOCS, "demo_curve.json")))
    assert [p["iterations"] for p in points] == sorted(p["iterations"] for p in points)
    table = curve_table(points).splitlines()
    assert len(table) == 2 + len(points)
    assert table[0].split("|")[1].strip() == "iterations"
    assert table[2].split("|")[1].strip() == str(points[0]["iterations"])
    png = curve_picture(points, str(tmp_path / "curve.png"))
    image = cv2.imread(png)
    assert image is not None and image.shape[1] > image.shape[0] > 200
