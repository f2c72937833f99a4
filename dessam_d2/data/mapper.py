"""Dataset dict → model input: SAM's longest-side resize, optional flips, boxes only.

Images are resized and flipped by ``transforms.sam_model_input``, the one place where images are
resized for SAM. The model pads to ``image_size`` x ``image_size`` and normalises; the mapper never
pads. Masks never reach the model in training: the mapper does not even decode them, and the
"annotations" key is removed in both modes (evaluators read the ground truth from the registered
data set).
"""

import copy
import logging
from typing import Dict, List

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Boxes, BoxMode, Instances

from ..errors import ConfigError
from .image_io import read_image_rgb
from .transforms import IMAGE_FORMATS, RANDOM_FLIPS, sam_model_input, training_augmentations

__all__ = ["DESSAMDatasetMapper"]

logger = logging.getLogger(__name__)


class DESSAMDatasetMapper:
    """Map a Detectron2 dataset dict to what ``DESSAM`` consumes.

    Returns "file_name", "image_id", "height", "width" (original size), "image" (uint8, 3 x h x w,
    longest side = ``image_size``), "sam_transform" (e.g. "longest1024+hflip", the key of the
    model's embedding cache) and, in training only, "instances" with ``gt_boxes`` (XYXY, resized
    frame) and ``gt_classes`` (zeros).
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        image_size: int = 1024,
        image_format: str = "RGB",
        random_flip: str = "none",
        stain_augment: bool = False,
        stain_sigma: float = 0.05,
        stain_bias: float = 0.05,
    ):
        if image_format not in IMAGE_FORMATS:
            raise ConfigError(f"image_format must be one of {IMAGE_FORMATS}, got '{image_format}'")
        if random_flip not in RANDOM_FLIPS:
            raise ConfigError(
                f"random_flip must be one of {sorted(RANDOM_FLIPS)}, got '{random_flip}'"
            )
        if image_format != "RGB":
            logger.warning("image_format is %s: SAM was trained on RGB images", image_format)
        self.is_train = is_train
        self.image_size = int(image_size)
        self.image_format = image_format
        self.random_flip = random_flip
        # flips and stain jitter are augmentation: training only
        augmentations = training_augmentations(random_flip, stain_augment, stain_sigma, stain_bias)
        self.augmentations = T.AugmentationList(augmentations if is_train else [])

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict:
        stain_augment = bool(cfg.INPUT.get("STAIN_AUGMENT", False))
        if is_train and stain_augment:
            _check_no_embedding_cache(cfg)
        return {
            "is_train": is_train,
            "image_size": cfg.MODEL.SAM.IMAGE_SIZE,
            "image_format": cfg.INPUT.FORMAT,
            "random_flip": cfg.INPUT.RANDOM_FLIP,
            "stain_augment": stain_augment,
            "stain_sigma": cfg.INPUT.get("STAIN_AUGMENT_SIGMA", 0.05),
            "stain_bias": cfg.INPUT.get("STAIN_AUGMENT_BIAS", 0.05),
        }

    def _boxes(self, annotations: List[Dict]) -> np.ndarray:
        """N x 4 XYXY_ABS boxes of the non-crowd annotations (segmentation is never touched).

        A box of zero or negative size becomes NaN, to be dropped (and counted) with the boxes
        that clipping leaves smaller than 1 px: ``Transform.apply_box`` takes the extent of the
        corners, which would turn a negative-size box into a valid, flipped one.
        """
        boxes = [
            BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in annotations
            if a.get("iscrowd", 0) == 0
        ]
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        with np.errstate(invalid="ignore"):
            positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes[~positive] = np.nan
        return boxes

    def __call__(self, dataset_dict: Dict) -> Dict:
        # copy everything except the annotations: masks must not even be copied in training
        out = {k: copy.deepcopy(v) for k, v in dataset_dict.items() if k != "annotations"}
        image = read_image_rgb(out["file_name"])
        utils.check_image_size(out, image)
        boxes = self._boxes(dataset_dict.get("annotations", [])) if self.is_train else None
        model_input, boxes = sam_model_input(
            image, self.image_size, self.image_format, self.augmentations, boxes
        )
        out.update(model_input)
        if self.is_train:
            size = tuple(model_input["image"].shape[-2:])
            out["instances"] = self._instances(boxes, size, out["file_name"])
        return out

    @staticmethod
    def _instances(boxes: np.ndarray, image_size, file_name: str) -> Instances:
        h, w = image_size
        boxes = boxes.copy()
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        with np.errstate(invalid="ignore"):  # NaN: not finite, or of zero or negative size
            valid = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        if not valid.all():
            logger.warning(
                "%s: dropped %d box(es) of zero or negative size, not finite, or smaller than "
                "1 px after clipping to the image",
                file_name,
                int((~valid).sum()),
            )
        instances = Instances((h, w))
        instances.gt_boxes = Boxes(torch.as_tensor(boxes[valid], dtype=torch.float32))
        instances.gt_classes = torch.zeros(int(valid.sum()), dtype=torch.int64)
        return instances


def _check_no_embedding_cache(cfg) -> None:
    """Training with INPUT.STAIN_AUGMENT: the embedding cache must be off.

    The jitter draws new colours for every image at every step, so each training embedding
    would be stored once and never read again, filling MODEL.DESSAM.EMBEDDING_CACHE_DIR and
    evicting the entries that evaluation does reuse. With the encoder trained
    (MODEL.SAM.FREEZE_ENCODER False) the model ignores the cache anyway.
    """
    dessam, sam = cfg.MODEL.get("DESSAM", {}), cfg.MODEL.get("SAM", {})
    cache_dir = dessam.get("EMBEDDING_CACHE_DIR", "")
    if cache_dir and sam.get("FREEZE_ENCODER", True):
        raise ConfigError(
            f"INPUT.STAIN_AUGMENT True with MODEL.DESSAM.EMBEDDING_CACHE_DIR '{cache_dir}': the "
            "jitter changes every training image at every step, so no embedding could be read "
            'back; append MODEL.DESSAM.EMBEDDING_CACHE_DIR "" to train with stain augmentation'
        )
