"""ISBI 2014 converter: .mat fixtures in MATLAB v5 (scipy) and v7.3 (HDF5), nucleus by nucleus."""

import importlib.util
import json
import os
from typing import Dict, List

import cv2
import h5py
import numpy as np
import pytest
import scipy.io

from dessam_d2.data.converters.isbi2014 import convert_isbi2014
from dessam_d2.errors import ISBIFormatError


def _cell(arrays: List) -> np.ndarray:
    """A MATLAB N x 1 cell array as scipy writes it."""
    cell = np.empty((len(arrays), 1), dtype=object)
    for i, a in enumerate(arrays):
        cell[i, 0] = a
    return cell


def _write_v73(path, variables: Dict[str, List[np.ndarray]]) -> None:
    """What MATLAB's save -v7.3 writes: an HDF5 file with a 512-byte header, every array stored
    transposed, cells as object references into #refs#, logicals as uint8 + class attribute."""
    with h5py.File(path, "w", userblock_size=512) as f:
        refs_group = f.create_group("#refs#")
        for name, arrays in variables.items():
            refs = []
            for k, a in enumerate(arrays):
                data = a.T.astype(np.uint8) if a.dtype == bool else a.T
                ds = refs_group.create_dataset(f"{name}_{k}", data=data)
                ds.attrs["MATLAB_class"] = np.bytes_("logical" if a.dtype == bool else a.dtype.name)
                refs.append(ds.ref)
            cell = f.create_dataset(name, data=np.array([refs], dtype=h5py.ref_dtype))  # 1 x N
            cell.attrs["MATLAB_class"] = np.bytes_("cell")
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  6 2014".ljust(116))


def _gray(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _train_masks():
    m0 = np.zeros((32, 40), bool)
    m0[2:6, 3:9] = True  # bbox [3, 2, 6, 4], area 24
    m0[10, 10] = m0[11, 11] = True  # diagonal neighbours: one nucleus with 8-connectivity
    m0[20:25, 30:35] = True  # bbox [30, 20, 5, 5], area 25
    return [m0, np.zeros((32, 40), bool)]


def _test_masks():
    m0 = np.zeros((24, 36), bool)
    m0[1:4, 20:30] = True  # wide: bbox [20, 1, 10, 3], area 30 (a transposition would show)
    m1 = np.zeros((24, 36), bool)
    m1[10:20, 2:4] = True  # tall: bbox [2, 10, 2, 10], area 20
    return [m0, m1]


@pytest.fixture
def mat_dir(tmp_path):
    d = tmp_path / "mat"
    d.mkdir()
    scipy.io.savemat(
        d / "isbi_train.mat", {"ISBI_Train": _cell([_gray(32, 40, 0), _gray(32, 40, 1)])}
    )
    cytoplasm = _cell([_cell([np.ones((32, 40), bool)]), _cell([np.ones((32, 40), bool)])])
    scipy.io.savemat(
        d / "isbi_train_GT.mat",
        {"train_Nuclei": _cell(_train_masks()), "train_Cytoplasm": cytoplasm},
    )
    float_image = np.linspace(0.0, 1.0, 24 * 36).reshape(24, 36)
    _write_v73(
        d / "isbi_test900.mat",
        {"ISBI_Test": [float_image, _gray(24, 36, 2)], "test_Nuclei": _test_masks()},
    )
    return d


def _coco(out, split):
    with open(out / "annotations" / f"{split}.json") as f:
        return json.load(f)


def test_train_v5_nuclei_one_by_one(mat_dir, tmp_path):
    out = tmp_path / "out"
    report = convert_isbi2014(str(mat_dir), str(out), progress=False)
    assert [(s.name, s.images, s.nuclei) for s in report.subsets] == [
        ("isbi2014/train", 2, 3),
        ("isbi2014/test", 2, 2),
    ]
    coco = _coco(out, "train")
    assert [(im["id"], im["file_name"], im["height"], im["width"]) for im in coco["images"]] == [
        (1, "train/00000.png", 32, 40),
        (2, "train/00001.png", 32, 40),
    ]
    anns = coco["annotations"]
    assert [a["image_id"] for a in anns] == [1, 1, 1]
    assert [a["bbox"] for a in anns] == [[3, 2, 6, 4], [10, 10, 2, 2], [30, 20, 5, 5]]
    assert [a["area"] for a in anns] == [24, 2, 25]
    assert all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
    assert anns[0]["segmentation"]["size"] == [32, 40]
    png = cv2.imread(str(out / "train/00001.png"), cv2.IMREAD_UNCHANGED)
    assert png.ndim == 2  # grayscale PNG
    np.testing.assert_array_equal(png, _gray(32, 40, 1))


def test_test_v73_is_transposed_back(mat_dir, tmp_path):
    out = tmp_path / "out"
    convert_isbi2014(str(mat_dir), str(out), progress=False)
    coco = _coco(out, "test")
    assert [(im["height"], im["width"]) for im in coco["images"]] == [(24, 36), (24, 36)]
    assert [(a["image_id"], a["bbox"], a["area"]) for a in coco["annotations"]] == [
        (1, [20, 1, 10, 3], 30),
        (2, [2, 10, 2, 10], 20),
    ]
    png0 = cv2.imread(str(out / "test/00000.png"), cv2.IMREAD_UNCHANGED)
    expected = np.rint(np.linspace(0.0, 1.0, 24 * 36).reshape(24, 36) * 255)
    np.testing.assert_array_equal(png0, expected)  # doubles in [0, 1] -> x 255
    np.testing.assert_array_equal(
        cv2.imread(str(out / "test/00001.png"), cv2.IMREAD_UNCHANGED), _gray(24, 36, 2)
    )


def test_ambiguous_test_variables_list_what_was_found(mat_dir, tmp_path):
    scipy.io.savemat(mat_dir / "extra.mat", {"ISBI_Test_copy": _cell([_gray(8, 8, 3)] * 2)})
    with pytest.raises(ISBIFormatError) as info:
        convert_isbi2014(str(mat_dir), str(tmp_path / "out"), progress=False)
    message = str(info.value)
    assert "cannot tell which variable holds the test images (2 candidates)" in message
    assert "isbi_test900.mat:ISBI_Test (2 x 24x36 float64, image)" in message
    assert "extra.mat:ISBI_Test_copy (2 x 8x8 uint8, image)" in message
    assert "test_Nuclei" in message and "--images-var" in message and "\n" not in message
    assert not (tmp_path / "out/annotations/train.json").exists()  # nothing half-written
    report = convert_isbi2014(
        str(mat_dir),
        str(tmp_path / "out"),
        images_vars=["isbi_test900.mat:ISBI_Test"],
        progress=False,
    )
    assert [(s.images, s.nuclei) for s in report.subsets] == [(2, 3), (2, 2)]


def test_concatenated_variables_and_count_mismatch(tmp_path):
    _write_v73(tmp_path / "a.mat", {"imgsA": [_gray(24, 36, 0)], "nucA": _test_masks()[:1]})
    _write_v73(tmp_path / "b.mat", {"imgsB": [_gray(24, 36, 1)], "nucB": _test_masks()[1:]})
    with pytest.raises(ISBIFormatError, match=r"test has 1 images \(a.mat:imgsA\) but 2 nuclei"):
        convert_isbi2014(
            str(tmp_path),
            str(tmp_path / "out"),
            images_vars=["imgsA"],
            nuclei_vars=["nucA", "nucB"],
        )
    report = convert_isbi2014(
        str(tmp_path),
        str(tmp_path / "out"),
        images_vars=["imgsA", "imgsB"],
        nuclei_vars=["nucA", "nucB"],
        progress=False,
    )
    assert [(s.name, s.images, s.nuclei) for s in report.subsets] == [("isbi2014/test", 2, 2)]
    bboxes = [a["bbox"] for a in _coco(tmp_path / "out", "test")["annotations"]]
    assert bboxes == [[20, 1, 10, 3], [2, 10, 2, 10]]


def test_v73_numeric_stack_min_area_and_size_mismatch(tmp_path):
    stack = np.stack([_gray(24, 36, k) for k in range(3)])  # MATLAB 24x36x3, stored as 3x36x24
    masks = np.stack(_test_masks() + [np.zeros((24, 36), bool)]).astype(np.uint8)
    masks[0, 15, 15] = 1  # a one-pixel speck
    with h5py.File(tmp_path / "t.mat", "w") as f:
        f.create_dataset("imgs", data=stack.transpose(0, 2, 1))
        f.create_dataset("nuclei", data=masks.transpose(0, 2, 1))
    scipy.io.savemat(tmp_path / "isbi_train.mat", {"ISBI_Train": _cell([_gray(8, 8, 0)])})
    scipy.io.savemat(
        tmp_path / "isbi_train_GT.mat", {"train_Nuclei": _cell([np.ones((9, 9), bool)])}
    )
    report = convert_isbi2014(str(tmp_path), str(tmp_path / "out"), min_area=2, progress=False)
    train, test = report.subsets
    assert (train.images, dict(train.skipped_images)) == (0, {"mask size differs": 1})
    assert (test.images, test.nuclei, dict(test.skipped_nuclei)) == (
        3,
        2,
        {"smaller than min area": 1},
    )
    assert "| total" in report.table()


def test_missing_pieces_are_one_line_errors(tmp_path):
    with pytest.raises(ISBIFormatError, match="no .mat files found"):
        convert_isbi2014(str(tmp_path), str(tmp_path / "out"))
    scipy.io.savemat(tmp_path / "isbi_train.mat", {"ISBI_Train": _cell([_gray(8, 8, 0)])})
    with pytest.raises(ISBIFormatError, match="isbi_train.mat without isbi_train_GT.mat"):
        convert_isbi2014(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "isbi_train_GT.mat").write_bytes(b"")
    with pytest.raises(ISBIFormatError, match="isbi_train_GT.mat: MAT file is empty"):
        convert_isbi2014(str(tmp_path), str(tmp_path / "out"))


def test_cli_one_line_error(tmp_path, capsys):
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "convert_isbi2014.py")
    spec = importlib.util.spec_from_file_location("convert_isbi2014_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--input", str(tmp_path / "none"), "--output", str(tmp_path / "o")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "input folder not found" in err
