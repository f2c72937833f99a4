"""Every config file loads on top of add_dessam_config; unchanged keys keep the paper defaults."""

import glob

import pytest
from detectron2.config import get_cfg

from dessam_d2 import add_dessam_config
from dessam_d2.engine import ConfigError, apply_epoch_schedule, load_config


@pytest.mark.parametrize("path", sorted(glob.glob("configs/*.yaml")))
def test_config_files_load(path):
    cfg = load_config(path)
    assert cfg.MODEL.META_ARCHITECTURE == "DESSAM"
    assert cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION == 7


def test_paper_defaults():
    cfg = get_cfg()
    add_dessam_config(cfg)
    d = cfg.MODEL.DESSAM
    assert (d.LOSS_DECT_WEIGHT, d.LOSS_DISTILL_WEIGHT, d.LOSS_PAIRWISE_WEIGHT) == (1.0, 1.0, 1.0)
    assert (d.LOCAL_PAIRWISE_WEIGHT, d.GLOBAL_PAIRWISE_WEIGHT) == (1.0, 0.001)
    assert (d.PAIRWISE_SIZE, d.PAIRWISE_DILATION, d.PAIRWISE_COLOR_THRESH) == (3, 2, 0.3)
    assert (d.NUM_LEARNABLE_TOKENS, d.DECODER_CHUNK_SIZE, d.EDGE_CROP_SIZE) == (1, 40, 72)
    assert (d.TEACHER, d.DISTILL_REGION, d.BOX_PROJECTION_WEIGHT) == ("sam", "frame", 0.0)
    assert cfg.MODEL.SAM.FREEZE_ENCODER and cfg.MODEL.SAM.FREEZE_DECODER
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.55 and cfg.TEST.DETECTIONS_PER_IMAGE == 120


def test_paper_configs_are_the_paper_model():
    cfg = load_config("configs/dessam_clusterseg.yaml")
    assert cfg.MODEL.SAM.VARIANT == "vit_b" and cfg.MODEL.SAM.IMAGE_SIZE == 1024
    assert cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.2
    assert cfg.SOLVER.BASE_LR == 0.002 and cfg.SOLVER.OPTIMIZER == "SGD"
    assert cfg.MODEL.DESSAM.TEACHER == "sam" and cfg.MODEL.SAM.FREEZE_DECODER
    assert cfg.DATASETS.TEST == (
        "cnseg_clusterseg_test",
        "cnseg_domainseg_targeta_test",
        "cnseg_domainseg_targetb_test",
        "isbi2014_test",
    )


def test_epochs_become_iterations():
    cfg = load_config("configs/dessam_clusterseg.yaml")
    apply_epoch_schedule(cfg, num_images=101)  # 101 images, 1 per batch
    assert cfg.SOLVER.MAX_ITER == 50 * 101
    assert cfg.SOLVER.STEPS == (30 * 101, 36 * 101)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 5 * 101


def test_unknown_key_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.NO_SUCH_KEY"):
        load_config("configs/dessam_demo.yaml", ["MODEL.NO_SUCH_KEY", "1"])
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
