"""Config keys of DES-SAM (``add_dessam_config``), loading a config with one-line errors
(``load_config``), and what is derived from a config before training (the epoch schedule, the
data-set checks, the per-test-set score thresholds).

Defaults are the paper's (MICCAI 2024) or, where it is silent, the authors' released values
(docs/METHOD.md lists each choice and its source). Inference tools need only this module, not
the training stack (``dessam_d2.engine``).
"""

import math
import os
from typing import List, Sequence

from detectron2.config import CfgNode
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from .errors import ConfigError

__all__ = [
    "add_dessam_config",
    "load_config",
    "CHOICES",
    "check_choices",
    "num_training_images",
    "apply_epoch_schedule",
    "check_dataset_names",
    "score_thresholds_per_test_set",
    "score_threshold_of",
    "user_dataset_options",
    "precision_opts",
]


def add_dessam_config(cfg: CN) -> None:
    """Add every DES-SAM key to a Detectron2 config, with the paper's default.

    Keys only: the DESSAM meta-architecture and its parts are registered with Detectron2 by
    importing ``dessam_d2.modeling`` (the engine, inference and recipes do; so does the package's
    ``dessam_d2.add_dessam_config``, for scripts that call Detectron2's ``build_model``)."""
    _C = cfg

    _C.MODEL.SAM = CN()
    # SAM variant: "vit_b", "vit_l", "vit_h" (official shapes) or "custom" (the ENCODER_* keys).
    _C.MODEL.SAM.VARIANT = "vit_b"
    # Official SAM checkpoint (e.g. sam_vit_b_01ec64.pth); "" = random init (tests, demo).
    _C.MODEL.SAM.CHECKPOINT = ""
    # SAM input side: images are resized (longest side) and padded to this square.
    _C.MODEL.SAM.IMAGE_SIZE = 1024
    # ViT patch size (16 in every official SAM); the embedding is IMAGE_SIZE / PATCH_SIZE square.
    _C.MODEL.SAM.PATCH_SIZE = 16
    # Encoder shape used when VARIANT is "custom" (ignored for the official variants).
    _C.MODEL.SAM.ENCODER_EMBED_DIM = 768
    _C.MODEL.SAM.ENCODER_DEPTH = 12
    _C.MODEL.SAM.ENCODER_NUM_HEADS = 12
    _C.MODEL.SAM.ENCODER_GLOBAL_ATTN_INDEXES = [2, 5, 8, 11]
    _C.MODEL.SAM.ENCODER_WINDOW_SIZE = 14
    # SimpleFeaturePyramid's levels: scale factors of the embedding (ViTDet's and the paper's
    # 4, 2, 1, 0.5: strides 4-32 px for patch 16); a level the RPN and RoI heads do not read
    # costs time all the same, so a smaller model lists only the levels it uses.
    _C.MODEL.SAM.PYRAMID_SCALE_FACTORS = [4.0, 2.0, 1.0, 0.5]
    # Channels of the SAM embedding / prompt tokens (256 in every official SAM).
    _C.MODEL.SAM.PROMPT_EMBED_DIM = 256
    # Hidden width of the mask decoder's two-way transformer MLP (2048 in official SAM).
    _C.MODEL.SAM.DECODER_MLP_DIM = 2048
    # Freeze the image encoder (paper: frozen, eval mode, run without autograd).
    _C.MODEL.SAM.FREEZE_ENCODER = True
    # Freeze the prompt encoder and mask decoder (paper: frozen; only prompt tokens learn).
    _C.MODEL.SAM.FREEZE_DECODER = True

    _C.MODEL.DESSAM = CN()
    # Number of learnable prompt tokens appended to SAM's output tokens (T~ in Eq. 3).
    _C.MODEL.DESSAM.NUM_LEARNABLE_TOKENS = 1
    # T~ starts from N(0, std^2) (authors' release: N(0, 1)).
    _C.MODEL.DESSAM.TOKEN_INIT_STD = 1.0
    # Boxes sent through SAM's mask decoder at once (bounds memory; outputs do not depend on it).
    _C.MODEL.DESSAM.DECODER_CHUNK_SIZE = 40
    # Cap on student masks per image in training (positive RoIs are subsampled); 0 = all.
    _C.MODEL.DESSAM.MAX_TRAIN_MASKS_PER_IMAGE = 0
    # BoxInst's box-projection term (Dice of the mask's x / y max-projections against the
    # box's): 0 in DES-SAM (the teacher keeps the masks in their boxes); what a box-supervised
    # model that trains the whole network needs without a teacher (the demo's whole-network row).
    _C.MODEL.DESSAM.LOSS_PROJECTION_WEIGHT = 0.0
    # lambda_dect, lambda_distill, lambda_pairwise of Eq. 5.
    _C.MODEL.DESSAM.LOSS_DECT_WEIGHT = 1.0
    _C.MODEL.DESSAM.LOSS_DISTILL_WEIGHT = 1.0
    _C.MODEL.DESSAM.LOSS_PAIRWISE_WEIGHT = 1.0
    # Weights of the BCE and Dice terms inside L_distill (Eq. 2: 1 and 1; the release: 0.5, 0.01).
    _C.MODEL.DESSAM.DISTILL_BCE_WEIGHT = 1.0
    _C.MODEL.DESSAM.DISTILL_DICE_WEIGHT = 1.0
    # L_distill over the positive RoIs: "mean" (each term averaged, free of the nuclei count) or
    # "sum" (the release: each RoI's pixel-mean BCE and its Dice loss summed over the RoIs).
    _C.MODEL.DESSAM.DISTILL_REDUCTION = "mean"
    # The student's box prompts in training: "predicted" (the box head's refined box of each
    # positive RoI, the paper's "predicted box") or "proposals" (the release: the positive
    # proposals themselves, RPN boxes + the added ground truth). Inference: final detections.
    _C.MODEL.DESSAM.STUDENT_PROMPTS = "predicted"
    # alpha (local pairwise) and beta (global level-set) of Eq. 4.
    _C.MODEL.DESSAM.LOCAL_PAIRWISE_WEIGHT = 1.0
    _C.MODEL.DESSAM.GLOBAL_PAIRWISE_WEIGHT = 0.001
    # L_lp's form: "boxsnake" (the paper's: sum w_ij |p_i - p_j| / sum w_ij, w = LAB colour
    # similarity) or "boxinst" (BoxInst's -log P(same label) over edges with w >= COLOR_THRESH).
    _C.MODEL.DESSAM.PAIRWISE_LOSS = "boxsnake"
    # Local pairwise neighbourhood: kernel size and dilation; the threshold is BoxInst's only.
    _C.MODEL.DESSAM.PAIRWISE_SIZE = 3
    _C.MODEL.DESSAM.PAIRWISE_DILATION = 2
    _C.MODEL.DESSAM.PAIRWISE_COLOR_THRESH = 0.3
    # Side of the RoIAligned ground-truth box crop on which L_edge is computed (release: 72).
    _C.MODEL.DESSAM.EDGE_CROP_SIZE = 72
    # A pixel is nucleus where the student's mask *logit* exceeds this (release: 0.5, i.e. a
    # probability above 0.622; the paper is silent).
    _C.MODEL.DESSAM.MASK_LOGIT_THRESHOLD = 0.5
    # On-disk cache of the frozen encoder's embeddings; "" = off (the paper encodes every time).
    _C.MODEL.DESSAM.EMBEDDING_CACHE_DIR = ""
    # Cached embeddings' storage dtype: "float16" (half the disk; docs/PERFORMANCE.md) or "float32".
    _C.MODEL.DESSAM.EMBEDDING_CACHE_DTYPE = "float16"
    # Size cap of the cache directory in GB; least recently used entries are evicted above it.
    _C.MODEL.DESSAM.EMBEDDING_CACHE_MAX_GB = 20.0
    # Decode box prompts with the image-side work shared (same outputs as SAM's MaskDecoder).
    _C.MODEL.DESSAM.FAST_DECODER = True
    # The box head's RoIAlign as one sparse matrix product on a CPU (same outputs as Detectron2's
    # ROIAlign up to float rounding; 3-4x faster forward and backward, modeling/roi_align.py).
    _C.MODEL.DESSAM.FAST_ROI_ALIGN = True
    # Inference-only decoder precision: "auto" = INFERENCE_DTYPE's when that is bfloat16, else
    # float32; "float32" (paper); "bfloat16".
    _C.MODEL.DESSAM.DECODER_INFERENCE_DTYPE = "auto"
    # Inference precision of the encoder, pyramid, RPN and box head: "auto" = bfloat16 on a CPU
    # with native bfloat16 (AVX512-BF16, AMX, Arm BF16) or on CUDA, float32 elsewhere (emulated
    # bfloat16 is ~10x slower); "float32"; "bfloat16"; "int8" (opt-in, CPU only: the encoder's
    # linear layers dynamically quantised, the rest float32; for CPUs without native bfloat16).
    # SAM's mask decoder follows DECODER_INFERENCE_DTYPE. Training follows TRAIN_DTYPE; outputs
    # are float32 either way.
    _C.MODEL.DESSAM.INFERENCE_DTYPE = "auto"
    # Training precision: "float32" (paper); "bfloat16" (mixed precision: the forward pass in
    # bfloat16 autocast, the weights, gradients and mask losses float32; 1.4-1.5x faster steps on a
    # CPU with native bfloat16, docs/PERFORMANCE.md); "auto" = bfloat16 where native.
    _C.MODEL.DESSAM.TRAIN_DTYPE = "float32"

    # Inference thresholds of the authors' release (PatchSeg; ClusterSeg: NMS 0.2), nuclei cap.
    _C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.55
    _C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    _C.TEST.DETECTIONS_PER_IMAGE = 120
    # Augmentation of the training mapper: "none" (paper), "horizontal", "vertical" or "both".
    _C.INPUT.RANDOM_FLIP = "none"
    # HED stain jitter of training images (Tellez et al. 2018; image only, boxes unchanged):
    # off in the paper and the release. STAIN_AUGMENT_SIGMA / _BIAS: each of the H, E, D
    # channels becomes alpha * c + beta * m, alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-bias,
    # bias), m the channel's largest value in the image (data/transforms.py HEDJitter). The image
    # changes every step, so no embedding can be cached: training with it and
    # MODEL.DESSAM.EMBEDDING_CACHE_DIR set (encoder frozen) is a ConfigError (data/mapper.py).
    _C.INPUT.STAIN_AUGMENT = False
    _C.INPUT.STAIN_AUGMENT_SIGMA = 0.05
    _C.INPUT.STAIN_AUGMENT_BIAS = 0.05

    # Anchors fitted to the training boxes at the start of training (sizes: one per pyramid
    # level, quantiles of the boxes' sqrt(area) at the model's input size; aspect ratios:
    # quantiles of h / w), replacing SIZES and ASPECT_RATIOS (same counts). Off in the paper's
    # configs; on for the demo and for tools/train_net.py --dataset unless SIZES is set there.
    _C.MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES = False
    # Fit the test-time box score threshold after training: the one of maximum box F1 at IoU 0.5
    # on the training boxes (never masks), saved in the checkpoint and used wherever the model
    # is loaded in place of MODEL.ROI_HEADS.SCORE_THRESH_TEST (DATASETS.TEST_SCORE_THRESH, when
    # set, still wins). Off in the paper's configs (0.55 / 0.05, the release's).
    _C.TEST.SCORE_THRESH_AUTO = False
    # Training images the threshold is fitted on (a fixed random subset beyond it); 0 = all.
    _C.TEST.SCORE_THRESH_AUTO_MAX_IMAGES = 200

    # "SGD" (the paper, and the demo) or "ADAMW" (any case).
    _C.SOLVER.OPTIMIZER = "SGD"
    # Learning rate of SAM's own parts (encoder, prompt encoder, mask decoder) when they train
    # (MODEL.SAM.FREEZE_ENCODER / FREEZE_DECODER False), as a factor of BASE_LR; DES-SAM keeps
    # them frozen, so the paper configs never use it.
    _C.SOLVER.SAM_LR_FACTOR = 1.0
    # Schedule in epochs as the paper states it (50 epochs, lr x0.1 at 30 and 36), converted to
    # iterations from the training set's size by dessam_d2.engine.setup; 0 = use MAX_ITER/STEPS.
    _C.SOLVER.EPOCHS = 0
    _C.SOLVER.STEP_EPOCHS = [30, 36]
    # With EPOCHS > 0: checkpoint every N epochs, evaluate every N epochs (0 = only at the end).
    _C.SOLVER.CHECKPOINT_EPOCHS = 5
    _C.TEST.EVAL_EPOCHS = 0
    # With EPOCHS > 0: at least this many iterations. On a small set (a lab's few images) the
    # epochs, step epochs, checkpoint and eval epochs are all multiplied by the smallest whole
    # number that reaches it, so the schedule keeps its shape (0 = off; the paper configs).
    _C.SOLVER.MIN_ITER = 0

    # Evaluation protocol (per test set)
    # Box score threshold of each DATASETS.TEST entry, in the same order (the release scores the
    # ClusterSeg model at 0.55 in-domain, 0.05 on TargetA / TargetB / ISBI 2014); () = use
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST for every test set.
    _C.DATASETS.TEST_SCORE_THRESH = ()


# Every key that takes one of a few words, and the words. The modules that read a key keep their
# own check as a defence; tests/test_config.py pins that their lists and these agree.
CHOICES = {
    "MODEL.SAM.VARIANT": ("vit_b", "vit_l", "vit_h", "custom"),
    "MODEL.DESSAM.DISTILL_REDUCTION": ("mean", "sum"),
    "MODEL.DESSAM.STUDENT_PROMPTS": ("predicted", "proposals"),
    "MODEL.DESSAM.PAIRWISE_LOSS": ("boxsnake", "boxinst"),
    "MODEL.DESSAM.EMBEDDING_CACHE_DTYPE": ("float16", "bfloat16", "float32"),
    "MODEL.DESSAM.DECODER_INFERENCE_DTYPE": ("auto", "float32", "bfloat16"),
    "MODEL.DESSAM.INFERENCE_DTYPE": ("auto", "float32", "bfloat16", "int8"),
    "MODEL.DESSAM.TRAIN_DTYPE": ("auto", "float32", "bfloat16"),
    "INPUT.FORMAT": ("RGB", "BGR"),
    "INPUT.RANDOM_FLIP": ("none", "horizontal", "vertical", "both"),
    "SOLVER.OPTIMIZER": ("SGD", "ADAMW"),
}
_ANY_CASE = ("SOLVER.OPTIMIZER",)  # the trainer compares it upper-cased


def check_choices(cfg: CfgNode) -> None:
    """Raise a one-line ConfigError naming the first key of CHOICES whose value is not one of
    its words (``load_config`` calls it; a tool that builds its config otherwise can too)."""
    for key, words in CHOICES.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        value = node.upper() if key in _ANY_CASE and isinstance(node, str) else node
        if value not in words:
            raise ConfigError(f"{key}={node}: use one of {', '.join(words)}")


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """Detectron2 config + DES-SAM keys + the file + overrides, with one-line errors (a key of
    CHOICES set to another word included)."""
    cfg = get_cfg()
    add_dessam_config(cfg)
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist: see configs/ for the models")
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except KeyError as e:
        key = str(e.args[0]) if e.args else str(e)
        raise ConfigError(f"{config_file}: {key}; see dessam_d2/config.py for the keys") from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{config_file}: {e}") from None
    check_choices(cfg)
    return cfg


def num_training_images(cfg: CfgNode) -> int:
    from detectron2.data import DatasetCatalog

    return sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN)


def apply_epoch_schedule(cfg: CfgNode, num_images: int) -> None:
    """SOLVER.EPOCHS (the paper's unit) -> MAX_ITER, STEPS, checkpoint and eval periods; on a
    set too small for SOLVER.MIN_ITER, every epoch figure is multiplied by the same factor."""
    if cfg.SOLVER.EPOCHS <= 0:
        return
    iters_per_epoch = max(1, math.ceil(num_images / cfg.SOLVER.IMS_PER_BATCH))
    k = max(1, math.ceil(cfg.SOLVER.get("MIN_ITER", 0) / (cfg.SOLVER.EPOCHS * iters_per_epoch)))
    cfg.SOLVER.EPOCHS *= k
    cfg.SOLVER.STEP_EPOCHS = [e * k for e in cfg.SOLVER.STEP_EPOCHS]
    cfg.SOLVER.CHECKPOINT_EPOCHS *= k
    cfg.TEST.EVAL_EPOCHS *= k
    cfg.SOLVER.MAX_ITER = cfg.SOLVER.EPOCHS * iters_per_epoch
    cfg.SOLVER.STEPS = tuple(
        e * iters_per_epoch for e in cfg.SOLVER.STEP_EPOCHS if e < cfg.SOLVER.EPOCHS
    )
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, cfg.SOLVER.CHECKPOINT_EPOCHS) * iters_per_epoch
    cfg.TEST.EVAL_PERIOD = cfg.TEST.EVAL_EPOCHS * iters_per_epoch
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER)


def check_dataset_names(cfg: CfgNode, eval_only: bool = False) -> None:
    """Every name of DATASETS.TRAIN/TEST is registered (else Detectron2 raises a KeyError).

    The built-in names are registered by importing ``dessam_d2.data.datasets`` (the engine
    does), a user's COCO files by ``register_nuclei_coco``."""
    from detectron2.data import DatasetCatalog

    if not cfg.DATASETS.TRAIN and not eval_only:
        raise ConfigError("DATASETS.TRAIN is empty: name at least one registered data set")
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in DatasetCatalog:
                raise ConfigError(
                    f"DATASETS.{key}: '{name}' is not a registered data set; see "
                    "dessam_d2/data/datasets.py (BUILTIN_DATASETS) or register your own COCO file"
                )
    score_thresholds_per_test_set(cfg)


def score_thresholds_per_test_set(cfg: CfgNode) -> List[float]:
    """The box score threshold of each DATASETS.TEST entry: DATASETS.TEST_SCORE_THRESH (one per
    test set, same order) or, when it is empty, MODEL.ROI_HEADS.SCORE_THRESH_TEST for all."""
    names = list(cfg.DATASETS.TEST)
    values = list(cfg.DATASETS.get("TEST_SCORE_THRESH", ()))
    if not values:
        return [float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)] * len(names)
    if len(values) != len(names):
        raise ConfigError(
            f"DATASETS.TEST_SCORE_THRESH has {len(values)} values for {len(names)} DATASETS.TEST "
            "entries: give one per test set, in the same order, or () to use "
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST for all"
        )
    if not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"DATASETS.TEST_SCORE_THRESH {tuple(values)}: scores lie in [0, 1]")
    return [float(v) for v in values]


def score_threshold_of(cfg: CfgNode, dataset_name: str) -> float:
    """The box score threshold of one test set: its DATASETS.TEST_SCORE_THRESH entry when it is
    in DATASETS.TEST, else MODEL.ROI_HEADS.SCORE_THRESH_TEST."""
    names = list(cfg.DATASETS.TEST)
    if dataset_name in names:
        return score_thresholds_per_test_set(cfg)[names.index(dataset_name)]
    return float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)


def user_dataset_options(opts: Sequence[str]) -> List[str]:
    """Overrides for a run on a user's own boxes (``train_net --dataset``): anchors fitted to
    the boxes unless MODEL.ANCHOR_GENERATOR.SIZES is given, the score threshold fitted after
    training unless TEST.SCORE_THRESH_AUTO is given; the user's own overrides follow and win."""
    keys = set(opts[::2])
    out = []
    if (
        "MODEL.ANCHOR_GENERATOR.SIZES" not in keys
        and "MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES" not in keys
    ):
        out += ["MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES", "True"]
    if "TEST.SCORE_THRESH_AUTO" not in keys:
        out += ["TEST.SCORE_THRESH_AUTO", "True"]
    return out + list(opts)


def precision_opts(dtype: str) -> List[str]:
    """Config overrides that make inference compute in ``dtype`` (MODEL.DESSAM.INFERENCE_DTYPE,
    the decoder following it): the prediction tools' ``--dtype`` and the plugin's; they go
    before the user's own overrides, which then win."""
    return ["MODEL.DESSAM.INFERENCE_DTYPE", dtype, "MODEL.DESSAM.DECODER_INFERENCE_DTYPE", "auto"]
