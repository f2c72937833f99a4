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

__all__ = [
    "IMAGE_FORMATS",
    "RANDOM_FLIPS",
    "HEDJitter",
    "HEDJitterTransform",
    "flip_augmentations",
    "sam_model_input",
    "training_augmentations",
]

IMAGE_FORMATS = ("RGB", "BGR")  # INPUT.FORMAT
RANDOM_FLIPS = ("none", "horizontal", "vertical", "both")  # INPUT.RANDOM_FLIP


class HEDJitterTransform(T.Transform):
    """Stain jitter in haematoxylin-eosin-DAB space (Tellez et al. 2018): scikit-image's
    ``rgb2hed`` colour deconvolution, each stain's concentration ``c`` -> ``alpha * c + beta``,
    back with ``hed2rgb``. The image only: boxes, coordinates and masks are unchanged."""

    def __init__(self, alpha: np.ndarray, beta: np.ndarray):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        from skimage.color import hed2rgb, rgb2hed  # an optional path: import on use

        hed = rgb2hed(img[..., :3])
        # The shift is relative to each channel's largest concentration in the image.
        scale = np.maximum(hed.reshape(-1, 3).max(0), 1e-6)
        jittered = hed * self.alpha + self.beta * scale
        # rgb2hed clips negative concentrations (colours outside the three stains' gamut, such
        # as a green tint): only the change the jitter makes is added to the image, so that no
        # jitter gives back the image exactly, whatever its colours.
        change = hed2rgb(jittered) - hed2rgb(hed)
        rgb = np.clip(img[..., :3] / 255.0 + change, 0.0, 1.0) * 255.0
        return np.rint(rgb).astype(img.dtype)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def inverse(self) -> T.Transform:
        return T.NoOpTransform()


class HEDJitter(T.Augmentation):
    """INPUT.STAIN_AUGMENT: per image, each of H, E, D gets ``alpha ~ U(1 - sigma, 1 + sigma)``
    and ``beta ~ U(-bias, bias)`` (drawn from NumPy's global generator, which Detectron2 seeds
    per worker)."""

    def __init__(self, sigma: float = 0.05, bias: float = 0.05):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        alpha = np.random.uniform(1.0 - self.sigma, 1.0 + self.sigma, 3)
        beta = np.random.uniform(-self.bias, self.bias, 3)
        return HEDJitterTransform(alpha, beta)


def training_augmentations(
    random_flip: str, stain_augment: bool = False, sigma: float = 0.05, bias: float = 0.05
) -> List[T.Augmentation]:
    """What training applies after the resize: the flips, then (INPUT.STAIN_AUGMENT) HED jitter."""
    return flip_augmentations(random_flip) + ([HEDJitter(sigma, bias)] if stain_augment else [])


_FLIP_NAMES = {T.HFlipTransform: "hflip", T.VFlipTransform: "vflip", HEDJitterTransform: "hed"}


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
    "longest1024+hflip", "+hed" after a stain jitter}, boxes)`` where ``boxes`` (N x 4 XYXY in
    the original image, optional) come back in the model's input frame, through the same resize
    and flips as the image.
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
