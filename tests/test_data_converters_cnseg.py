"""CNSeg converter: labelme fixtures in CNSeg's folder layouts, checked nucleus by nucleus."""

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest

from dessam_d2.data.converters.cnseg import convert_cnseg, find_cnseg_subsets
from dessam_d2.errors import CNSegLayoutError

H, W = 64, 80
SQUARE = [[10, 10], [30, 10], [30, 20], [10, 20]]  # bbox [10, 10, 20, 10], area 200


def _image(path, h=H, w=W):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 200, np.uint8))


def _label(path, shapes, h=H, w=W):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shapes = [s if isinstance(s, dict) else {"shape_type": "polygon", "points": s} for s in shapes]
    data = {"version": "5.0.1", "shapes": shapes, "imageHeight": h, "imageWidth": w}
    with open(path, "w") as f:
        json.dump(data, f)


@pytest.fixture(scope="module")
def cnseg_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("CNSeg")
    patch = root / "PatchSeg"
    _image(patch / "train-images/a.jpg")
    _label(
        patch / "train-labels/a.json",
        [
            SQUARE,
            [[40, 5], [50, 5], [40, 25]],  # triangle: bbox [40, 5, 10, 20], area 100
            [[1, 1], [5, 5]],  # < 3 points
            [[0, 0], [10, 10], [10, 0], [0, 10]],  # bow-tie: self-intersecting
            [[70, 50], [90, 50], [90, 70], [70, 70]],  # clipped: bbox [70, 50, 10, 14], area 140
            [[100, 100], [110, 100], [110, 110]],  # outside the image
            {"shape_type": "rectangle", "points": [[1, 1], [4, 4]]},  # not a polygon
            [[5, 40], [15, 40], [15, 50], [5, 50], [5, 40]],  # closed: 4 points, area 100
        ],
    )
    _image(patch / "train-images/b.jpg")
    _label(patch / "train-labels/b.json", [])  # an image without nuclei is kept
    _image(patch / "train-images/c.jpg")  # image without label
    _label(patch / "train-labels/d.json", [SQUARE])  # label without image
    _image(patch / "train-images/e.jpg")
    (patch / "train-labels/e.json").write_text('{"shapes": [')  # does not parse
    _image(patch / "train-images/f.jpg")
    _label(patch / "train-labels/f.json", [SQUARE], h=100, w=100)  # size mismatch
    _image(patch / "test-images/t1.jpg", 32, 48)
    _label(patch / "test-labels/t1.json", [[[2, 3], [12, 3], [12, 9]]], 32, 48)

    cluster = root / "ClusterSeg"
    _image(cluster / "sample/s1.jpg")  # images and json side by side
    _label(cluster / "sample/s1.json", [SQUARE, [[1, 1], [2, 2], [3, 3]]])  # 2nd: zero area
    _image(cluster / "test-sample/images/ts1.png")  # images/ and labels/ sub-folders
    _label(cluster / "test-sample/labels/ts1.json", [SQUARE, SQUARE])

    target = root / "DomainSeg/TargetA"
    _image(target / "x.jpg")
    _label(target / "x.json", [[[0, 0], [4, 0], [4, 4], [0, 4]]])
    (target / "empty.jpg").write_bytes(b"")  # zero-byte image
    _label(target / "empty.json", [SQUARE])
    _image(target / "cut.jpg")
    data = (target / "cut.jpg").read_bytes()
    (target / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated image
    _label(target / "cut.json", [SQUARE])
    return root


@pytest.fixture(scope="module")
def converted(cnseg_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("cnseg_out")
    report = convert_cnseg(str(cnseg_root), str(out), progress=False)
    return out, report


def _coco(out, family, name):
    with open(out / family / "annotations" / f"{name}.json") as f:
        return json.load(f)


def test_subsets_found_in_layout_order(cnseg_root):
    subsets = find_cnseg_subsets(str(cnseg_root))
    assert [(s.family, s.part) for s in subsets] == [
        ("patchseg", "train"),
        ("patchseg", "test"),
        ("clusterseg", "sample"),
        ("clusterseg", "test-sample"),
        ("domainseg", "targeta"),
    ]
    assert [os.path.basename(f) for f in subsets[0].folders] == ["train-images", "train-labels"]


def test_patchseg_train_nuclei_one_by_one(converted, cnseg_root):
    out, _ = converted
    coco = _coco(out, "patchseg", "train")
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in coco["images"]] == [
        (1, "train/a.jpg", H, W),
        (2, "train/b.jpg", H, W),
    ]
    anns = coco["annotations"]
    assert [a["id"] for a in anns] == [1, 2, 3, 4] and {a["image_id"] for a in anns} == {1}
    assert [a["bbox"] for a in anns] == [
        [10, 10, 20, 10],
        [40, 5, 10, 20],
        [70, 50, 10, 14],
        [5, 40, 10, 10],
    ]
    assert [a["area"] for a in anns] == [200, 100, 140, 100]
    assert anns[0]["segmentation"] == [[10, 10, 30, 10, 30, 20, 10, 20]]
    assert len(anns[3]["segmentation"][0]) == 8  # closing duplicate point removed
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
    assert coco["categories"] == [{"id": 1, "name": "nucleus", "supercategory": "nucleus"}]
    copied = (out / "patchseg/train/a.jpg").read_bytes()
    assert copied == (cnseg_root / "PatchSeg/train-images/a.jpg").read_bytes()


def test_report_counts_every_skip(converted):
    _, report = converted
    by_name = {s.name: s for s in report.subsets}
    train = by_name["patchseg/train"]
    assert (train.images, train.nuclei) == (2, 4)
    assert dict(train.skipped_images) == {
        "image without label": 1,
        "label without image": 1,
        "unparseable json": 1,
        "size mismatch": 1,
    }
    assert dict(train.skipped_nuclei) == {
        "< 3 points": 1,
        "self-intersecting": 1,
        "outside the image": 1,
        "not a polygon": 1,
    }
    assert dict(train.notes) == {"clipped to image": 1}
    target = by_name["domainseg/targeta"]
    assert (target.images, target.nuclei, dict(target.skipped_images)) == (
        1,
        1,
        {"unreadable image": 2},
    )
    sample = by_name["clusterseg/sample"]
    assert (sample.images, sample.nuclei, dict(sample.skipped_nuclei)) == (1, 1, {"zero area": 1})
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in report.table().splitlines()]
    assert ["total", "6", "9", "6", "5", "1"] in rows  # images, nuclei, skips, clipped
    assert ["patchseg/train", "image", "unparseable json", "1"] in rows
    assert ["domainseg/targeta", "image", "unreadable image", "2"] in rows
    assert ["clusterseg/sample", "nucleus", "zero area", "1"] in rows


def test_clusterseg_parts_and_unions(converted):
    out, _ = converted
    sample, test_sample = _coco(out, "clusterseg", "sample"), _coco(
        out, "clusterseg", "test-sample"
    )
    assert [im["file_name"] for im in sample["images"]] == ["sample/s1.jpg"]
    assert [im["file_name"] for im in test_sample["images"]] == ["test-sample/ts1.png"]
    # ids are unique across the family, so the unions are the parts concatenated
    assert [im["id"] for im in test_sample["images"]] == [2]
    assert [a["id"] for a in test_sample["annotations"]] == [2, 3]
    train, test = _coco(out, "clusterseg", "train"), _coco(out, "clusterseg", "test")
    assert (train["images"], train["annotations"]) == (sample["images"], sample["annotations"])
    assert (test["images"], test["annotations"]) == (
        test_sample["images"],
        test_sample["annotations"],
    )
    assert (out / "clusterseg/test-sample/ts1.png").is_file()
    assert sorted(os.listdir(out / "clusterseg/annotations")) == [
        "sample.json",
        "test-sample.json",
        "test.json",
        "train.json",
    ]


def test_domainseg_and_patchseg_test(converted):
    out, _ = converted
    target = _coco(out, "domainseg", "targeta")
    assert [im["file_name"] for im in target["images"]] == ["targeta/x.jpg"]
    assert [(a["bbox"], a["area"]) for a in target["annotations"]] == [([0, 0, 4, 4], 16)]
    test = _coco(out, "patchseg", "test")
    assert [(im["height"], im["width"]) for im in test["images"]] == [(32, 48)]
    assert [(a["bbox"], a["area"]) for a in test["annotations"]] == [([2, 3, 10, 6], 30)]


def test_link_mode_hard_links(cnseg_root, tmp_path):
    report = convert_cnseg(str(cnseg_root / "DomainSeg"), str(tmp_path), link=True, progress=False)
    assert [s.name for s in report.subsets] == ["domainseg/targeta"]
    src, dst = cnseg_root / "DomainSeg/TargetA/x.jpg", tmp_path / "domainseg/targeta/x.jpg"
    assert os.stat(src).st_ino == os.stat(dst).st_ino


def test_no_subset_found_is_one_line_error(tmp_path):
    (tmp_path / "other").mkdir()
    with pytest.raises(CNSegLayoutError, match="no CNSeg subset folder found"):
        convert_cnseg(str(tmp_path), str(tmp_path / "out"), progress=False)
    with pytest.raises(CNSegLayoutError, match="input folder not found"):
        convert_cnseg(str(tmp_path / "missing"), str(tmp_path / "out"), progress=False)


def test_two_copies_of_a_subset_is_an_error(tmp_path):
    for copy in ("copy1", "copy2"):
        _image(tmp_path / copy / "TargetB/x.jpg")
    with pytest.raises(CNSegLayoutError, match="two folders for CNSeg subset 'domainseg/targetb'"):
        find_cnseg_subsets(str(tmp_path))


def test_test_slash_part_layout_single_subset_input_and_duplicate_stems(tmp_path):
    cluster = tmp_path / "CNSeg/Cluster_Seg"
    _image(cluster / "test/Sample/q.jpg")
    _label(cluster / "test/Sample/q.json", [SQUARE])
    _image(cluster / "test/Sample/q.png")  # a second image with the same stem
    _image(cluster / "Normal/r.jpg")
    _label(cluster / "Normal/r.json", [SQUARE])
    subsets = find_cnseg_subsets(str(tmp_path))
    assert [(s.family, s.part) for s in subsets] == [
        ("clusterseg", "normal"),
        ("clusterseg", "test-sample"),
    ]
    report = convert_cnseg(str(cluster / "test/Sample"), str(tmp_path / "out"), progress=False)
    (only,) = report.subsets
    assert (only.name, only.images, dict(only.skipped_images)) == (
        "clusterseg/test-sample",
        0,
        {"duplicate stem": 1},
    )


def test_cli_prints_table_and_one_line_errors(cnseg_root, tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_cnseg.py")
    spec = importlib.util.spec_from_file_location("convert_cnseg_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    argv = ["--input", str(cnseg_root / "ClusterSeg"), "--output", str(tmp_path), "--no-progress"]
    # Exit status (dessam_d2.cli.exit_status): 0 every image converted (a nucleus of zero area
    # dropped by rule does not count as a skip), 1 some images skipped, 2 nothing converted.
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| clusterseg/sample" in out and "zero area" in out
    argv = ["--input", str(cnseg_root / "PatchSeg"), "--output", str(tmp_path / "p")]
    assert cli.main(argv + ["--no-progress"]) == 1  # one unparseable file among good ones
    assert "unparseable json" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "input folder not found" in err
    bad = tmp_path / "bad" / "DomainSeg" / "TargetA"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"")
    _label(bad / "x.json", [SQUARE])
    argv = ["--input", str(tmp_path / "bad"), "--output", str(tmp_path / "b"), "--no-progress"]
    assert cli.main(argv) == 2  # not one image could be converted
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: no image of")  # after the warning
