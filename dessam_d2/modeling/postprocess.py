"""DES-SAM's detections from the model's frame (resized, padded to S x S) to the original image."""

from typing import Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Instances

__all__ = ["mask_logits_to_original", "detections_to_original"]


def mask_logits_to_original(
    logits: torch.Tensor,
    padded_size: int,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
) -> torch.Tensor:
    """B x C x m x m mask logits over the padded ``padded_size`` square -> B x C x H x W over the
    original image: upsample to the square, crop the resized image's extent ``input_size``
    (h, w), resize to ``original_size`` (H, W), bilinearly. The same numbers as
    segment-anything's ``Sam.postprocess_masks`` with ``image_encoder.img_size = padded_size``
    (tests/test_modeling_postprocess.py)."""
    square = (padded_size, padded_size)
    logits = F.interpolate(logits, square, mode="bilinear", align_corners=False)
    logits = logits[..., : input_size[0], : input_size[1]]
    return F.interpolate(logits, original_size, mode="bilinear", align_corners=False)


def detections_to_original(
    results: Instances,
    input_size: Tuple[int, int],
    original_size: Tuple[int, int],
    padded_size: int,
    mask_logit_threshold: float,
) -> Instances:
    """Boxes and masks of ``results`` (``pred_boxes``, ``scores``, ``pred_classes``,
    ``pred_mask_logits``) from the resized image ``input_size`` (h, w) padded to ``padded_size``
    back to ``original_size`` (H, W): float32 scores and boxes (scaled, clipped), bool masks
    (logits > ``mask_logit_threshold``) whatever dtype the model computed in."""
    height, width = original_size
    h, w = input_size
    out = Instances((height, width))
    boxes = results.pred_boxes.clone()
    boxes.tensor = boxes.tensor.float()
    boxes.scale(width / w, height / h)
    boxes.clip((height, width))
    out.pred_boxes = boxes
    out.scores = results.scores.float()
    out.pred_classes = results.pred_classes
    if not results.has("pred_mask_logits"):  # boxes only (MASK_ON off, e.g. fitting a threshold)
        return out
    logits = results.pred_mask_logits
    # Written in place, 16 at a time: with hundreds of nuclei neither the upsampled logits nor a
    # second copy of the masks (a concatenation) is ever whole in memory.
    masks = torch.empty(len(logits), height, width, dtype=torch.bool, device=logits.device)
    for start, chunk in zip(range(0, len(logits), 16), logits.split(16)):
        up = mask_logits_to_original(chunk.float(), padded_size, (h, w), (height, width))
        torch.gt(up[:, 0], mask_logit_threshold, out=masks[start : start + len(chunk)])
    out.pred_masks = masks
    return out
