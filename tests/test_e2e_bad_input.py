"""Bad input through every entry point ends in one line naming the file, or, for one bad item
among many, a warning and a count in the summary; never a traceback.

The tools run in-process through their ``main`` and ``run_cli`` (as ``python tools/x.py`` does),
except training on a truncated image, which needs a real DataLoader worker process.
"""

import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from conftest import DEMO, ROOT, SMALL, tiny_cfg  # noqa: E402
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from dessam_d2.cli import run_cli
from dessam_d2.config import load_config
from dessam_d2.data.datasets import load_nuclei_coco, register_nuclei_coco
from dessam_d2.data.synthetic.cytology import generate_synthetic_dataset, make_synthetic_cytology
from dessam_d2.engine import Trainer
from dessam_d2.errors import DatasetFormatError, EmptyDatasetError


def load_tool(name):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", f"{ROOT}/tools/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def predict_tool():
    return load_tool("predict")


@pytest.fixture(scope="module")
def annotate_tool():
    return load_tool("boxes_to_masks")


@pytest.fixture(autouse=True)
def one_thread():
    # Two OpenMP threads on two shared cores crawl when other processes take one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_tool(tool, argv, capsys):
    """(exit status, stdout, stderr) of ``python tools/<tool>.py argv``."""
    try:
        status = run_cli(tool.main, tool.parse_args(argv))
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def summary(stdout):
    """{row label: value} of a tool's summary table."""
    rows = [line.rsplit(None, 1) for line in stdout.splitlines() if line[:1].isalpha()]
    return {label: value for label, value in (r for r in rows if len(r) == 2)}


def assert_one_line_error(status, err, *fragments):
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A (random) DES-SAM of the demo config at 128 px, saved as training saves it."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    model = build_model(load_config(DEMO, SMALL))
    torch.save({"model": model.state_dict(), "iteration": 0}, folder / "model_final.pth")
    data = (folder / "model_final.pth").read_bytes()
    (folder / "truncated.pth").write_bytes(data[: len(data) // 3])
    torch.manual_seed(0)
    other = build_model(tiny_cfg())  # another SAM shape (patch 16, 256 px)
    torch.save({"model": other.state_dict()}, folder / "other_variant.pth")
    return folder


def bad_images(folder):
    """good.png, blank.png (no nuclei), empty.png (0 bytes), cut.png (truncated)."""
    folder.mkdir(parents=True, exist_ok=True)
    img = np.full((96, 128, 3), 220, np.uint8)
    cv2.circle(img, (40, 40), 10, (40, 40, 40), -1)
    cv2.imwrite(str(folder / "good.png"), img)
    cv2.imwrite(str(folder / "blank.png"), np.full((96, 128, 3), 220, np.uint8))
    (folder / "empty.png").write_bytes(b"")
    data = (folder / "good.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2])
    return folder


# --------------------------------------------------------------------------------- predict


def test_predict_bad_config_and_weights_are_one_line_errors(
    predict_tool, weights, tmp_path, capsys
):
    images = bad_images(tmp_path / "in")
    base = ["--config-file", DEMO, "--input", str(images / "good.png"), "--output", str(tmp_path)]
    status, _, err = run_tool(predict_tool, base + ["MODEL.NO_SUCH_KEY", "1"], capsys)
    assert_one_line_error(status, err, "MODEL.NO_SUCH_KEY", "dessam_demo.yaml")

    cut = str(weights / "truncated.pth")
    status, _, err = run_tool(predict_tool, base + ["--weights", cut] + SMALL, capsys)
    assert_one_line_error(status, err, cut, "cannot be read", "truncated")

    other = str(weights / "other_variant.pth")
    status, _, err = run_tool(predict_tool, base + ["--weights", other] + SMALL, capsys)
    assert_one_line_error(status, err, other, "does not fit the model", "shape mismatch")

    missing = str(tmp_path / "missing.pth")
    status, _, err = run_tool(predict_tool, base + ["--weights", missing] + SMALL, capsys)
    assert_one_line_error(status, err, missing, "do not exist")

    sam = SMALL + ["MODEL.SAM.CHECKPOINT", cut]
    status, _, err = run_tool(predict_tool, base + ["--random-weights"] + sam, capsys)
    assert_one_line_error(status, err, f"SAM checkpoint {cut} cannot be read")

    # No trained weights is an error, not an untrained model's noise with exit status 0.
    status, out, err = run_tool(predict_tool, base + SMALL, capsys)
    assert_one_line_error(status, err, DEMO, "no trained weights", "--weights", "--random-weights")
    assert not list(tmp_path.glob("*_labels.png"))
    status, _, err = run_tool(predict_tool, base + ["--random-weights"] + SMALL, capsys)
    assert status == 0, err
    assert (tmp_path / "good_labels.png").exists()

    empty = tmp_path / "no_images"
    empty.mkdir()
    argv = ["--config-file", DEMO, "--input", str(empty), "--output", str(tmp_path)]
    status, _, err = run_tool(predict_tool, argv + SMALL, capsys)
    assert_one_line_error(status, err, "no images found", str(empty))


def test_predict_counts_bad_images_and_keeps_going(predict_tool, weights, tmp_path, capsys):
    images = bad_images(tmp_path / "in")
    out = tmp_path / "out"
    argv = ["--config-file", DEMO, "--weights", str(weights / "model_final.pth")]
    argv += ["--input", str(images), str(images / "missing.png"), "--output", str(out)] + SMALL
    # a random model sees nuclei everywhere: make it find none, as in an image without nuclei
    argv += ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", "1.0"]
    status, stdout, err = run_tool(predict_tool, argv, capsys)
    assert status == 1 and "Traceback" not in stdout + err
    rows = summary(stdout)
    assert rows["images predicted"] == "2" and rows["images failed"] == "3"
    assert rows["nuclei found"] == "0"
    failed = sorted(line for line in stdout.splitlines() if line.startswith("failed: "))
    assert len(failed) == 3
    for name, reason in (("cut.png", "truncated"), ("empty.png", "0 bytes"), ("missing", "not")):
        assert any(name in line and reason in line for line in failed), (name, failed)
    assert sorted(p.name for p in out.glob("*_nuclei.csv")) == [
        "blank_nuclei.csv",
        "good_nuclei.csv",
    ]
    # Exit status: 1 above (some images failed, the rest done); 2 when not one image could be
    # read; 0 on a re-run where every readable image is done and no bad one is given.
    argv_bad = argv[:4] + ["--input", str(images / "cut.png"), str(images / "empty.png")]
    status, stdout, err = run_tool(predict_tool, argv_bad + argv[7:], capsys)
    assert status == 2 and err.strip().splitlines()[-1].startswith("error: none of the 2 image")
    argv_good = argv[:4] + ["--input", str(images / "good.png"), str(images / "blank.png")]
    status, stdout, err = run_tool(predict_tool, argv_good + argv[7:], capsys)
    assert status == 0 and summary(stdout)["images skipped (already done)"] == "2"
    # no nuclei: a header-only CSV, an empty GeoJSON, an all-zero label image
    assert (out / "blank_nuclei.csv").read_text().count("\n") == 1
    assert json.loads((out / "blank.geojson").read_text())["features"] == []
    assert cv2.imread(str(out / "blank_labels.png"), cv2.IMREAD_UNCHANGED).max() == 0


# -------------------------------------------------------------------------- boxes_to_masks


@pytest.fixture
def boxes_file(tmp_path):
    json_file = generate_synthetic_dataset(str(tmp_path / "ds"), 4, image_size=(96, 128), seed=5)
    coco = json.load(open(json_file))
    for ann in coco["annotations"]:
        del ann["segmentation"]
    valid = len(coco["annotations"])
    bad = [[10, 10, 0, 5], [10, 10, -4, 5], [500, 10, 20, 20], [1, 2, 3], None, [1, 2, "x", 4]]
    for i, bbox in enumerate(bad):
        ann = {"id": 9000 + i, "image_id": 1, "category_id": 1, "iscrowd": 0}
        coco["annotations"].append(ann if bbox is None else {**ann, "bbox": bbox})
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 2]  # no nuclei
    path = tmp_path / "boxes.json"
    path.write_text(json.dumps(coco))
    return path, tmp_path / "ds" / "images", coco, valid


def test_boxes_to_masks_bad_files_are_one_line_errors(annotate_tool, tmp_path, capsys):
    base = ["--config-file", DEMO, "--image-root", str(tmp_path), "--output", str(tmp_path / "o")]
    cases = [
        ("{not json", "is not valid JSON"),
        (json.dumps({"images": [], "annotations": []}), "lists no images"),
        (
            json.dumps({"images": [{"id": 1}], "annotations": []}),
            "images[0] has no id or file_name",
        ),
        (json.dumps([1, 2]), "is not a COCO file"),
    ]
    for i, (text, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(text)
        status, _, err = run_tool(
            annotate_tool, base + ["--random-weights", "--annotations", str(path)] + SMALL, capsys
        )
        assert_one_line_error(status, err, str(path), message)
    missing = str(tmp_path / "missing.json")
    argv = base + ["--random-weights", "--annotations", missing] + SMALL
    status, _, err = run_tool(annotate_tool, argv, capsys)
    assert_one_line_error(status, err, missing, "does not exist")
    # The teacher needs SAM's weights or a trained model, the student a trained model.
    path = tmp_path / "bad0.json"
    for flags, opts in (
        ([], []),
        (["--student"], []),
        (["--student"], ["MODEL.SAM.CHECKPOINT", "x"]),
    ):
        argv = base + flags + ["--annotations", str(path)] + SMALL + opts
        status, _, err = run_tool(annotate_tool, argv, capsys)
        assert_one_line_error(status, err, DEMO, "no trained weights", "--weights")


def test_boxes_to_masks_counts_bad_boxes_and_images_and_resumes(
    annotate_tool, weights, boxes_file, tmp_path, capsys
):
    path, images, coco, valid = boxes_file
    hidden = tmp_path / "hidden.png"
    os.replace(images / "00002.png", hidden)  # missing
    good = (images / "00003.png").read_bytes()
    (images / "00003.png").write_bytes(good[:300])  # truncated
    out = tmp_path / "masks.json"
    argv = ["--config-file", DEMO, "--weights", str(weights / "model_final.pth")]
    argv += ["--annotations", str(path), "--image-root", str(images), "--output", str(out)] + SMALL
    status, stdout, err = run_tool(annotate_tool, argv, capsys)
    assert status == 1 and "Traceback" not in stdout + err
    rows = summary(stdout)
    assert rows["boxes skipped (malformed, zero or negative size, outside the image)"] == "6"
    assert rows["images segmented"] == "2" and rows["images failed"] == "2"
    failed = [line for line in stdout.splitlines() if line.startswith("failed: ")]
    assert len(failed) == 2 and "00002.png" in failed[0] + failed[1] and "truncated" in stdout
    assert (tmp_path / "masks.json.partial.jsonl").exists()  # kept: the run is not complete

    os.replace(hidden, images / "00002.png")
    (images / "00003.png").write_bytes(good)
    status, stdout, _ = run_tool(annotate_tool, argv, capsys)
    assert status == 0
    assert summary(stdout)["images resumed from an earlier run"] == "2"
    result = json.load(open(out))
    expected = sorted(a["id"] for a in coco["annotations"] if a["id"] < 9000)
    assert sorted(a["id"] for a in result["annotations"]) == expected
    assert len(expected) < valid  # image 2 had its boxes removed: it has no nuclei
    assert not (tmp_path / "masks.json.partial.jsonl").exists()

    # Not one image readable (wrong --image-root): one line, exit status 2, nothing written.
    argv[argv.index("--image-root") + 1] = str(tmp_path / "nowhere")
    argv[argv.index("--output") + 1] = str(tmp_path / "none.json")
    status, stdout, err = run_tool(annotate_tool, argv, capsys)
    lines = [s for s in err.splitlines() if s.strip() and "boxes->masks" not in s]  # tqdm
    assert status == 2 and stdout == "" and len(lines) == 1, err
    assert lines[0].startswith(f"error: no image of {path} could be read under {tmp_path}")
    assert lines[0].endswith("image file not found); nothing written")
    assert not (tmp_path / "none.json").exists()
    assert not (tmp_path / "none.json.partial.jsonl").exists()


# ----------------------------------------------------------------- training and data loading


@pytest.fixture
def registered(tmp_path):
    names = []

    def register(name, coco):
        path = tmp_path / f"{name}.json"
        path.write_text(coco if isinstance(coco, str) else json.dumps(coco))
        register_nuclei_coco(name, str(path), str(tmp_path))
        names.append(name)
        return path

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_training_data_that_cannot_be_used_fails_in_one_line(registered):
    image = {"id": 1, "file_name": "a.png", "height": 10, "width": 10}
    cat = [{"id": 1, "name": "nucleus"}]
    cases = [
        ("rel_broken", '{"images": [', DatasetFormatError, "rel_broken.json is not a valid COCO"),
        ("rel_empty", {"images": [], "annotations": [], "categories": cat}, EmptyDatasetError, ""),
        (
            "rel_no_nuclei",
            {"images": [image], "annotations": [], "categories": cat},
            EmptyDatasetError,
            "No valid data found in rel_no_nuclei",  # FILTER_EMPTY_ANNOTATIONS drops all
        ),
    ]
    for name, coco, error, message in cases:
        path = registered(name, coco)
        opts = ["DATASETS.TRAIN", f"('{name}',)", "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "True"]
        with pytest.raises(error, match=message or str(path)) as e:
            Trainer.build_train_loader(load_config(DEMO, opts))
        assert "\n" not in str(e.value)


def test_polygons_with_fewer_than_3_points_drop_their_nucleus_only(registered):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5, 5, 2, 2], "iscrowd": 0},
    ]
    anns[0]["segmentation"] = [[1, 1, 5, 1, 5, 5]]
    anns[1]["segmentation"] = [[5, 5, 7, 7]]  # 2 points
    coco = {
        "images": [{"id": 1, "file_name": "a.png", "height": 10, "width": 10}],
        "annotations": anns,
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    path = registered("rel_short_polygon", coco)
    dicts = load_nuclei_coco("rel_short_polygon", str(path), str(path.parent))
    assert [a["bbox"] for a in dicts[0]["annotations"]] == [[1, 1, 4, 4]]


def test_training_on_a_truncated_image_in_a_worker_is_one_line(tmp_path):
    root = tmp_path / "data"
    make_synthetic_cytology(
        str(root / "synthetic_cytology"), num_train=2, num_test=1, image_size=(96, 96)
    )
    bad = root / "synthetic_cytology" / "train" / "images" / "00001.png"
    bad.write_bytes(bad.read_bytes()[:200])
    cmd = [sys.executable, "tools/train_net.py", "--config-file", "configs/dessam_demo.yaml"]
    opts = ["SOLVER.EPOCHS", "0", "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2"]
    opts += ["DATALOADER.NUM_WORKERS", "1", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path)]
    env = dict(os.environ, DETECTRON2_DATASETS=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        cmd + SMALL + opts, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {bad}: cannot decode image") and "truncated" in last
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "Traceback" in (tmp_path / "log.txt").read_text()  # kept for debugging


# ------------------------------------------------------------------------------ converters


def test_a_conversion_that_keeps_no_image_fails(tmp_path, capsys):
    cli = load_tool("convert_cnseg")
    sample = tmp_path / "CNSeg" / "ClusterSeg" / "sample"
    sample.mkdir(parents=True)
    (sample / "a.jpg").write_bytes(b"")
    (sample / "a.json").write_text(json.dumps({"shapes": []}))
    (sample / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    (sample / "b.json").write_text('{"shapes": [')
    argv = ["--input", str(tmp_path / "CNSeg"), "--output", str(tmp_path / "out")]
    assert cli.main(argv + ["--no-progress"]) == 2  # nothing done: a user error
    out, err = capsys.readouterr()
    assert "unreadable image" in out and "unparseable json" in out
    lines = err.strip().splitlines()
    assert lines[-1] == (
        f"error: no image of {tmp_path / 'CNSeg'} could be converted (reasons in the table above): "
        "the data sets are empty"
    )
    # each skip was a one-line warning naming its file (when logging goes to the console)
    warnings = "\n".join(lines[:-1])
    assert not warnings or (
        str(sample / "a.jpg") in warnings and str(sample / "b.json") in warnings
    )
