"""DES-SAM's ROI heads: Detectron2's StandardROIHeads, with the SAM prompting mask head."""

from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Instances
from torch.profiler import record_function

__all__ = ["DESSAMROIHeads"]


@ROI_HEADS_REGISTRY.register()
class DESSAMROIHeads(StandardROIHeads):
    """StandardROIHeads whose mask head reads the SAM embedding and the image, not pooled features.

    The box branch is Detectron2's own. ``train_on_pred_boxes`` is forced on: the student is
    prompted with the box head's predictions for the positive RoIs, each matched to its GT box.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        ret["train_on_pred_boxes"] = True
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        with record_function("dessam/box_head"):  # tools/benchmark.py reads it
            return super()._forward_box(features, proposals)

    @classmethod
    def _init_mask_head(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.MASK_ON:
            return {}
        return {
            "mask_in_features": ["sam_embed", "image"],
            "mask_pooler": None,
            "mask_head": build_mask_head(cfg, input_shape),
        }
