"""Image -> DESSAM's input: SAM's longest-side resize and the training flips, in one place.

The one way an image becomes the model's input, in training and evaluation (the mapper),
prediction and annotation (the predictor) and the fully supervised reference: a second copy would
drift (the embedding cache's key reads "sam_transform"). The model pads to ``image_size`` x
``image_size`` and normalises; nothing here pads.
"""

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from segment_anything.utils.transforms import ResizeLongestSide

__all__ = ["IMAGE_FORMATS", "RANDOM_FLIPS", "flip_augmentations", "sam_model_input"]

IMAGE_FORMATS = ("RGB", "BGR")  # INPUT.FORMAT
RANDOM_FLIPS = ("none", "horizontal", "vertical", "both")  # INPUT.RANDOM_FLIP

_FLIP_NAMES = {T.HFlipTransform: "hflip", T.VFlipTransform: "vflip"}


def flip_augmentations(random_flip: str) -> List[T.Augmentation]:
    """The random flips of INPUT.RANDOM_FLIP (one of ``RANDOM_FLIPS``), each with p = 0.5."""
    horizontal = T.RandomFlip(prob=0.5, horizontal=True, vertical=False)
    vertical = T.RandomFlip(prob=0.5, horizontal=False, vertical=True)
    return {
        "none": [],
        "horizontal": [horizontal],
        "vertical": [vertical],
        "both": [horizontal, vertical],
    }[random_flip]


def sam_model_input(
    image: np.ndarray,
    image_size: int,
    image_format: str = "RGB",
    augmentations: Optional[T.AugmentationList] = None,
    boxes: Optional[np.ndarray] = None,
) -> Tuple[Dict, Optional[np.ndarray]]:
    """The one way an image becomes DESSAM's input, in training, evaluation, prediction and
    annotation.

    ``image`` is H x W x 3 uint8 RGB. Returns ``({"image": 3 x h x w uint8 tensor, longest side
    image_size, in ``image_format``; "height": H, "width": W; "sam_transform": e.g.
    "longest1024+hflip"}, boxes)`` where ``boxes`` (N x 4 XYXY in the original image, optional)
    come back in the model's input frame, through the same resize and flips as the image.
    """
    height, width = image.shape[:2]
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(height, width, image_size)
    aug_input = T.AugInput(image, boxes=boxes)
    aug_input.transform(T.ResizeTransform(height, width, new_h, new_w))
    flips = augmentations(aug_input).transforms if augmentations is not None else []
    names = [f"longest{image_size}"] + [_FLIP_NAMES.get(type(t), "") for t in flips]
    image = aug_input.image
    if image_format == "BGR":
        image = image[:, :, ::-1]
    model_input = {
        "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
        "height": height,
        "width": width,
        "sam_transform": "+".join(n for n in names if n),
    }
    return model_input, aug_input.boxes
