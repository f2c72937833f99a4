"""A lab's own small box set, as a new user runs it: four fluorescence fields with ~100 boxes
exported from CVAT (``data/synthetic/fluorescence.py``: nothing like the demo's cytology — dark
field, bright clustered nuclei of other sizes), ``train_net.py --dataset`` with the demo config
as shipped (on 4 images its SOLVER.MIN_ITER stretches the epochs to the demo's 312 steps), then
``predict.py`` on a held-out field. The detector must find the training nuclei at its fitted
threshold, and the prediction must outline (IoU >= 0.5 with the true mask, which no tool reads)
as many held-out nuclei as SAM prompted with their true boxes does, give or take two: the
detector loses nothing the masks had."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from conftest import DEMO, ROOT

from dessam_d2.data.synthetic.fluorescence import make_user_fluorescence_set

pytestmark = pytest.mark.e2e


def outlined(masks_json: str, labels_of) -> int:
    """How many true nuclei one predicted label overlaps at IoU >= 0.5; ``labels_of(image)`` is
    the image's predicted label map."""
    gt = json.load(open(masks_json))
    hit = 0
    for image in gt["images"]:
        labels = labels_of(image)
        for ann in gt["annotations"]:
            if ann["image_id"] != image["id"]:
                continue
            mask = mask_util.decode(ann["segmentation"]).astype(bool)
            ids, overlap = np.unique(labels[mask], return_counts=True)
            best = max(
                (c / (mask.sum() + (labels == i).sum() - c) for i, c in zip(ids, overlap) if i),
                default=0.0,
            )
            hit += best >= 0.5
    return hit


def predicted_labels(prediction_dir):
    def labels_of(image):
        stem = os.path.splitext(image["file_name"])[0]
        return cv2.imread(os.path.join(prediction_dir, f"{stem}_labels.png"), -1).astype(int)

    return labels_of


def coco_labels(coco_json):
    coco = json.load(open(coco_json))

    def labels_of(image):
        labels = np.zeros((image["height"], image["width"]), int)
        for k, ann in enumerate(a for a in coco["annotations"] if a["image_id"] == image["id"]):
            segm = ann["segmentation"]
            if isinstance(segm, list):
                segm = mask_util.merge(mask_util.frPyObjects(segm, *labels.shape))
            labels[mask_util.decode(segm).astype(bool)] = k + 1
        return labels

    return labels_of


def test_a_users_small_box_set_trains_and_outlines_its_nuclei(tmp_path):
    paths = make_user_fluorescence_set(str(tmp_path / "data"), num_train=4, num_test=1, seed=0)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "train"
    spec = f"my_nuclei={paths['train_boxes']}:{paths['train_images']}"
    cmd = [sys.executable, "tools/train_net.py", "--config-file", DEMO, "--dataset", spec]
    cmd += ["DATASETS.TRAIN", "('my_nuclei',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(out / "log.txt").read()
    assert "Anchors fitted to" in log
    fit = json.load(open(out / "score_threshold.json"))
    # Measured (AMD EPYC, 1 thread): 312 steps, recall 91 %, precision 98 % at threshold 0.62;
    # at 120 steps it was 63 % / 81 % and the held-out field lost 4 of SAM's 7 outlines.
    assert fit["auto"] and fit["recall"] >= 0.8 and fit["precision"] >= 0.8, fit
    assert "WARNING: the detector finds only" not in log

    pred = tmp_path / "pred"
    cmd = [sys.executable, "tools/predict.py", "--config-file", DEMO]
    cmd += ["--weights", str(out / "model_final.pth"), "--input", paths["test_images"]]
    cmd += ["--output", str(pred)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = outlined(paths["test_masks"], predicted_labels(str(pred)))

    teacher = tmp_path / "teacher.json"  # SAM prompted with the test field's true boxes
    cmd = [sys.executable, "tools/boxes_to_masks.py", "--config-file", DEMO]
    cmd += ["--annotations", paths["test_boxes"], "--image-root", paths["test_images"]]
    cmd += ["--output", str(teacher)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_true_boxes = outlined(paths["test_masks"], coco_labels(str(teacher)))
    assert ours >= with_true_boxes - 2 and ours > 0, (ours, with_true_boxes)
