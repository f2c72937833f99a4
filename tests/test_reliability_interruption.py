"""predict and boxes_to_masks killed mid-way (SIGKILL): a re-run finishes the rest, does not redo
a finished image, and gives what an uninterrupted run gives."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.modeling import build_model

from dessam_d2.data.synthetic import generate_synthetic_dataset
from dessam_d2.engine import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "dessam_demo.yaml")
SMALL = ["MODEL.SAM.IMAGE_SIZE", "128", "TEST.DETECTIONS_PER_IMAGE", "2"]
NUM_IMAGES = 16


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    json_file = generate_synthetic_dataset(str(root / "ds"), NUM_IMAGES, image_size=(96, 96))
    coco = json.load(open(json_file))
    for ann in coco["annotations"]:
        del ann["segmentation"]
    (root / "boxes.json").write_text(json.dumps(coco))
    torch.manual_seed(0)
    model = build_model(load_config(DEMO, SMALL))
    torch.save({"model": model.state_dict()}, root / "model.pth")
    return root


def tool(name, args):
    cmd = [sys.executable, f"tools/{name}.py", "--config-file", DEMO] + args + SMALL
    return cmd, dict(os.environ, OMP_NUM_THREADS="1")


def run_and_kill(cmd, env, done, at_least=3):
    """Start ``cmd``, SIGKILL it once ``done()`` >= at_least; returns done() after the kill."""
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while done() < at_least and time.time() < deadline:
        assert proc.poll() is None, "the tool ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = done()
    assert at_least <= finished < NUM_IMAGES, "killed too late to test anything"
    return finished


def finished_files(out):
    return {p.name: p.stat().st_mtime_ns for p in out.iterdir() if not p.name.startswith(".")}


def test_predict_killed_mid_way_resumes_without_redoing_finished_images(workspace, tmp_path):
    out = tmp_path / "out"
    args = ["--weights", str(workspace / "model.pth"), "--input", str(workspace / "ds" / "images")]
    cmd, env = tool("predict", args + ["--output", str(out)])

    def done():
        return len(list(out.glob("*_nuclei.csv"))) if out.exists() else 0

    finished = run_and_kill(cmd, env, done)
    # an image counts as done when its CSV (written last) exists; its other files are complete
    csvs = sorted(p.name[: -len("_nuclei.csv")] for p in out.glob("*_nuclei.csv"))
    before = finished_files(out)
    for stem in csvs:
        for suffix in ("_labels.png", "_overlay.png", ".geojson"):
            assert f"{stem}{suffix}" in before

    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(line.rsplit(None, 1) for line in proc.stdout.splitlines() if line[:6] == "images")
    assert rows["images skipped (already done)"] == str(finished)
    assert rows["images predicted"] == str(NUM_IMAGES - finished)
    after = finished_files(out)
    assert {k: after[k] for k in before if not k.startswith("predictions_")} == {
        k: v for k, v in before.items() if not k.startswith("predictions_")
    }  # finished images untouched
    assert len(list(out.glob("*_nuclei.csv"))) == NUM_IMAGES
    coco = json.load(open(out / "predictions_images.json"))
    assert len(coco) == NUM_IMAGES


def test_boxes_to_masks_killed_mid_way_resumes_to_the_uninterrupted_result(workspace, tmp_path):
    args = [
        "--weights",
        str(workspace / "model.pth"),
        "--annotations",
        str(workspace / "boxes.json"),
    ]
    args += ["--image-root", str(workspace / "ds" / "images")]
    full = tmp_path / "full.json"
    cmd, env = tool("boxes_to_masks", args + ["--output", str(full)])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)

    out = tmp_path / "resumed.json"
    partial = tmp_path / "resumed.json.partial.jsonl"
    cmd, env = tool("boxes_to_masks", args + ["--output", str(out)])

    def done():
        # complete lines only: a kill may cut the last one
        return partial.read_text().count("\n") if partial.exists() else 0

    finished = run_and_kill(cmd, env, done)
    assert not out.exists()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = dict(line.rsplit(None, 1) for line in proc.stdout.splitlines() if line[:6] == "images")
    assert rows["images resumed from an earlier run"] == str(finished)
    assert rows["images segmented"] == str(NUM_IMAGES - finished)
    resumed, expected = json.load(open(out)), json.load(open(full))
    key = lambda a: a["id"]  # noqa: E731
    assert sorted(resumed["annotations"], key=key) == sorted(expected["annotations"], key=key)
    assert not partial.exists()
