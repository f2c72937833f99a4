"""Config keys of DES-SAM. Defaults are the paper's (MICCAI 2024) or, where it is silent, the
authors' released values (docs/METHOD.md lists each choice and its source)."""

from detectron2.config import CfgNode as CN


def add_dessam_config(cfg: CN) -> None:
    """Add every DES-SAM key to a Detectron2 config, with the paper's default."""
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
    # lambda_dect, lambda_distill, lambda_pairwise of Eq. 5.
    _C.MODEL.DESSAM.LOSS_DECT_WEIGHT = 1.0
    _C.MODEL.DESSAM.LOSS_DISTILL_WEIGHT = 1.0
    _C.MODEL.DESSAM.LOSS_PAIRWISE_WEIGHT = 1.0
    # Weights of the BCE and Dice terms inside L_distill (Eq. 2: 1 and 1).
    _C.MODEL.DESSAM.DISTILL_BCE_WEIGHT = 1.0
    _C.MODEL.DESSAM.DISTILL_DICE_WEIGHT = 1.0
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
    # Storage dtype of cached embeddings: "float16" (half the disk; effect in README) or "float32".
    _C.MODEL.DESSAM.EMBEDDING_CACHE_DTYPE = "float16"
    # Size cap of the cache directory in GB; least recently used entries are evicted above it.
    _C.MODEL.DESSAM.EMBEDDING_CACHE_MAX_GB = 20.0
    # Decode box prompts with the image-side work shared (same outputs as SAM's MaskDecoder).
    _C.MODEL.DESSAM.FAST_DECODER = True
    # Inference-only decoder precision: "float32" (paper) or "bfloat16" (faster on AVX512-BF16).
    _C.MODEL.DESSAM.DECODER_INFERENCE_DTYPE = "float32"
    # Inference precision of the encoder, pyramid, RPN and box head: "auto" = bfloat16 on a CPU
    # with native bfloat16 (AVX512-BF16, AMX, Arm BF16) or on CUDA, float32 elsewhere (emulated
    # bfloat16 is ~10x slower); "float32"; "bfloat16". SAM's mask decoder follows
    # DECODER_INFERENCE_DTYPE (bfloat16 moves its outlines more). Training is float32; outputs
    # are float32 either way.
    _C.MODEL.DESSAM.INFERENCE_DTYPE = "auto"

    # Inference thresholds of SPEC.md (PatchSeg; ClusterSeg uses NMS 0.2) and the nuclei cap.
    _C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.55
    _C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5
    _C.TEST.DETECTIONS_PER_IMAGE = 120
    # Augmentation of the training mapper: "none" (paper), "horizontal", "vertical" or "both".
    _C.INPUT.RANDOM_FLIP = "none"

    # "SGD" (the paper) or "ADAMW" (the demo: a randomly initialised SAM learns in minutes).
    _C.SOLVER.OPTIMIZER = "SGD"
    # Schedule in epochs as the paper states it (50 epochs, lr x0.1 at 30 and 36), converted to
    # iterations from the training set's size by dessam_d2.engine.setup; 0 = use MAX_ITER/STEPS.
    _C.SOLVER.EPOCHS = 0
    _C.SOLVER.STEP_EPOCHS = [30, 36]
    # With EPOCHS > 0: checkpoint every N epochs, evaluate every N epochs (0 = only at the end).
    _C.SOLVER.CHECKPOINT_EPOCHS = 5
    _C.TEST.EVAL_EPOCHS = 0

    # Evaluation protocol (per test set)
    # Box score threshold of each DATASETS.TEST entry, in the same order (the release scores the
    # ClusterSeg model at 0.55 in-domain, 0.05 on TargetA / TargetB / ISBI 2014); () = use
    # MODEL.ROI_HEADS.SCORE_THRESH_TEST for every test set.
    _C.DATASETS.TEST_SCORE_THRESH = ()
