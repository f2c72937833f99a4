"""predict and boxes_to_masks killed mid-way (SIGKILL): a re-run finishes the rest, does not redo
a finished image, and gives what an uninterrupted run gives.

The kill comes at a known point, not after a poll: the tools run under a small driver that
SIGKILLs the process itself from inside one of the tool's own calls (predict: when it is about
to write the CSV of image KILL_AT, i.e. after that image's label image, overlay and GeoJSON;
boxes_to_masks: when it reads image KILL_AT). What happened before that point happened.
"""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import DEMO, ROOT, SMALL  # noqa: E402
from detectron2.modeling import build_model

from dessam_d2 import modeling  # noqa: F401  (registers DESSAM for build_model)
from dessam_d2.config import load_config
from dessam_d2.data.synthetic.cytology import generate_synthetic_dataset

NUM_IMAGES = 6
KILL_AT = 3  # 1-based: images 1 and 2 are finished, image 3 is cut short

# Runs tools/$TOOL.py with one function of the tool's module replaced by one that SIGKILLs the
# process on its $KILL_AT-th call whose first argument ends with $SUFFIX.
KILL_DRIVER = """
import importlib, os, runpy, signal, sys
module = importlib.import_module(os.environ["KILL_MODULE"])
name, suffix = os.environ["KILL_FUNCTION"], os.environ["KILL_SUFFIX"]
at = int(os.environ["KILL_AT"])
original, calls = getattr(module, name), []
def dying(path, *args, **kwargs):
    if str(path).endswith(suffix):
        calls.append(path)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGKILL)
    return original(path, *args, **kwargs)
setattr(module, name, dying)
tool = os.environ["TOOL"]
sys.argv = [f"tools/{tool}.py"] + sys.argv[1:]
runpy.run_path(f"tools/{tool}.py", run_name="__main__")
"""


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
    # Logits as large as a trained SAM's: masks are shapes, so the outputs compared are not empty.
    last = model.roi_heads.mask_head.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
    with torch.no_grad():
        last.weight.mul_(60.0)
        last.bias.mul_(60.0)
    # A random box head scores about 0.5: a low threshold saved with the model (as training
    # saves its fitted one) keeps detections in every run.
    model.set_fitted_score_threshold(0.05)
    torch.save(
        {"model": model.state_dict(), "detector": model.detector_state()}, root / "model.pth"
    )
    return root


def run(name, args, **kill):
    """Run tools/<name>.py (under the kill driver when ``kill`` is given); the finished process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DESSAM_MALLOC_TUNING="0", TOOL=name)
    env.update({f"KILL_{k.upper()}": str(v) for k, v in kill.items()})
    head = ["-c", KILL_DRIVER] if kill else [f"tools/{name}.py"]
    cmd = [sys.executable] + head + ["--config-file", DEMO] + args + SMALL
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def summary(stdout):
    return dict(line.rsplit(None, 1) for line in stdout.splitlines() if line[:6] == "images")


def files(out):
    """name -> (modification time, bytes) of every visible file."""
    return {
        p.name: (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(out.iterdir())
        if not p.name.startswith(".")
    }


def test_predict_killed_mid_image_resumes_without_redoing_finished_images(workspace, tmp_path):
    args = ["--weights", str(workspace / "model.pth"), "--input", str(workspace / "ds" / "images")]
    full = tmp_path / "full"
    proc = run("predict", args + ["--output", str(full)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "out"
    kill = dict(
        module="dessam_d2.inference.outputs", function="atomic_write_bytes", suffix="_nuclei.csv"
    )
    proc = run("predict", args + ["--output", str(out)], at=KILL_AT, **kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    stems = sorted(p.name[: -len("_labels.png")] for p in (full.glob("*_labels.png")))
    assert len(stems) == NUM_IMAGES
    finished, cut = stems[: KILL_AT - 1], stems[KILL_AT - 1]
    before = files(out)
    # Finished images have all their files; the cut one has its label image, overlay and
    # GeoJSON but no CSV (written last), so it does not count as done; nothing else exists.
    suffixes = ("_labels.png", "_overlay.png", ".geojson", "_nuclei.csv")
    assert set(before) == {s + x for s in finished for x in suffixes} | {
        cut + x for x in suffixes[:3]
    }

    proc = run("predict", args + ["--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(proc.stdout)
    assert rows["images skipped (already done)"] == str(KILL_AT - 1)
    assert rows["images predicted"] == str(NUM_IMAGES - KILL_AT + 1)
    after = files(out)
    for name in (s + x for s in finished for x in suffixes):
        assert after[name] == before[name], name  # untouched: same time, same bytes
    assert after[cut + "_labels.png"][0] != before[cut + "_labels.png"][0]  # redone
    # Everything equals the uninterrupted run's, except the overlays (random colours).
    expected = files(full)
    assert set(after) == set(expected)
    for name in expected:
        if not name.endswith("_overlay.png"):
            assert after[name][1] == expected[name][1], name
    assert len(json.loads(expected["predictions_coco.json"][1])) > 0


def test_boxes_to_masks_killed_mid_way_resumes_to_the_uninterrupted_result(workspace, tmp_path):
    args = ["--weights", str(workspace / "model.pth"), "--annotations"]
    args += [str(workspace / "boxes.json"), "--image-root", str(workspace / "ds" / "images")]
    full = tmp_path / "full.json"
    proc = run("boxes_to_masks", args + ["--output", str(full)])
    assert proc.returncode == 0, proc.stderr[-3000:]

    out = tmp_path / "resumed.json"
    partial = tmp_path / "resumed.json.partial.jsonl"
    kill = dict(module="dessam_d2.inference.annotate", function="read_image_rgb", suffix=".png")
    proc = run("boxes_to_masks", args + ["--output", str(out)], at=KILL_AT, **kill)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not out.exists()
    lines = partial.read_text().splitlines()
    ids = [i["id"] for i in json.load(open(workspace / "boxes.json"))["images"]]
    assert [json.loads(line)["image_id"] for line in lines] == ids[: KILL_AT - 1]

    proc = run("boxes_to_masks", args + ["--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = summary(proc.stdout)
    assert rows["images resumed from an earlier run"] == str(KILL_AT - 1)
    assert rows["images segmented"] == str(NUM_IMAGES - KILL_AT + 1)
    resumed, expected = json.load(open(out)), json.load(open(full))
    assert sum(a["area"] > 0 for a in expected["annotations"]) > 0
    key = lambda a: a["id"]  # noqa: E731
    assert sorted(resumed["annotations"], key=key) == sorted(expected["annotations"], key=key)
    assert {k: v for k, v in resumed.items() if k != "annotations"} == {
        k: v for k, v in expected.items() if k != "annotations"
    }
    assert not partial.exists()
