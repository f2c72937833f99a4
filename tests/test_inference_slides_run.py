"""Whole-slide prediction on a pyramidal TIFF: seams, resolution, the tool, failed slides."""

import csv
import json
import os
import subprocess
import sys

import pytest
from conftest import DarkBlobModel
from scipy import ndimage
from shapely.geometry import shape

from dessam_d2.data.synthetic.slide import read_level0
from dessam_d2.errors import SlideError
from dessam_d2.inference.predictor import Predictor
from dessam_d2.inference.slides import predict_slide, predict_slides, slide_output_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DARK = 120  # grey level below which the stand-in model calls a pixel nucleus


def predictor(**kw):
    return Predictor(DarkBlobModel(dark=DARK, **kw), tile_size=128, tile_overlap=48)


def test_nuclei_come_out_once_whole_and_at_slide_coordinates(slide, tmp_path):
    model_predictor = predictor()
    tiles, background, nuclei = predict_slide(model_predictor, slide, str(tmp_path), progress=False)
    # glass corners (see the slide) are skipped: the model never saw those tiles
    assert background > 0 and model_predictor.model.calls == tiles
    assert tiles + background == 9 * 13  # tile_starts(768) x tile_starts(1024) at 128 / 48

    # the truth, computed another way: dark blobs of the whole level-0 image at once
    image = read_level0(slide)
    labels, n = ndimage.label(image.mean(axis=2) < DARK)
    truth = sorted(
        ((s[1].start, s[0].start, s[1].stop, s[0].stop), int((labels[s] == i).sum()))
        for i, s in enumerate(ndimage.find_objects(labels), start=1)
    )
    paths = slide_output_paths(str(tmp_path), slide)
    features = json.load(open(paths["geojson"]))["features"]
    found = []
    for f in features:
        geometry = shape(f["geometry"])
        assert geometry.is_valid
        found.append((tuple(int(v) for v in geometry.bounds), int(geometry.area)))
    assert nuclei == n == len(features) and sorted(found) == truth  # once, whole, in place
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [int(r["id"]) for r in rows] == list(range(1, n + 1))
    assert [int(r["area"]) for r in rows] == [
        f["properties"]["measurements"]["area"] for f in features
    ]
    assert not os.path.exists(paths["work"])


def test_at_half_resolution_the_outlines_land_in_level0_coordinates(slide, tmp_path):
    predict_slide(predictor(), slide, str(tmp_path), mpp=0.5, progress=False)
    features = json.load(open(tmp_path / "cyto.geojson"))["features"]
    image = read_level0(slide)
    for f in features[:20]:
        x0, y0, x1, y1 = shape(f["geometry"]).bounds
        assert image[int(y0) : int(y1), int(x0) : int(x1)].mean(axis=2).min() < DARK


def test_predict_tool_on_a_slide(slide, tmp_path):
    cmd = [sys.executable, "tools/predict.py", "--config-file", "configs/dessam_demo.yaml"]
    cmd += ["--random-weights", "--input", slide, "--output", str(tmp_path), "--level", "2"]
    cmd += ["MODEL.SAM.CHECKPOINT", "", "MODEL.SAM.IMAGE_SIZE", "128"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DESSAM_MALLOC_TUNING="0")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiles predicted" in proc.stdout
    geo = json.load(open(tmp_path / "cyto.geojson"))
    rows = list(csv.DictReader(open(tmp_path / "cyto_nuclei.csv")))
    assert len(geo["features"]) == len(rows)


def test_a_slide_that_cannot_be_read_is_counted_and_the_others_go_on(slide, tmp_path):
    broken = tmp_path / "broken.svs"
    broken.write_bytes(b"not a slide")
    out = str(tmp_path / "out")
    summary = predict_slides(predictor(), [str(broken), slide], out, progress=False, level=2)
    assert (summary.unit, summary.done, summary.skipped) == ("slides", 1, 0)
    assert list(summary.failed) == [str(broken)] and summary.counts["nuclei found"] > 0
    assert (
        summary.counts["tiles predicted"] + summary.counts["tiles skipped (no tissue)"] == 2 * 3
    )  # 192 x 256 px in 128-px tiles
    again = predict_slides(predictor(), [slide], out, progress=False, level=2)
    assert (again.done, again.skipped, again.counts["tiles predicted"]) == (0, 1, 0)
    with pytest.raises(SlideError):  # one slide alone: its error
        predict_slides(predictor(), [str(broken)], out, progress=False)


def test_a_nucleus_on_a_tile_seam_or_corner_comes_out_of_a_slide_once_and_whole(tmp_path):
    import tifffile
    from test_inference_tiling import SEAM_CENTRES, SEAM_OVERLAP, SEAM_TILE, seam_image

    image, truth = seam_image()  # box centres on the seams of 128-px tiles overlapping 48 px
    path = str(tmp_path / "seams.tif")
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    model_predictor = Predictor(DarkBlobModel(dark=DARK), SEAM_TILE, SEAM_OVERLAP)
    tiles, background, nuclei = predict_slide(
        model_predictor, path, str(tmp_path / "out"), detect_tissue=False, progress=False
    )
    assert (tiles, background, nuclei) == (9, 0, len(SEAM_CENTRES))
    expected = sorted(
        ((s[1].start, s[0].start, s[1].stop, s[0].stop), int((truth[s] == i).sum()))
        for i, s in enumerate(ndimage.find_objects(truth), start=1)
    )
    features = json.load(open(slide_output_paths(str(tmp_path / "out"), path)["geojson"]))
    found = sorted(
        (tuple(int(v) for v in shape(f["geometry"]).bounds), int(shape(f["geometry"]).area))
        for f in features["features"]
    )
    assert found == expected  # each nucleus once, whole, at its place in the slide
