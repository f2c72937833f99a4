"""The user-facing commands, run as a user would, on a tiny random-weight model."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from dessam_d2.config import load_config, precision_opts
from dessam_d2.data.synthetic.cytology import generate_synthetic_dataset
from dessam_d2.inference.annotate import boxes_to_masks
from dessam_d2.inference.predictor import Predictor
from dessam_d2.modeling.checkpointer import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A random tiny SAM whatever the demo config loads: these tests need shapes, not knowledge.
OVERRIDES = ["MODEL.SAM.CHECKPOINT", "", "MODEL.SAM.IMAGE_SIZE", "128"]
OVERRIDES += ["TEST.DETECTIONS_PER_IMAGE", "10"]


@pytest.fixture(scope="module")
def weights_and_images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = build_model(load_config("configs/dessam_demo.yaml", OVERRIDES))
    # Logits as large as a trained SAM's, and a learnable token that matters: masks are shapes
    # (a random decoder's logits stay below 1 and give empty masks), teacher != student.
    last = model.roi_heads.mask_head.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    with torch.no_grad():
        last.weight.mul_(60.0)
        last.bias.mul_(60.0)
        model.roi_heads.mask_head.learnable_tokens.normal_(0.0, 3.0)
    DetectionCheckpointer(model, save_dir=str(tmp)).save("tiny")
    json_file = generate_synthetic_dataset(str(tmp / "data"), 2, image_size=(96, 160), seed=4)
    return tmp / "tiny.pth", tmp / "data", json_file


def run(tool, args):
    cmd = [sys.executable, f"tools/{tool}", "--config-file", "configs/dessam_demo.yaml"] + args
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_predict_command_writes_every_output(weights_and_images, tmp_path):
    weights, data, _ = weights_and_images
    proc = run(
        "predict.py",
        ["--weights", str(weights), "--input", str(data / "images"), "--output", str(tmp_path)]
        + OVERRIDES,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for stem in ("00000", "00001"):
        for suffix in ("_labels.png", "_overlay.png", "_nuclei.csv", ".geojson"):
            assert (tmp_path / f"{stem}{suffix}").is_file()
    assert len(json.load(open(tmp_path / "predictions_images.json"))) == 2
    assert re.search(r"images predicted\s+2\n", proc.stdout)


def test_boxes_to_masks_command(weights_and_images, tmp_path):
    weights, data, json_file = weights_and_images
    out = tmp_path / "masks.json"
    args = ["--annotations", json_file, "--image-root", str(data / "images"), "--output", str(out)]
    proc = run("boxes_to_masks.py", args + ["--weights", str(weights), "--student"] + OVERRIDES)
    assert proc.returncode == 0, proc.stderr[-2000:]
    n_boxes = len(json.load(open(json_file))["annotations"])
    written = json.load(open(out))["annotations"]
    assert len(written) == n_boxes
    # --student reaches the model: the file equals the student's masks computed in-process
    # from the same weights, and differs from the teacher's.
    # (the tool's default --dtype auto: bfloat16 where this CPU has it natively)
    cfg = load_config("configs/dessam_demo.yaml", precision_opts("auto") + OVERRIDES)
    model = load_model(cfg, str(weights))
    expected = {}
    for student in (True, False):
        path = tmp_path / f"in_process_{student}.json"
        boxes_to_masks(Predictor(model), json_file, str(data / "images"), str(path), student)
        expected[student] = [a["segmentation"] for a in json.load(open(path))["annotations"]]
    assert [a["segmentation"] for a in written] == expected[True]
    assert expected[True] != expected[False]


def test_missing_weights_is_one_line(weights_and_images, tmp_path):
    _, data, _ = weights_and_images
    proc = run(
        "predict.py",
        ["--weights", str(tmp_path / "none.pth"), "--input", str(data / "images")]
        + ["--output", str(tmp_path)]
        + OVERRIDES,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: weights {tmp_path / 'none.pth'} do not exist: pass a trained model_*.pth"
    )
