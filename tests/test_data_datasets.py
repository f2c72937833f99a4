"""Registration: every DATA.md name, lazy, idempotent, clear errors when files are missing."""

import importlib.util
import json
import os

import cv2
import numpy as np
import pytest
import scipy.io
from detectron2.data import DatasetCatalog, MetadataCatalog

import dessam_d2.data.datasets as datasets_module
from dessam_d2.data.converters.cnseg import convert_cnseg
from dessam_d2.data.converters.isbi2014 import convert_isbi2014
from dessam_d2.data.datasets import (
    BUILTIN_DATASETS,
    register_all_nuclei_datasets,
    register_nuclei_coco,
)
from dessam_d2.data.synthetic.cytology import make_synthetic_cytology
from dessam_d2.errors import DatasetFormatError, DatasetNotFoundError, EmptyDatasetError

DATA_MD_NAMES = [
    "cnseg_patchseg_train",
    "cnseg_patchseg_test",
    "cnseg_clusterseg_train",
    "cnseg_clusterseg_test",
    "cnseg_clusterseg_sample_test",
    "cnseg_clusterseg_normal_test",
    "cnseg_clusterseg_difficult_test",
    "cnseg_domainseg_targeta_test",
    "cnseg_domainseg_targetb_test",
    "isbi2014_train",
    "isbi2014_test",
    "dessam_synthetic_train",
    "dessam_synthetic_test",
    "dessam_synthetic_shifted_test",
]


@pytest.fixture
def tmp_root(tmp_path):
    """Point the built-in names at tmp_path, and back at the default root afterwards."""
    register_all_nuclei_datasets(str(tmp_path), overwrite=True)
    yield tmp_path
    register_all_nuclei_datasets(overwrite=True)


def test_every_name_is_registered_with_metadata():
    assert set(DATA_MD_NAMES) == set(BUILTIN_DATASETS)
    for name in DATA_MD_NAMES:
        assert name in DatasetCatalog.list()
        meta = MetadataCatalog.get(name)
        assert meta.thing_classes == ["nucleus"] and meta.evaluator_type == "nuclei"
        assert meta.json_file.endswith(".json") and meta.image_root
    meta = MetadataCatalog.get("cnseg_clusterseg_sample_test")
    assert meta.json_file.endswith("cnseg/clusterseg/annotations/test-sample.json")
    assert meta.image_root.endswith("cnseg/clusterseg")


def test_registration_is_lazy_and_names_the_converter(tmp_root):
    # registering touched no file; loading says which command creates the missing json
    with pytest.raises(DatasetNotFoundError) as info:
        DatasetCatalog.get("cnseg_patchseg_train")
    message = str(info.value)
    assert str(tmp_root / "cnseg/patchseg/annotations/train.json") in message
    assert "tools/convert_cnseg.py" in message and f"--output {tmp_root}/cnseg" in message
    with pytest.raises(DatasetNotFoundError, match="tools/convert_isbi2014.py"):
        DatasetCatalog.get("isbi2014_test")
    with pytest.raises(DatasetNotFoundError, match="tools/make_synthetic.py"):
        DatasetCatalog.get("dessam_synthetic_train")


def test_synthetic_split_loads_through_the_builtin_names(tmp_root):
    make_synthetic_cytology(
        str(tmp_root / "synthetic_cytology"),
        num_train=2,
        num_test=1,
        image_size=(64, 64),
        nuclei_per_image=(2, 4),
        nucleus_radius=(3.0, 8.0),
    )
    train = DatasetCatalog.get("dessam_synthetic_train")
    assert [d["image_id"] for d in train] == [1, 2]
    assert train[0]["file_name"] == str(tmp_root / "synthetic_cytology/train/images/00000.png")
    assert (train[0]["height"], train[0]["width"]) == (64, 64)
    with open(tmp_root / "synthetic_cytology/train/annotations.json") as f:
        n_annotations = len(json.load(f)["annotations"])
    assert sum(len(d["annotations"]) for d in train) == n_annotations
    assert {a["category_id"] for d in train for a in d["annotations"]} == {0}
    assert MetadataCatalog.get("dessam_synthetic_train").thing_dataset_id_to_contiguous_id == {1: 0}
    assert len(DatasetCatalog.get("dessam_synthetic_test")) == 1


def _labelme_pair(folder, stem, shapes, h=32, w=48):
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / f"{stem}.jpg"), np.full((h, w, 3), 180, np.uint8))
    shapes = [{"shape_type": "polygon", "points": p} for p in shapes]
    data = {"shapes": shapes, "imageHeight": h, "imageWidth": w}
    (folder / f"{stem}.json").write_text(json.dumps(data))


def test_converter_outputs_load_through_the_builtin_names(tmp_root, tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    square = [[2, 2], [10, 2], [10, 8], [2, 8]]
    _labelme_pair(src / "PatchSeg/train-images", "p", [square])
    (src / "PatchSeg/train-labels").mkdir()
    (src / "PatchSeg/train-images/p.json").rename(src / "PatchSeg/train-labels/p.json")
    _labelme_pair(src / "ClusterSeg/test-normal", "n", [square, square])
    _labelme_pair(src / "DomainSeg/TargetB", "t", [])
    convert_cnseg(str(src), str(tmp_root / "cnseg"), progress=False)
    mat = tmp_path_factory.mktemp("mat")
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = np.full((16, 16), 77, np.uint8)
    scipy.io.savemat(mat / "isbi_train.mat", {"ISBI_Train": cell})
    mask = np.zeros((16, 16), bool)
    mask[3:6, 4:9] = True
    cell = np.empty((1, 1), dtype=object)
    cell[0, 0] = mask
    scipy.io.savemat(mat / "isbi_train_GT.mat", {"train_Nuclei": cell})
    convert_isbi2014(str(mat), str(tmp_root / "isbi2014"), progress=False)

    expected = {
        "cnseg_patchseg_train": (1, [[2, 2, 8, 6]]),
        "cnseg_clusterseg_normal_test": (1, [[2, 2, 8, 6]] * 2),
        "cnseg_clusterseg_test": (1, [[2, 2, 8, 6]] * 2),
        "cnseg_domainseg_targetb_test": (1, []),
        "isbi2014_train": (1, [[4, 3, 5, 3]]),
    }
    for name, (n_images, boxes) in expected.items():
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == n_images, name
        assert all(os.path.isfile(d["file_name"]) for d in dicts), name
        assert [a["bbox"] for d in dicts for a in d["annotations"]] == boxes, name
    with pytest.raises(DatasetNotFoundError, match="test-sample.json not found"):
        DatasetCatalog.get("cnseg_clusterseg_sample_test")  # not in the input: not written


def test_own_coco_file_empty_and_broken(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(
        json.dumps({"images": [], "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]})
    )
    register_nuclei_coco("my_empty_nuclei", str(empty), str(tmp_path))
    with pytest.raises(EmptyDatasetError, match=f"'my_empty_nuclei': {empty} lists no images"):
        DatasetCatalog.get("my_empty_nuclei")
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    register_nuclei_coco("my_empty_nuclei", str(broken), str(tmp_path))  # replaces, no error
    with pytest.raises(DatasetFormatError, match="broken.json is not a valid COCO instances file"):
        DatasetCatalog.get("my_empty_nuclei")
    assert MetadataCatalog.get("my_empty_nuclei").json_file == str(broken)
    DatasetCatalog.remove("my_empty_nuclei")
    MetadataCatalog.remove("my_empty_nuclei")


def test_reimport_is_idempotent():
    before = {name: MetadataCatalog.get(name).json_file for name in DATA_MD_NAMES}
    # run the module's code again (as a second import would), leaving sys.modules alone so
    # other tests keep the same exception classes
    spec = importlib.util.find_spec(datasets_module.__name__)
    for _ in range(2):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    register_all_nuclei_datasets()
    assert {name: MetadataCatalog.get(name).json_file for name in DATA_MD_NAMES} == before
