"""What the napari plugin calls, without napari: layer conversions (both ways), one-image
prediction and boxes -> masks (the tools' results, in memory), the box-set export that
``train_net --dataset`` reads, the in-process training with progress and stop, and the reader
and writer."""

import csv
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import DEMO, DarkBlobModel
from plugin_fixtures import field, write_checkpoint

from dessam_d2.data.converters.user_datasets import register_user_datasets
from dessam_d2.data.export import export_box_set
from dessam_d2.errors import CheckpointError, DatasetFormatError, UsageError
from dessam_d2.inference.images import predict_images
from dessam_d2.inference.interactive import Session, load_session, predict_image, segment_boxes
from dessam_d2.inference.predictor import Predictor
from dessam_d2.plugin.io import IMAGE_KEY, get_reader, read_path, write_boxes
from dessam_d2.plugin.layers import (
    boxes_to_rectangles,
    image_data_to_rgb,
    polygon_to_vertices,
    rectangles_to_boxes,
    rows_to_features,
)
from dessam_d2.recipes.retrain import TrainingStopped, train_on_box_sets

SHORT = ["SOLVER.EPOCHS", 0, "SOLVER.MIN_ITER", 0, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "()"]
SHORT += ["SOLVER.WARMUP_ITERS", 1, "SOLVER.CHECKPOINT_PERIOD", 2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("model")))


# -- layers ----------------------------------------------------------------------------------
def test_boxes_become_rectangles_over_their_pixels_and_back():
    boxes = np.array([[3, 2, 7, 5], [0.5, 10.25, 20, 30]])
    rects = boxes_to_rectangles(boxes)
    # box x 3..7, y 2..5 covers columns 3-6 and rows 2-4: napari centres pixels on integers
    assert np.allclose(rects[0].min(0), [1.5, 2.5]) and np.allclose(rects[0].max(0), [4.5, 6.5])
    assert np.allclose(rectangles_to_boxes(rects), boxes)
    # a shape drawn in 3-D (a leading plane axis) and a rotated one: their bounding boxes
    tilted = np.array([[0, 5, 5], [0, 10, 10], [0, 5, 15], [0, 0, 10]], dtype=float)
    assert np.allclose(rectangles_to_boxes([tilted]), [[5.5, 0.5, 15.5, 10.5]])


def test_polygons_and_images_and_rows_convert():
    ring = [[1, 2], [5, 2], [5, 6], [1, 2]]  # GeoJSON x, y, closed
    assert np.allclose(polygon_to_vertices(ring), [[1.5, 0.5], [1.5, 4.5], [5.5, 4.5]])
    grey = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    rgb = image_data_to_rgb(grey, "g", rgb=False)
    assert rgb.shape == (3, 4, 3) and rgb.dtype == np.uint8 and rgb.max() == 255
    assert image_data_to_rgb([rgb, rgb[::2, ::2]], "pyramid", rgb=True).shape == (3, 4, 3)
    with pytest.raises(UsageError, match="stack of 5 planes"):
        image_data_to_rgb(np.zeros((5, 8, 8)), "stack", rgb=False)
    table = rows_to_features([{"id": 1, "area": 3}, {"id": 2, "area": 4}])
    assert table == {"id": [1, 2], "area": [3, 4], "index": [1, 2]}


# -- prediction and boxes -> masks -----------------------------------------------------------
def test_predict_image_is_what_predict_writes(tmp_path):
    image, _, _ = field()
    path = str(tmp_path / "field.png")
    cv2.imwrite(path, image[:, :, ::-1])
    predictor = Predictor(DarkBlobModel(image_size=128, dark=110), tile_size=128, tile_overlap=32)
    session = Session(None, predictor.model, predictor, "", "weights.pth")
    steps = []
    got = predict_image(session, image, progress=lambda d, t: steps.append((d, t)))
    assert steps[-1] == (9, 9) and len(steps) == 9  # 3 x 3 tiles of 128 over 256 px
    predict_images(predictor, [path], str(tmp_path / "out"), progress=False)
    written = cv2.imread(str(tmp_path / "out" / "field_labels.png"), -1)
    assert got.labels.max() > 3 and np.array_equal(got.labels, written)
    rows = list(csv.DictReader(open(tmp_path / "out" / "field_nuclei.csv")))
    assert [int(r["id"]) for r in rows] == [r["id"] for r in got.rows]
    assert np.allclose([float(r["score"]) for r in rows], got.scores, atol=1e-4)
    assert len(got.boxes) == len(got.rows)
    # each nucleus' detected box holds its pixels
    for (x0, y0, x1, y1), row in zip(got.boxes, got.rows):
        ys, xs = np.nonzero(got.labels == row["id"])
        assert xs.min() >= x0 - 1 and xs.max() < x1 + 1 and ys.min() >= y0 - 1


def test_segment_boxes_is_boxes_to_masks_and_checks_the_boxes(tmp_path):
    from dessam_d2.inference.annotate import boxes_to_masks

    image, boxes, masks = field()
    session = load_session(DEMO)  # no weights: the tiny SAM teacher
    assert not session.trained and "teacher" in session.describe()["weights"]
    labels = segment_boxes(session, image, boxes)
    cv2.imwrite(str(tmp_path / "f.png"), image[:, :, ::-1])
    coco = {
        "images": [{"id": 1, "file_name": "f.png", "height": 256, "width": 256}],
        "annotations": [
            {"id": k + 1, "image_id": 1, "bbox": [x0, y0, x1 - x0, y1 - y0]}
            for k, (x0, y0, x1, y1) in enumerate(boxes.tolist())
        ],
    }
    json.dump(coco, open(tmp_path / "boxes.json", "w"))
    boxes_to_masks(session.predictor, str(tmp_path / "boxes.json"), str(tmp_path),
                   str(tmp_path / "masks.json"), progress=False)  # fmt: skip
    tool = [mask_util.decode(a["segmentation"]) for a in json.load(open(tmp_path / "masks.json"))[
        "annotations"]]  # fmt: skip
    for k, mask in enumerate(tool):  # box k is label k + 1 where no earlier box took the pixel
        mine = labels == k + 1
        assert np.all(mask[mine]) and (mask.sum() - mine.sum()) <= (labels[mask > 0] <= k).sum()
    # the teacher of a pretrained SAM outlines nuclei it is given: most IoUs well above chance
    ious = [((labels == k + 1) & m).sum() / ((labels == k + 1) | m).sum() for k, m in
            enumerate(masks)]  # fmt: skip
    assert np.median(ious) > 0.5
    with pytest.raises(UsageError, match="box 2 .* lies outside the 256 x 256 image"):
        segment_boxes(session, image, [[1, 1, 9, 9], [300, 10, 320, 30]])
    with pytest.raises(UsageError, match="box 1 has no area"):
        segment_boxes(session, image, [[5, 5, 5, 9]])
    with pytest.raises(UsageError, match="no boxes"):
        segment_boxes(session, image, np.zeros((0, 4)))
    with pytest.raises(UsageError, match="no trained DES-SAM"):
        predict_image(session, image)


def test_load_session_names_the_wrong_file(tmp_path, checkpoint):
    config, weights = checkpoint
    session = load_session(config, weights)
    info = session.describe()
    assert session.trained and info["threshold"].startswith("0.000") and info["dtype"]
    with pytest.raises(FileNotFoundError, match="nothing.yaml does not exist"):
        load_session(str(tmp_path / "nothing.yaml"))
    other = tmp_path / "other.yaml"
    other.write_text(f'_BASE_: "{DEMO}"\nMODEL:\n  FPN:\n    OUT_CHANNELS: 32\n')
    with pytest.raises(CheckpointError, match="does not fit the model of this config"):
        load_session(str(other), weights)


# -- export and training ---------------------------------------------------------------------
def test_export_is_a_box_set_train_net_reads(tmp_path):
    image, boxes, masks = field()
    labels = np.zeros(image.shape[:2], np.int32)
    for k, m in enumerate(masks):
        labels[m & (labels == 0)] = k + 1
    folder = str(tmp_path / "set")
    path = export_box_set(folder, "a", image, boxes, labels=labels)
    export_box_set(folder, "b", image[:, ::-1].copy(), boxes[:2])
    path = export_box_set(folder, "a", image, boxes[:3], labels=labels)  # replaces a's entry
    coco = json.load(open(path))
    assert sorted(im["file_name"] for im in coco["images"]) == ["a.png", "b.png"]
    assert len(coco["annotations"]) == 5 and len({a["id"] for a in coco["annotations"]}) == 5
    assert np.array_equal(cv2.imread(os.path.join(folder, "a.png"))[:, :, ::-1], image)
    registered = register_user_datasets([f"mine={path}"])
    assert registered == {"mine": True}  # outlines from the labels, for evaluation
    from detectron2.data import DatasetCatalog

    records = {os.path.basename(r["file_name"]): r for r in DatasetCatalog.get("mine")}
    got = np.array([a["bbox"] for a in records["a.png"]["annotations"]])
    assert np.allclose(got[:, :2], boxes[:3, :2])  # COCO XYWH
    assert np.allclose(got[:, :2] + got[:, 2:], boxes[:3, 2:])
    first = next(a for a in coco["annotations"] if a["image_id"] == records["a.png"]["image_id"])
    assert np.array_equal(mask_util.decode(first["segmentation"]).astype(bool), labels == 1)
    with pytest.raises(UsageError, match="image name"):
        export_box_set(folder, "../up", image, boxes)
    with pytest.raises(UsageError, match="not the image's size"):
        export_box_set(folder, "c", image, boxes, labels=labels[:10])
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "annotations.json").write_text("{oops")
    with pytest.raises(DatasetFormatError, match="is not JSON"):
        export_box_set(str(tmp_path / "bad"), "a", image, boxes)


def test_training_on_an_exported_set_reports_steps_and_stops(tmp_path):
    image, boxes, _ = field()
    path = export_box_set(str(tmp_path / "set"), "a", image, boxes)
    steps = []
    weights = train_on_box_sets([path], str(tmp_path / "run"), DEMO, SHORT,
                                on_step=lambda s, t: steps.append((s, t)))  # fmt: skip
    assert steps == [(1, 2), (2, 2)] and os.path.isfile(weights)
    assert "Anchors fitted to" in open(tmp_path / "run" / "log.txt").read()
    session = load_session(str(tmp_path / "run" / "config.yaml"), weights)
    assert "fitted on the training boxes" in session.describe()["threshold"]
    with pytest.raises(TrainingStopped, match="stopped at step 1 of 2"):
        train_on_box_sets([path], str(tmp_path / "stopped"), DEMO, SHORT,
                          should_stop=lambda: True)  # fmt: skip
    assert not os.path.exists(tmp_path / "stopped" / "model_final.pth")
    with pytest.raises(UsageError, match="no box set"):
        train_on_box_sets([], str(tmp_path / "none"))


# -- reader and writer -----------------------------------------------------------------------
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
    if name != "dessam_d2.plugin.widget":
        importlib.import_module(name)
try:
    importlib.import_module("dessam_d2.plugin.widget")
except ImportError:
    print("widget needs napari;", len(names), "modules")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "widget needs napari" in proc.stdout
