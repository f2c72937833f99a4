"""Every config file loads on top of add_dessam_config; unchanged keys keep the paper defaults."""

import glob
import os
import subprocess
import sys

import pytest
from conftest import DEMO
from detectron2.config import get_cfg

from dessam_d2 import add_dessam_config
from dessam_d2.config import CHOICES, apply_epoch_schedule, check_dataset_names, load_config
from dessam_d2.errors import ConfigError


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
    assert (d.PAIRWISE_LOSS, d.TOKEN_INIT_STD, d.MASK_LOGIT_THRESHOLD) == ("boxsnake", 1.0, 0.5)
    assert cfg.MODEL.SAM.FREEZE_ENCODER and cfg.MODEL.SAM.FREEZE_DECODER
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.55 and cfg.TEST.DETECTIONS_PER_IMAGE == 120
    # The defaults keep the paper's averaged L_distill and predicted-box prompts (the demo's).
    assert (d.DISTILL_REDUCTION, d.DISTILL_BCE_WEIGHT, d.DISTILL_DICE_WEIGHT) == ("mean", 1.0, 1.0)
    assert d.STUDENT_PROMPTS == "predicted" and d.INFERENCE_DTYPE == "auto"


@pytest.mark.parametrize("path", ["configs/dessam_clusterseg.yaml", "configs/dessam_patchseg.yaml"])
def test_paper_configs_train_and_infer_as_the_release(path):
    """L_distill summed with BCE x 0.5 and Dice x 0.01, the student prompted with the proposals,
    the box head without normalisation and with softmax CE, float32 inference throughout."""
    cfg = load_config(path)
    d = cfg.MODEL.DESSAM
    assert (d.DISTILL_REDUCTION, d.DISTILL_BCE_WEIGHT, d.DISTILL_DICE_WEIGHT) == ("sum", 0.5, 0.01)
    assert d.STUDENT_PROMPTS == "proposals"
    assert (d.INFERENCE_DTYPE, d.DECODER_INFERENCE_DTYPE) == ("float32", "float32")
    assert cfg.MODEL.ROI_BOX_HEAD.NORM == "" and not cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE
    # <= 128 positive proposals per image, as the release's sampler (512 x 0.25).
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION == 128


def test_paper_configs_are_the_paper_model():
    cfg = load_config("configs/dessam_clusterseg.yaml")
    assert cfg.MODEL.SAM.VARIANT == "vit_b" and cfg.MODEL.SAM.IMAGE_SIZE == 1024
    assert cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.2
    assert cfg.SOLVER.BASE_LR == 0.002 and cfg.SOLVER.OPTIMIZER == "SGD"
    assert cfg.MODEL.SAM.FREEZE_DECODER
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


def test_a_small_set_keeps_the_schedules_shape_up_to_min_iter():
    cfg = load_config("configs/dessam_clusterseg.yaml", ["SOLVER.MIN_ITER", 1000])
    apply_epoch_schedule(cfg, num_images=8)  # 8 iterations an epoch: 50 epochs are 400
    assert cfg.SOLVER.MAX_ITER == 150 * 8  # x3: the smallest whole factor reaching 1000
    assert cfg.SOLVER.STEPS == (90 * 8, 108 * 8)
    assert cfg.SOLVER.CHECKPOINT_PERIOD == 15 * 8
    big = load_config("configs/dessam_clusterseg.yaml", ["SOLVER.MIN_ITER", 1000])
    apply_epoch_schedule(big, num_images=101)  # already above: unchanged
    assert big.SOLVER.MAX_ITER == 50 * 101


def test_unknown_key_and_missing_file_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.NO_SUCH_KEY"):
        load_config("configs/dessam_demo.yaml", ["MODEL.NO_SUCH_KEY", "1"])
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config(str(tmp_path / "nope.yaml"))


def _flat(node, prefix=""):
    out = {}
    for k, v in node.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# What the demo may change: sizes (the tiny SAM and the narrower heads) and the schedule.
DEMO_SIZE_AND_SCHEDULE = (
    "MODEL.SAM.",
    "MODEL.FPN.OUT_CHANNELS",
    "MODEL.ANCHOR_GENERATOR.SIZES",
    "MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES",  # anchors and threshold fitted to the boxes: the
    "TEST.SCORE_THRESH_AUTO",  # toy detector's are not ViT-B's (fitting reads boxes only)
    "MODEL.RPN.IN_FEATURES",
    "MODEL.RPN.POST_NMS_TOPK_",
    "MODEL.RPN.PRE_NMS_TOPK_",
    "MODEL.ROI_HEADS.IN_FEATURES",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
    "MODEL.ROI_HEADS.POSITIVE_FRACTION",  # 32 positive RoIs an image (the paper's: 128)
    "MODEL.ROI_BOX_HEAD.CONV_DIM",
    "MODEL.ROI_BOX_HEAD.FC_DIM",
    "MODEL.DESSAM.MAX_TRAIN_MASKS_PER_IMAGE",
    "MODEL.DESSAM.INFERENCE_DTYPE",  # float32: the demo's numbers are the same on every CPU
    "DATASETS.",
    "DATALOADER.NUM_WORKERS",
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.BASE_LR",
    "SOLVER.EPOCHS",
    "SOLVER.STEP_EPOCHS",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.CHECKPOINT_EPOCHS",
    "SOLVER.MIN_ITER",
    "SEED",
    "OUTPUT_DIR",
)


def test_demo_config_is_the_paper_model_at_toy_scale():
    """Every key outside sizes and schedule is Base-DESSAM's (the paper's model), and the
    tiny SAM is frozen, pretrained and loaded from an official-format checkpoint."""
    base = _flat(load_config("configs/Base-DESSAM.yaml"))
    demo = _flat(load_config("configs/dessam_demo.yaml"))
    differ = {k for k in base if base[k] != demo[k]}
    assert {k for k in differ if not k.startswith(DEMO_SIZE_AND_SCHEDULE)} == set()
    cfg = load_config("configs/dessam_demo.yaml")
    assert cfg.MODEL.SAM.FREEZE_ENCODER and cfg.MODEL.SAM.FREEZE_DECODER
    assert cfg.MODEL.SAM.CHECKPOINT == "weights/tiny_sam_shapes.pth"
    assert cfg.SOLVER.OPTIMIZER == "SGD" and cfg.MODEL.DESSAM.PAIRWISE_LOSS == "boxsnake"


def test_the_project_points_nowhere_outside_itself():
    """Users clone this repository alone: no file may send them to a sibling folder."""
    import subprocess

    files = subprocess.run(
        ["git", "ls-files"], capture_output=True, text=True, check=True
    ).stdout.split()
    outside = "../" + "shared"
    hits = [
        f
        for f in files
        if os.path.isfile(f)
        and not f.endswith(".pth")
        and outside in open(f, errors="ignore").read()
    ]
    assert hits == []


def test_unregistered_or_empty_data_set_names_are_config_errors():
    cfg = load_config(DEMO, ["DATASETS.TRAIN", "('no_such_set',)"])
    with pytest.raises(ConfigError, match="DATASETS.TRAIN: 'no_such_set' is not a registered"):
        check_dataset_names(cfg)
    cfg = load_config(DEMO, ["DATASETS.TRAIN", "()"])
    with pytest.raises(ConfigError, match="DATASETS.TRAIN is empty"):
        check_dataset_names(cfg)
    check_dataset_names(cfg, eval_only=True)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_a_typo_in_a_word_valued_key_is_one_line_naming_the_key(key):
    with pytest.raises(ConfigError) as info:
        load_config(DEMO, [key, "typo_x"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{key}=typo_x: use one of ")
    assert all(word in message for word in CHOICES[key])


def test_the_optimizer_is_any_case_as_the_trainer_reads_it():
    assert load_config(DEMO, ["SOLVER.OPTIMIZER", "adamw"]).SOLVER.OPTIMIZER == "adamw"


def test_the_words_are_those_the_modules_accept():
    """CHOICES is a second list: pin it to the modules' own (a word added to one only fails)."""
    from dessam_d2.data.transforms import IMAGE_FORMATS, RANDOM_FLIPS
    from dessam_d2.modeling.embedding_cache import _DTYPES
    from dessam_d2.modeling.losses import DISTILL_REDUCTIONS
    from dessam_d2.modeling.precision import INFERENCE_DTYPES, TRAIN_DTYPES
    from dessam_d2.modeling.prompt_mask_head import DECODER_DTYPES
    from dessam_d2.modeling.roi_heads import STUDENT_PROMPTS
    from dessam_d2.modeling.sam_backbone import SAM_VARIANTS

    assert set(CHOICES["MODEL.SAM.VARIANT"]) == set(SAM_VARIANTS) | {"custom"}
    assert set(CHOICES["MODEL.DESSAM.INFERENCE_DTYPE"]) == set(INFERENCE_DTYPES) | {"auto"}
    assert set(CHOICES["MODEL.DESSAM.TRAIN_DTYPE"]) == set(TRAIN_DTYPES) | {"auto"}
    assert set(CHOICES["MODEL.DESSAM.DECODER_INFERENCE_DTYPE"]) == set(DECODER_DTYPES)
    assert set(CHOICES["MODEL.DESSAM.EMBEDDING_CACHE_DTYPE"]) == set(_DTYPES)
    assert set(CHOICES["MODEL.DESSAM.DISTILL_REDUCTION"]) == set(DISTILL_REDUCTIONS)
    assert set(CHOICES["MODEL.DESSAM.STUDENT_PROMPTS"]) == set(STUDENT_PROMPTS)
    assert set(CHOICES["INPUT.RANDOM_FLIP"]) == set(RANDOM_FLIPS)
    assert set(CHOICES["INPUT.FORMAT"]) == set(IMAGE_FORMATS)


def test_the_modules_own_checks_raise_config_errors_too(cfg):
    from dessam_d2.modeling.precision import resolve_inference_dtype
    from dessam_d2.modeling.sam_backbone import sam_encoder_shape

    with pytest.raises(ConfigError, match="MODEL.DESSAM.INFERENCE_DTYPE='fp16'"):
        resolve_inference_dtype("fp16", "cpu")
    cfg.MODEL.SAM.VARIANT = "vit_x"
    with pytest.raises(ConfigError, match="MODEL.SAM.VARIANT='vit_x' is unknown"):
        sam_encoder_shape(cfg)


def test_a_tool_prints_a_config_typo_as_one_line():
    proc = subprocess.run(
        [sys.executable, "tools/train_net.py", "--config-file", DEMO, "--eval-only"]
        + ["MODEL.SAM.VARIANT", "vit_x"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: MODEL.SAM.VARIANT=vit_x: use one of vit_b, vit_l, vit_h, custom"
    ]


def test_a_run_on_a_users_boxes_fits_anchors_and_threshold_unless_told_otherwise():
    from dessam_d2.config import user_dataset_options

    fit = ["MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES", "True", "TEST.SCORE_THRESH_AUTO", "True"]
    assert user_dataset_options([]) == fit
    mine = ["SOLVER.EPOCHS", "3"]
    assert user_dataset_options(mine) == fit + mine  # the user's overrides come last and win
    sizes = ["MODEL.ANCHOR_GENERATOR.SIZES", "[[16]]", "TEST.SCORE_THRESH_AUTO", "False"]
    assert user_dataset_options(sizes) == sizes  # anchors and threshold as the user set them
