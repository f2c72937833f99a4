"""The authors' evaluation protocol: a box score threshold per test set, the TargetB subset."""

import csv
import json
import logging
import os

import pytest
import torch
from conftest import tiny_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from dessam_d2.config import check_dataset_names, load_config
from dessam_d2.data.datasets import (
    SUBSET_DATASETS,
    register_all_nuclei_datasets,
    register_nuclei_coco,
)
from dessam_d2.data.synthetic.cytology import generate_synthetic_dataset
from dessam_d2.engine import Trainer
from dessam_d2.errors import ConfigError, DatasetFormatError, DatasetNotFoundError


@pytest.fixture(scope="module")
def two_test_sets(tmp_path_factory):
    """Two registered copies of the same 2 synthetic images: any difference between their
    evaluations comes from the threshold alone."""
    root = tmp_path_factory.mktemp("protocol")
    json_file = generate_synthetic_dataset(str(root / "synth"), 2, image_size=(128, 128), seed=4)
    names = ("protocol_low", "protocol_high")
    for name in names:
        register_nuclei_coco(name, json_file, str(root / "synth" / "images"))
    yield names
    for name in names:
        DatasetCatalog.remove(name)


def _num_pred(output_dir, name):
    path = output_dir / "inference" / name / f"nuclei_metrics_{name}.csv"
    with open(path) as f:
        return [int(row["num_pred"]) for row in csv.DictReader(f)]


def _model(cfg):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.eval()
    return model


def test_each_test_set_is_scored_with_its_own_threshold(two_test_sets, tmp_path, caplog):
    low, high = two_test_sets
    cfg = tiny_cfg(**{"DATALOADER.NUM_WORKERS": 0, "OUTPUT_DIR": str(tmp_path)})
    cfg.DATASETS.TEST = (low, high)
    cfg.DATASETS.TEST_SCORE_THRESH = (0.0, 0.99)
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.5
    model = _model(cfg)
    # A randomly initialised box classifier scores every box near sigmoid(0) = 0.5.
    with caplog.at_level(logging.INFO, logger="dessam_d2.engine"):
        results = Trainer.test(cfg, model)
    assert list(results) == [low, high]
    assert all(n > 0 for n in _num_pred(tmp_path, low))  # everything passes 0.0
    assert _num_pred(tmp_path, high) == [0, 0]  # nothing passes 0.99
    assert f"Evaluating {low} with box score threshold 0" in caplog.text
    assert f"Evaluating {high} with box score threshold 0.99" in caplog.text
    assert model.score_threshold == 0.5  # restored

    # Swapped thresholds swap the outcome; without the key both use SCORE_THRESH_TEST.
    cfg.DATASETS.TEST_SCORE_THRESH = (0.99, 0.0)
    Trainer.test(cfg, model)
    assert _num_pred(tmp_path, low) == [0, 0] and all(n > 0 for n in _num_pred(tmp_path, high))
    cfg.DATASETS.TEST_SCORE_THRESH = ()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.99
    model = _model(cfg)
    Trainer.test(cfg, model)
    assert _num_pred(tmp_path, low) == _num_pred(tmp_path, high) == [0, 0]


def test_threshold_count_must_match_the_test_sets(two_test_sets):
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = (two_test_sets[0],)
    cfg.DATASETS.TEST = two_test_sets
    cfg.DATASETS.TEST_SCORE_THRESH = (0.5,)
    with pytest.raises(ConfigError, match="TEST_SCORE_THRESH has 1 values for 2 DATASETS.TEST"):
        check_dataset_names(cfg)
    with pytest.raises(ConfigError, match="TEST_SCORE_THRESH has 1 values"):
        Trainer.test(cfg, _model(cfg))
    cfg.DATASETS.TEST_SCORE_THRESH = (0.5, 1.5)
    with pytest.raises(ConfigError, match=r"scores lie in \[0, 1\]"):
        check_dataset_names(cfg)


def test_clusterseg_config_uses_the_release_thresholds():
    cfg = load_config("configs/dessam_clusterseg.yaml")
    assert len(cfg.DATASETS.TEST_SCORE_THRESH) == len(cfg.DATASETS.TEST)
    assert dict(zip(cfg.DATASETS.TEST, cfg.DATASETS.TEST_SCORE_THRESH)) == {
        "cnseg_clusterseg_test": 0.55,
        "cnseg_domainseg_targeta_test": 0.05,
        "cnseg_domainseg_targetb_test": 0.05,
        "isbi2014_test": 0.05,
    }
    assert load_config("configs/dessam_patchseg.yaml").DATASETS.TEST_SCORE_THRESH == ()


def _write_coco(path, names):
    images = [
        {"id": i + 1, "file_name": f"targetb/{n}", "height": 8, "width": 8}
        for i, n in enumerate(names)
    ]
    annotations = [
        {
            "id": i + 1,
            "image_id": i + 1,
            "category_id": 1,
            "bbox": [1, 1, 3, 3],
            "area": 9,
            "iscrowd": 0,
            "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]],
        }
        for i in range(len(names))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "nucleus"}],
            }
        )
    )


def test_targetb_subset_follows_its_image_list(tmp_path):
    name = "cnseg_domainseg_targetb60_test"
    assert SUBSET_DATASETS[name][0] == "cnseg_domainseg_targetb_test"
    parent_json = tmp_path / "cnseg/domainseg/annotations/targetb.json"
    _write_coco(parent_json, ["a.jpg", "b.jpg", "c.jpg", "d.png"])
    try:
        register_all_nuclei_datasets(str(tmp_path), overwrite=True)
        with pytest.raises(DatasetNotFoundError, match="targetb60.txt not found"):
            DatasetCatalog.get(name)
        listed = tmp_path / "cnseg/domainseg/targetb60.txt"
        listed.write_text("# the release's 60 images\nc.jpg\n\nd\ntargetb/a.jpg\nc.jpg\n")
        dicts = DatasetCatalog.get(name)
        assert [os.path.basename(d["file_name"]) for d in dicts] == ["a.jpg", "c.jpg", "d.png"]
        assert [len(d["annotations"]) for d in dicts] == [1, 1, 1]
        subset_json = MetadataCatalog.get(name).json_file  # what COCO AP is computed against
        assert [im["file_name"] for im in json.load(open(subset_json))["images"]] == [
            "targetb/a.jpg",
            "targetb/c.jpg",
            "targetb/d.png",
        ]
        listed.write_text("a.jpg\nnope.jpg\n")
        with pytest.raises(DatasetFormatError, match="1 of the 2 names .* are not images.*nope"):
            DatasetCatalog.get(name)
    finally:
        register_all_nuclei_datasets(overwrite=True)  # back to the default root


@pytest.mark.parametrize("optimizer", ["SGD", "ADAMW"])
def test_trainable_sam_parts_get_their_own_learning_rate(optimizer):
    """SOLVER.SAM_LR_FACTOR scales the learning rate of SAM's encoder, prompt encoder and mask
    decoder when they train (the whole-network row), and of nothing else."""
    cfg = tiny_cfg(**{"MODEL.SAM.FREEZE_ENCODER": False, "MODEL.SAM.FREEZE_DECODER": False})
    cfg.merge_from_list(["SOLVER.OPTIMIZER", optimizer, "SOLVER.SAM_LR_FACTOR", 0.01])
    model = _model(cfg)
    optim = Trainer.build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in optim.param_groups for p in g["params"]}
    sam = {
        id(p) for part in model.sam_parts().values() for p in part.parameters() if p.requires_grad
    }
    base, bias = cfg.SOLVER.BASE_LR, cfg.SOLVER.BASE_LR * cfg.SOLVER.BIAS_LR_FACTOR
    assert sam and sam <= set(lr_of)
    assert {lr_of[i] for i in sam} <= {0.01 * base, 0.01 * bias}
    others = {lr for i, lr in lr_of.items() if i not in sam}
    assert others and others <= {base, bias}
