"""The plugin's reader (what predict.py writes, COCO files) and writer (boxes as COCO), and the
plugin package without napari."""

import csv
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import DarkBlobModel
from plugin_fixtures import field

from dessam_d2.errors import UsageError
from dessam_d2.inference.images import predict_images
from dessam_d2.inference.predictor import Predictor
from dessam_d2.plugin.io import IMAGE_KEY, get_reader, read_path, write_boxes
from dessam_d2.plugin.layers import (
    boxes_to_rectangles,
    rectangles_to_boxes,
)


def test_reader_opens_predict_outputs_with_their_ids(tmp_path):
    image, _, _ = field()
    path = str(tmp_path / "field.png")
    cv2.imwrite(path, image[:, :, ::-1])
    predictor = Predictor(DarkBlobModel(image_size=256, dark=110), clean_masks=True)
    out = str(tmp_path / "out")
    predict_images(predictor, [path], out, progress=False)
    written = cv2.imread(os.path.join(out, "field_labels.png"), -1)
    ((labels, kwargs, kind),) = get_reader(os.path.join(out, "field_labels.png"))("x")
    assert kind == "labels" and np.array_equal(labels, written) and kwargs["name"] == "field nuclei"
    ((shapes, kwargs, kind),) = read_path(os.path.join(out, "field.geojson"))
    rows = list(csv.DictReader(open(os.path.join(out, "field_nuclei.csv"))))
    assert kind == "shapes" and len(shapes) == len(rows) > 3
    assert [float(a) for a in kwargs["features"]["area"]] == [float(r["area"]) for r in rows]
    layers = read_path(os.path.join(out, "predictions_coco.json"))
    assert [k for _, _, k in layers] == ["image", "shapes", "labels"]
    assert np.array_equal(layers[0][0], image)
    assert np.array_equal(layers[2][0] > 0, written > 0)
    assert len(layers[1][0]) == len(rows) and "score" in layers[1][1]["features"]
    assert get_reader(path) is None and get_reader([path, path]) is None


def test_writer_writes_a_boxes_layer_as_coco_of_its_image(tmp_path):
    image, boxes, _ = field()
    meta = {"name": "b", "metadata": {IMAGE_KEY: {"file_name": "f.png", "height": 256,
                                                  "width": 256}}}  # fmt: skip
    (path,) = write_boxes(str(tmp_path / "boxes"), boxes_to_rectangles(boxes), meta)
    assert path.endswith("boxes.json")
    cv2.imwrite(str(tmp_path / "f.png"), image[:, :, ::-1])
    layers = read_path(path)
    assert np.allclose(rectangles_to_boxes(layers[1][0]), boxes)
    with pytest.raises(UsageError, match="does not say which image"):
        write_boxes(str(tmp_path / "x.json"), boxes_to_rectangles(boxes), {"name": "drawn"})
    assert not os.path.exists(tmp_path / "x.json")


def test_the_package_runs_without_napari():
    """Only dessam_d2.plugin.widget imports napari or Qt: without the extra, every other module
    imports (and the plugin's reader and conversions work)."""
    code = """
import importlib, pkgutil, sys
for name in ("napari", "qtpy", "PyQt6", "PySide6", "magicgui", "superqt"):
    sys.modules[name] = None  # import napari -> ImportError
import dessam_d2
names = [m.name for m in pkgutil.walk_packages(dessam_d2.__path__, "dessam_d2.")]
for name in names:
    if name not in ("dessam_d2.plugin.widget", "dessam_d2.plugin.forms"):
        importlib.import_module(name)
try:
    importlib.import_module("dessam_d2.plugin.widget")  # forms.py: Qt, likewise
except ImportError:
    print("widget needs napari;", len(names), "modules")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "widget needs napari" in proc.stdout
