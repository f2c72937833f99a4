"""DES-SAM's ROI heads: Detectron2's StandardROIHeads, with the SAM prompting mask head."""

from typing import Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import Instances
from torch.profiler import record_function

from ..errors import ConfigError

__all__ = ["DESSAMROIHeads", "STUDENT_PROMPTS"]

STUDENT_PROMPTS = ("predicted", "proposals")


@ROI_HEADS_REGISTRY.register()
class DESSAMROIHeads(StandardROIHeads):
    """StandardROIHeads whose mask head reads the SAM embedding and the image, not pooled features.

    The box branch is Detectron2's own. In training the student is prompted, for each positive
    RoI (matched to its GT box), with the box head's prediction (MODEL.DESSAM.STUDENT_PROMPTS
    "predicted": Detectron2's ``train_on_pred_boxes``) or with the proposal itself ("proposals",
    the authors' release: RPN boxes and the ground-truth boxes added to them).
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        prompts = cfg.MODEL.DESSAM.STUDENT_PROMPTS
        if prompts not in STUDENT_PROMPTS:
            raise ConfigError(f"MODEL.DESSAM.STUDENT_PROMPTS={prompts!r}: one of {STUDENT_PROMPTS}")
        ret["train_on_pred_boxes"] = prompts == "predicted"
        return ret

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        with record_function("dessam/box_head"):  # benchmarks/measure.py reads it
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
