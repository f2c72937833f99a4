"""predict_images: every output file, reruns skip finished images, N processes write the files
of one."""

import csv
import json

import cv2
import numpy as np
from test_inference_predictor import ThresholdModel, disc_image

from dessam_d2.inference.images import predict_images
from dessam_d2.inference.inputs import collect_images
from dessam_d2.inference.outputs import RunSummary, output_paths
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


def test_images_with_no_detection_are_counted_and_warned_about_across_processes(tmp_path):
    img, _ = disc_image()
    paths = [str(tmp_path / "nuclei.png"), str(tmp_path / "blank.png")]
    cv2.imwrite(paths[0], img[..., ::-1])
    cv2.imwrite(paths[1], np.full_like(img, 220))  # nothing dark: no nucleus
    one = predict_images(Predictor(ThresholdModel(), 64, 24), paths, str(tmp_path / "a"))
    assert one.counts == {"nuclei found": 5, "images with no detection": 1}
    rows = dict(line.rsplit(None, 1) for line in one.table().splitlines()[1:-1])
    assert rows["images with no detection"] == "1"
    assert one.empty_warning().startswith("WARNING: 1 of 2 predicted images have no detection")
    kw = dict(progress=False, world_size=2)
    parts = [
        predict_images(
            Predictor(ThresholdModel(), 64, 24), paths, str(tmp_path / "b"), rank=r, **kw
        )
        for r in (1, 0)
    ]
    merged = RunSummary.of_all(parts, order=paths)
    assert merged.counts == one.counts and merged.done == 2
    full = predict_images(Predictor(ThresholdModel(), 64, 24), paths[:1], str(tmp_path / "c"))
    assert full.counts["images with no detection"] == 0 and full.empty_warning() == ""
