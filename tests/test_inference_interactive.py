"""One image in memory: prediction and boxes -> masks are the tools' results (predict.py,
boxes_to_masks.py), and every wrong input is a one-line error."""

import csv
import json

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import DEMO, DarkBlobModel
from plugin_fixtures import field, write_checkpoint

from dessam_d2.errors import CheckpointError, UsageError
from dessam_d2.inference.images import predict_images
from dessam_d2.inference.interactive import Session, load_session, predict_image, segment_boxes
from dessam_d2.inference.predictor import Predictor


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(str(tmp_path_factory.mktemp("model")))


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
    # no weights: the tiny SAM teacher; float32, as the demo's tables (the median IoU below is
    # 0.50x in float32, 0.499 in bfloat16 on AMD EPYC Zen 4)
    session = load_session(DEMO, dtype="float32")
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
    assert session.model.inference_dtype_setting == "auto"  # predict.py's default
    assert load_session(config, weights, dtype="int8").describe()["dtype"] == "qint8"
    with pytest.raises(FileNotFoundError, match="nothing.yaml does not exist"):
        load_session(str(tmp_path / "nothing.yaml"))
    other = tmp_path / "other.yaml"
    other.write_text(f'_BASE_: "{DEMO}"\nMODEL:\n  FPN:\n    OUT_CHANNELS: 32\n')
    with pytest.raises(CheckpointError, match="does not fit the model of this config"):
        load_session(str(other), weights)
