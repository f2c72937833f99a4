"""Whole-slide prediction on a pyramidal TIFF written here: OpenSlide, seams, tissue, resume."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import openslide
import pytest
import torch
from detectron2.structures import Boxes, Instances
from scipy import ndimage
from shapely.geometry import shape

from dessam_d2.data.synthetic_slide import read_level0, write_synthetic_slide
from dessam_d2.inference.predictor import Predictor
from dessam_d2.inference.slides import (
    SlideError,
    open_slide,
    parse_roi,
    predict_slide,
    slide_grid,
    slide_output_paths,
    split_slides,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DARK = 120  # grey level below which the stand-in model calls a pixel nucleus


class DarkBlobModel(torch.nn.Module):
    """A stand-in for DES-SAM: one instance per 4-connected dark blob of what it is shown. It
    sees one tile only, so a blob cut by the tile's border comes out cut; ``calls`` counts the
    tiles it was given, and ``fail_at`` raises on that call (a killed run)."""

    def __init__(self, image_size=128, fail_at=None):
        super().__init__()
        self.image_size, self.fail_at, self.calls = image_size, fail_at, 0

    def forward(self, batched_inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        out = []
        for x in batched_inputs:
            h, w = x["height"], x["width"]
            img = x["image"].permute(1, 2, 0).numpy()
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_NEAREST)
            labels, n = ndimage.label(img.mean(axis=2) < DARK)
            inst = Instances((h, w))
            inst.pred_masks = torch.as_tensor(
                np.stack([labels == i for i in range(1, n + 1)]) if n else np.zeros((0, h, w)),
                dtype=torch.bool,
            )
            boxes = [
                [s[1].start, s[0].start, s[1].stop, s[0].stop] for s in ndimage.find_objects(labels)
            ]
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.linspace(0.9, 0.6, n) if n else torch.zeros(0)
            inst.pred_classes = torch.zeros(n, dtype=torch.int64)
            out.append({"instances": inst})
        return out


def predictor(**kw):
    return Predictor(DarkBlobModel(**kw), tile_size=128, tile_overlap=48)


def test_openslide_reads_every_level_and_the_resolution(slide):
    s = openslide.OpenSlide(slide)
    assert s.properties[openslide.PROPERTY_NAME_VENDOR] == "generic-tiff"
    assert s.level_dimensions == ((1024, 768), (512, 384), (256, 192))
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    assert split_slides([os.path.dirname(slide)]) == ([slide], [])


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


def test_a_killed_run_resumes_to_the_same_files(slide, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = predictor()
    predict_slide(first, slide, str(whole), progress=False)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(predictor(fail_at=20), slide, str(resumed), progress=False)
    paths = slide_output_paths(str(resumed), slide)
    assert not os.path.exists(paths["csv"]) and not os.path.exists(paths["geojson"])
    state = json.load(open(paths["state"]))
    assert state["tiles_done"] > 19
    rest = predictor()
    predict_slide(rest, slide, str(resumed), progress=False)
    assert rest.model.calls == first.model.calls - 19  # only the tiles not finished
    for name in ("cyto.geojson", "cyto_nuclei.csv"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes()


def test_mpp_level_and_roi_choose_the_pixels(slide, tmp_path):
    s = open_slide(slide)
    grid = slide_grid(s, slide, mpp=0.5)
    assert (grid.level, grid.scale, grid.size) == (1, 2.0, (512, 384))
    grid = slide_grid(s, slide, level=2, roi=parse_roi("256,128,512,10000"))
    assert (grid.origin, grid.size, grid.scale) == ((256, 128), (128, 160), 4.0)
    with pytest.raises(SlideError, match="levels 0..2"):
        slide_grid(s, slide, level=3)
    with pytest.raises(SlideError, match="x,y,w,h"):
        parse_roi("1,2,3")

    # at half resolution the outlines still land in level-0 coordinates
    predict_slide(predictor(), slide, str(tmp_path), mpp=0.5, progress=False)
    features = json.load(open(tmp_path / "cyto.geojson"))["features"]
    image = read_level0(slide)
    for f in features[:20]:
        x0, y0, x1, y1 = shape(f["geometry"]).bounds
        assert image[int(y0) : int(y1), int(x0) : int(x1)].mean(axis=2).min() < DARK

    bare = str(tmp_path / "bare.tif")
    write_synthetic_slide(bare, (256, 256), mpp=None, levels=1)
    with pytest.raises(SlideError, match="does not say its resolution.*--slide-mpp"):
        slide_grid(open_slide(bare), bare, mpp=0.5)
    assert slide_grid(open_slide(bare), bare, mpp=0.5, slide_mpp=0.25).scale == 2.0


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


def test_a_broken_slide_is_a_one_line_error(tmp_path):
    (tmp_path / "broken.svs").write_bytes(b"not a slide")
    with pytest.raises(SlideError, match=r"broken.svs cannot be opened by OpenSlide .*\)\?$"):
        open_slide(str(tmp_path / "broken.svs"))
    with pytest.raises(FileNotFoundError, match="missing.ndpi does not exist"):
        open_slide(str(tmp_path / "missing.ndpi"))
