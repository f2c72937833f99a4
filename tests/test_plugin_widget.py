"""The napari plugin driven as a user drives it: a real viewer (napari's make_napari_viewer,
under the X server pytest-xvfb starts, with Mesa's OpenGL), an image layer, rectangles drawn in
a Shapes layer, the widget's buttons clicked, the worker waited for; then the layers are checked
against what the command-line tools produce on the same input."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import DEMO, ROOT
from plugin_fixtures import field, write_checkpoint

from dessam_d2.modeling.precision import cpu_has_native_bf16
from dessam_d2.plugin.layers import boxes_to_rectangles, rectangles_to_boxes

napari = pytest.importorskip("napari", reason="the napari extra: pip install -e .[napari]")

WAIT_MS = 120_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("model")))


@pytest.fixture
def plugin(make_napari_viewer, qtbot):
    """(viewer, widget, run): the viewer with the plugin's dock widget (added as napari's menu
    does); ``run(button)`` clicks it and waits for the job."""
    viewer = make_napari_viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget("dessam-d2", "DES-SAM nuclei")

    def run(button):
        button.click()
        qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
        qtbot.wait(20)  # the returned signal's layers

    return viewer, widget, run


def errors(widget):
    return [text for level, text in widget.messages if level == "error"]


def load(widget, run, config, weights=""):
    widget.config_edit.setText(config)
    widget.weights_edit.setText(weights)
    before = len(errors(widget))
    run(widget.load_button)
    assert len(errors(widget)) == before, errors(widget)


def test_the_manifest_validates():
    npe2 = os.path.join(os.path.dirname(sys.executable), "npe2")
    proc = subprocess.run([npe2, "validate", "dessam-d2"], capture_output=True, text=True)
    assert proc.returncode == 0 and "valid" in proc.stdout, proc.stdout + proc.stderr


def test_predict_gives_a_label_per_detection_with_its_table(plugin, checkpoint, tmp_path):
    viewer, widget, run = plugin
    image, _, _ = field()
    viewer.add_image(image, name="field", rgb=True)
    load(widget, run, *checkpoint)
    # predict.py's default precision (auto): bfloat16 where this CPU has it natively
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert (
        "fitted" not in widget.model_info.text() and f"dtype: {dtype}" in widget.model_info.text()
    )
    run(widget.predict_button)
    assert not errors(widget), errors(widget)
    labels, boxes = viewer.layers["field nuclei"], viewer.layers["field boxes"]
    ids = sorted(set(np.unique(labels.data)) - {0})
    assert len(ids) == len(boxes.data) == len(boxes.features) > 0
    assert list(labels.features["index"]) == ids and "area" in labels.features
    assert boxes.edge_color.shape == (len(ids), 4) and "score" in boxes.features
    assert widget.progress_bar.value() == widget.progress_bar.maximum()
    # the same model through tools/predict.py: the same label image
    cv2.imwrite(str(tmp_path / "field.png"), image[:, :, ::-1])
    cmd = [
        sys.executable,
        "tools/predict.py",
        "--config-file",
        checkpoint[0],
        "--weights",
        checkpoint[1],
        "--input",
        str(tmp_path / "field.png"),
        "--output",
        str(tmp_path / "o"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = cv2.imread(str(tmp_path / "o" / "field_labels.png"), -1)
    assert np.array_equal(written, labels.data)
    # the reader opens what predict.py wrote, with the same ids
    (opened,) = viewer.open(str(tmp_path / "o" / "field_labels.png"), plugin="dessam-d2")
    assert np.array_equal(opened.data, labels.data)
    shapes = viewer.open(str(tmp_path / "o" / "field.geojson"), plugin="dessam-d2")[0]
    assert len(shapes.data) >= len(ids)


def test_drawn_boxes_become_the_masks_boxes_to_masks_writes(plugin, tmp_path):
    viewer, widget, run = plugin
    image, boxes, _ = field()
    viewer.add_image(image, name="field", rgb=True)
    load(widget, run, DEMO)  # no weights: SAM (the tiny pretrained one) as teacher
    assert "teacher" in widget.model_info.text()
    drawn = viewer.add_shapes(name="drawn")
    drawn.add_rectangles(boxes_to_rectangles(boxes[:4]))  # as the rectangle tool draws them
    widget.boxes_combo.setCurrentText("drawn")
    run(widget.masks_button)
    assert not errors(widget), errors(widget)
    labels = viewer.layers["drawn masks"].data
    # tools/boxes_to_masks.py on the same boxes
    cv2.imwrite(str(tmp_path / "f.png"), image[:, :, ::-1])
    xyxy = rectangles_to_boxes(drawn.data)
    coco = {
        "images": [{"id": 1, "file_name": "f.png", "height": 256, "width": 256}],
        "annotations": [{"id": k + 1, "image_id": 1, "bbox": [a, b, c - a, d - b]}
                        for k, (a, b, c, d) in enumerate(xyxy.tolist())],
    }  # fmt: skip
    json.dump(coco, open(tmp_path / "boxes.json", "w"))
    cmd = [sys.executable, "tools/boxes_to_masks.py", "--config-file", DEMO, "--annotations",
           str(tmp_path / "boxes.json"), "--image-root", str(tmp_path), "--output",
           str(tmp_path / "masks.json")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tool = np.zeros_like(labels)
    for k, ann in reversed(
        list(enumerate(json.load(open(tmp_path / "masks.json"))["annotations"]))
    ):
        tool[mask_util.decode(ann["segmentation"]).astype(bool)] = k + 1  # earlier box wins
    assert labels.max() == 4 and np.array_equal(labels, tool)


def test_correct_export_train_and_predict_again(plugin, checkpoint, tmp_path):
    viewer, widget, run = plugin
    image, boxes, _ = field()
    viewer.add_image(image, name="field", rgb=True)
    load(widget, run, *checkpoint)
    run(widget.predict_button)
    # the user corrects the boxes: deletes the predicted ones, draws the true ones
    corrected = viewer.layers["field boxes"]
    corrected.selected_data = set(range(len(corrected.data)))
    corrected.remove_selected()
    corrected.add_rectangles(boxes_to_rectangles(boxes))
    widget.boxes_combo.setCurrentText("field boxes")
    widget.export_edit.setText(str(tmp_path / "set"))
    widget.export_button.click()
    assert not errors(widget), errors(widget)
    path = str(tmp_path / "set" / "annotations.json")
    assert widget.sets_edit.text() == path
    coco = json.load(open(path))
    got = np.array([a["bbox"] for a in coco["annotations"]])
    assert np.allclose(got[:, :2], boxes[:, :2]) and np.allclose(
        got[:, :2] + got[:, 2:], boxes[:, 2:]
    )
    # train_net --dataset reads the export as it is
    cmd = [sys.executable, "tools/train_net.py", "--config-file", DEMO, "--dataset",
           f"mine={path}", "DATASETS.TRAIN", "('mine',)", "DATASETS.TEST", "()", "OUTPUT_DIR",
           str(tmp_path / "cli"), "SOLVER.EPOCHS", "0", "SOLVER.MIN_ITER", "0", "SOLVER.MAX_ITER",
           "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert os.path.isfile(tmp_path / "cli" / "model_final.pth")
    # the Train section: a short run, its weights loaded, the image predicted again
    widget.config_edit.setText(DEMO)
    widget.train_output_edit.setText(str(tmp_path / "gui"))
    widget.steps_spin.setValue(3)
    before = viewer.layers["field nuclei"]
    run(widget.train_button)
    qtbot_wait = widget.worker is None
    assert qtbot_wait and not errors(widget), errors(widget)
    weights = str(tmp_path / "gui" / "model_final.pth")
    assert os.path.isfile(weights) and widget.session.weights == weights
    assert "fitted on the training boxes" in widget.model_info.text()
    assert any("nuclei in 'field'" in t or "no nucleus" in t for _, t in widget.messages[-2:])
    assert viewer.layers["field nuclei"] is not before  # predicted again with the new weights


def test_cancel_stops_a_training_between_steps(plugin, checkpoint, tmp_path, qtbot):
    viewer, widget, run = plugin
    image, boxes, _ = field()
    viewer.add_image(image, name="field", rgb=True)
    drawn = viewer.add_shapes(boxes_to_rectangles(boxes), shape_type="rectangle", name="drawn")
    widget.boxes_combo.setCurrentText("drawn")
    widget.export_edit.setText(str(tmp_path / "set"))
    widget.export_button.click()
    assert drawn.metadata["dessam_image"]["file_name"] == "field.png"
    widget.config_edit.setText(DEMO)
    widget.train_output_edit.setText(str(tmp_path / "run"))
    widget.steps_spin.setValue(500)
    widget.train_button.click()
    qtbot.waitUntil(lambda: widget.progress_bar.value() >= 1, timeout=WAIT_MS)
    assert widget.cancel_button.isEnabled()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget.worker is None, timeout=WAIT_MS)
    assert any(
        "training cancelled at step" in t for level, t in widget.messages if level == "warning"
    )
    assert widget.progress_bar.value() < 500 and not os.path.exists(
        tmp_path / "run" / "model_final.pth"
    )


def test_bad_input_is_one_line_notification(plugin, checkpoint, tmp_path):
    viewer, widget, run = plugin
    widget.predict_button.click()
    assert errors(widget)[-1].startswith("no model loaded")
    load(widget, run, *checkpoint)
    widget.predict_button.click()
    assert errors(widget)[-1].startswith("no image layer selected")
    image, boxes, _ = field()
    viewer.add_image(image, name="field", rgb=True)
    rects = boxes_to_rectangles([[10, 10, 30, 30], [400, 10, 420, 30]])
    viewer.add_shapes(rects, shape_type="rectangle", name="outside")
    widget.boxes_combo.setCurrentText("outside")
    run(widget.masks_button)
    assert "box 2 (400, 10, 420, 30) lies outside the 256 x 256 image" in errors(widget)[-1]
    assert "outside masks" not in viewer.layers
    other = tmp_path / "other.yaml"
    other.write_text(f'_BASE_: "{DEMO}"\nMODEL:\n  FPN:\n    OUT_CHANNELS: 32\n')
    widget.config_edit.setText(str(other))
    widget.weights_edit.setText(checkpoint[1])
    run(widget.load_button)
    assert "does not fit the model of this config" in errors(widget)[-1]
    assert all("\n" not in text for text in errors(widget))
    widget.sets_edit.setText("")
    widget.train_button.click()
    assert errors(widget)[-1].startswith("no box set to train on")
    assert isinstance(widget.session.weights, str)  # the model loaded before is kept


def test_file_save_writes_a_boxes_layer_as_coco_and_file_open_reads_it(plugin, tmp_path):
    viewer, widget, run = plugin
    image, boxes, _ = field()
    cv2.imwrite(str(tmp_path / "field.png"), image[:, :, ::-1])
    viewer.add_image(image, name="field", rgb=True)
    drawn = viewer.add_shapes(boxes_to_rectangles(boxes), shape_type="rectangle", name="drawn")
    drawn.metadata["dessam_image"] = {"file_name": "field.png", "height": 256, "width": 256}
    viewer.layers.selection.active = drawn
    (written,) = viewer.layers.save(str(tmp_path / "boxes.json"), selected=True, plugin="dessam-d2")
    coco = json.load(open(written))
    assert coco["images"][0]["file_name"] == "field.png" and len(coco["annotations"]) == len(boxes)
    opened = viewer.open(written, plugin="dessam-d2")
    assert [type(layer).__name__ for layer in opened] == ["Image", "Shapes"]
    assert np.allclose(rectangles_to_boxes(opened[1].data), boxes)
