"""DES-SAM's ROI heads: Detectron2's StandardROIHeads, with the SAM prompting mask head."""

from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads import select_foreground_proposals
from detectron2.modeling.roi_heads.mask_head import build_mask_head
from detectron2.structures import ImageList, Instances
from torch.profiler import record_function

from ..errors import ConfigError
from .roi_align import use_sparse_roi_align

__all__ = ["DESSAMROIHeads", "STUDENT_PROMPTS"]

STUDENT_PROMPTS = ("predicted", "proposals")


@ROI_HEADS_REGISTRY.register()
class DESSAMROIHeads(StandardROIHeads):
    """StandardROIHeads whose mask head reads the SAM embedding and the image, not pooled features.

    The box branch is Detectron2's own, on the pyramid levels in ``features``. The mask head gets
    what it needs as arguments of ``forward``: ``embeddings`` (SAM's whole B x C x h x w
    embeddings) and, in training, ``raw_images`` (B x 3 x S x S padded RGB, for the colour
    losses). In training the student is prompted, for each positive RoI (matched to its GT box),
    with the box head's prediction (MODEL.DESSAM.STUDENT_PROMPTS "predicted": Detectron2's
    ``train_on_pred_boxes``) or with the proposal itself ("proposals", the authors' release: RPN
    boxes and the ground-truth boxes added to them). With MODEL.DESSAM.FAST_ROI_ALIGN the box
    pooler's RoIAlign is ``SparseROIAlign`` (roi_align.py), the same numbers faster on a CPU.
    """

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        ret = super().from_config(cfg, input_shape)
        prompts = cfg.MODEL.DESSAM.STUDENT_PROMPTS
        if prompts not in STUDENT_PROMPTS:
            raise ConfigError(f"MODEL.DESSAM.STUDENT_PROMPTS={prompts!r}: one of {STUDENT_PROMPTS}")
        ret["train_on_pred_boxes"] = prompts == "predicted"
        return ret

    @classmethod
    def _init_box_head(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        ret = super()._init_box_head(cfg, input_shape)
        if cfg.MODEL.DESSAM.FAST_ROI_ALIGN:  # RoIAlign as a sparse product on a CPU
            use_sparse_roi_align(ret["box_pooler"])
        return ret

    @classmethod
    def _init_mask_head(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.MASK_ON:
            return {}
        return {
            "mask_in_features": [],  # no pyramid level: see forward's embeddings, raw_images
            "mask_pooler": None,
            "mask_head": build_mask_head(cfg, input_shape),
        }

    def forward(
        self,
        images: ImageList,
        features: Dict[str, torch.Tensor],
        proposals: List[Instances],
        targets: Optional[List[Instances]] = None,
        *,
        embeddings: torch.Tensor,
        raw_images: Optional[torch.Tensor] = None,
    ):
        """StandardROIHeads.forward (no keypoints), the mask head on ``embeddings``."""
        del images
        if self.training:
            if not targets:
                raise ValueError("DESSAMROIHeads: 'targets' are required in training")
            proposals = self.label_and_sample_proposals(proposals, targets)
            losses = self._forward_box(features, proposals)
            # With train_on_pred_boxes, the box head replaced the proposals' boxes by its own.
            losses.update(self._forward_masks(proposals, embeddings, raw_images))
            return proposals, losses
        detections = self._forward_box(features, proposals)
        # Cascaded, as Detectron2's: masks only for the final detections.
        return self._forward_masks(detections, embeddings), {}

    def _forward_box(self, features: Dict[str, torch.Tensor], proposals: List[Instances]):
        with record_function("dessam/box_head"):  # benchmarks/measure.py reads it
            return super()._forward_box(features, proposals)

    def _forward_masks(
        self,
        instances: List[Instances],
        embeddings: torch.Tensor,
        raw_images: Optional[torch.Tensor] = None,
    ):
        if not self.mask_on:
            return {} if self.training else instances
        if self.training:  # the head is trained on positive proposals only
            instances, _ = select_foreground_proposals(instances, self.num_classes)
        return self.mask_head(embeddings, instances, raw_images)

    def forward_with_given_boxes(self, features, instances):
        raise NotImplementedError(
            "DESSAMROIHeads: use DESSAM.segment_boxes (the mask head needs SAM's embeddings)"
        )
