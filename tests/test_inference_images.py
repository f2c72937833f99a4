"""predict_images: every output file, reruns skip finished images, N processes write the files
of one."""

import csv
import importlib.util
import json

import cv2
import numpy as np
import pytest
from conftest import ROOT
from test_inference_predictor import ThresholdModel, disc_image

from dessam_d2.inference.images import predict_images
from dessam_d2.inference.inputs import collect_images
from dessam_d2.inference.outputs import EMPTY, RunSummary, output_paths
from dessam_d2.inference.predictor import Predictor


def test_every_output_file_and_rerun_skips_finished_images(tmp_path):
    img, truth = disc_image()
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.png", "b.png"):
        cv2.imwrite(str(inputs / name), img[..., ::-1])
    (inputs / "broken.png").write_bytes(b"")
    out = tmp_path / "out"
    paths = collect_images([str(inputs)])
    assert [p.split("/")[-1] for p in paths] == ["a.png", "b.png", "broken.png"]
    summary = predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(out), progress=False)
    assert (summary.done, summary.skipped, summary.counts["nuclei found"]) == (2, 0, 10)
    assert list(summary.failed) == [paths[2]] and "broken.png" in summary.failed[paths[2]]

    files = output_paths(str(out), paths[0])
    labels = cv2.imread(files["labels"], cv2.IMREAD_UNCHANGED)
    assert labels.dtype == np.uint16 and labels.shape == truth.shape
    assert len(np.unique(labels)) == 6 and ((labels > 0) == (truth > 0)).all()
    rows = list(csv.DictReader(open(files["csv"])))
    assert [int(r["area"]) for r in rows] == [(labels == int(r["id"])).sum() for r in rows]
    geo = json.load(open(files["geojson"]))
    assert len(geo["features"]) == 5
    assert geo["features"][0]["properties"]["classification"]["name"] == "Nucleus"
    assert cv2.imread(files["overlay"]).shape == (150, 200, 3)
    coco = json.load(open(out / "predictions_coco.json"))
    images = json.load(open(out / "predictions_images.json"))
    assert len(coco) == 10 and [i["id"] for i in images] == [1, 2]
    assert {r["image_id"] for r in coco} == {1, 2} and coco[0]["category_id"] == 1

    again = predict_images(Predictor(ThresholdModel(), 64, 24), paths[:2], str(out), progress=False)
    assert (again.done, again.skipped) == (0, 2)
    redo = predict_images(
        Predictor(ThresholdModel(), 64, 24), paths[:2], str(out), overwrite=True, progress=False
    )
    assert (redo.done, redo.skipped) == (2, 0)
    assert not list(out.glob("*.tmp*"))


def test_each_process_predicts_its_share_and_process_0_writes_the_coco_results(tmp_path):
    """Process 1 and 0 of 2, one after the other (no torch.distributed: each summary is its
    own): the same files as one process."""
    img, _ = disc_image()
    paths = []
    for i in range(3):
        paths.append(str(tmp_path / f"{i}.png"))
        cv2.imwrite(paths[-1], np.roll(img, 10 * i, axis=1)[..., ::-1])
    one, two = tmp_path / "one", tmp_path / "two"
    predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(one), progress=False)
    kw = dict(progress=False, world_size=2)
    second = predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(two), rank=1, **kw)
    assert second.done == 1 and not (two / "predictions_coco.json").exists()
    first = predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(two), rank=0, **kw)
    assert first.done == 2
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir()) and len(names) == 3 * 4 + 2
    for name in names:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name


def three_images_one_blank(folder):
    """Two images of 5 nuclei and, second, one with nothing dark: the stand-in finds no nucleus
    in it."""
    img, _ = disc_image()
    paths = [str(folder / name) for name in ("a.png", "blank.png", "c.png")]
    for path, image in zip(paths, (img, np.full_like(img, 220), np.roll(img, 10, axis=1))):
        cv2.imwrite(path, image[..., ::-1])
    return paths


def test_a_run_counts_the_images_with_no_detection_and_warns_in_one_line(tmp_path):
    paths = three_images_one_blank(tmp_path)
    summary = predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(tmp_path / "out"))
    assert summary.done == 3 and summary.counts == {"nuclei found": 10, EMPTY: 1}
    lines = summary.table().splitlines()
    rows = dict(line.rsplit(None, 1) for line in lines if line[:6] == "images")  # as the e2e tests
    assert rows == {
        "images predicted": "3",
        "images skipped (already done)": "0",
        "images failed": "0",
        "images with no detection": "1",
    }
    warning = summary.empty_warning()
    assert warning.startswith("WARNING: 1 of 3 images have no detection: ") and "\n" not in warning
    assert "MODEL.ROI_HEADS.SCORE_THRESH_TEST" in warning and "TEST.SCORE_THRESH_AUTO" in warning

    full = predict_images(Predictor(ThresholdModel(), 64, 24), paths[::2], str(tmp_path / "full"))
    assert full.counts[EMPTY] == 0 and full.empty_warning() == ""


def test_the_count_of_images_with_no_detection_adds_up_across_processes(tmp_path):
    paths = three_images_one_blank(tmp_path)
    kw = dict(progress=False, world_size=2)
    parts = [
        predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(tmp_path), rank=r, **kw)
        for r in (1, 0)
    ]
    assert [(s.done, s.counts[EMPTY]) for s in parts] == [(1, 1), (2, 0)]  # the blank is rank 1's
    merged = RunSummary.of_all(parts, order=paths)
    assert (merged.done, merged.counts) == (3, {"nuclei found": 10, EMPTY: 1})
    a = RunSummary(done=4, counts={"nuclei found": 7, EMPTY: 2})
    b = RunSummary(done=3, skipped=2, counts={"nuclei found": 9, EMPTY: 3})
    both = RunSummary.of_all([a, b])
    assert both.counts == {"nuclei found": 16, EMPTY: 5}
    assert both.empty_warning().startswith("WARNING: 5 of 9 images have no detection")


def test_a_resumed_run_counts_the_images_with_no_detection_the_killed_run_finished(tmp_path):
    """The killed run never printed its summary: the blank image it finished, skipped now, is
    counted from its outputs, or its empty result would go unsaid."""
    paths = three_images_one_blank(tmp_path)
    probe = ThresholdModel()
    predict_images(Predictor(probe, 64, 24), paths[:2], str(tmp_path / "probe"), progress=False)
    killed = ThresholdModel()
    killed.fail_at = probe.calls + 1  # the first tile of the third image
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        predict_images(Predictor(killed, 64, 24), paths, out, progress=False)
    resumed = predict_images(Predictor(ThresholdModel(), 64, 24), paths, out, progress=False)
    assert (resumed.done, resumed.skipped) == (1, 2)
    assert resumed.counts == {"nuclei found": 5, EMPTY: 1}  # nuclei: of the images predicted now
    assert resumed.empty_warning().startswith("WARNING: 1 of 3 images have no detection")
    again = predict_images(Predictor(ThresholdModel(), 64, 24), paths, out, progress=False)
    assert (again.done, again.skipped, again.counts[EMPTY]) == (0, 3, 1)


def test_predict_prints_the_warning_to_stderr_only_when_some_image_has_no_detection(capsys):
    spec = importlib.util.spec_from_file_location("predict_tool", f"{ROOT}/tools/predict.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    tool.report(RunSummary(done=3, counts={"nuclei found": 10, EMPTY: 1}), "out/")
    out, err = capsys.readouterr()
    rows = dict(line.rsplit(None, 1) for line in out.splitlines() if line[:6] == "images")
    assert rows[EMPTY] == "1"
    assert err.splitlines() == [RunSummary(done=3, counts={EMPTY: 1}).empty_warning()]
    tool.report(RunSummary(done=3, counts={"nuclei found": 10, EMPTY: 0}), "out/")
    out, err = capsys.readouterr()
    assert "images with no detection" in out and err == ""
