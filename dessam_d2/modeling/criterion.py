"""Which mask losses DES-SAM computes, on which crops, with which weights (Eqs. 2, 4, 5).

The mask head produces, for the R positive RoIs of a batch, the student's low-res logits
(prompted with the box head's prediction) and the teacher's (prompted with the matched
ground-truth box). This module turns them into the loss terms:

* L_distill (Eq. 2) on the whole low-res frame: BCE and Dice of the student against the
  teacher's binarised mask [Y_t > 0], weights lambda_distill x (1, 1), averaged over the RoIs
  (``distill_reduction`` "mean", the paper's) or summed over them ("sum", the authors' release,
  with weights 0.5 and 0.01);
* L_edge (Eq. 4) on a ``crop_size`` x ``crop_size`` RoIAligned crop of the ground-truth box,
  student logits and image alike: alpha x L_lp (BoxSnake's local pairwise term on the crop's LAB
  colours) + beta x L_gp (BoxLevelSet's region energy on the crop's RGB, 0-255 scale), all
  x lambda_pairwise. The mask and the image are cropped at the same box and the probability
  differences of L_lp are taken between the same pixel pairs as its colour weights (the release
  crops the mask at the proposal and takes the differences at dilation 1 against weights at
  dilation 2; docs/METHOD.md says why we do not).

Two options change the set of terms (``loss_names``): with ``distill_weight`` 0 there is no
L_distill and the head runs no teacher; with ``projection_weight`` > 0 BoxInst's box-projection
term (``loss_projection``, on the whole frame against the ground-truth box) is added, what a
box-supervised model trained without a teacher needs to keep its masks in their boxes.
"""

from typing import Dict, Optional

import torch
from torchvision.ops import roi_align

from ..errors import ConfigError
from .losses import (
    DISTILL_REDUCTIONS,
    boxinst_pairwise_loss,
    color_similarity,
    distillation_loss,
    levelset_energy,
    local_pairwise_loss,
    projection_loss,
    rgb_to_lab,
)

MASK_LOSSES = (
    "loss_distill_bce",
    "loss_distill_dice",
    "loss_local_pairwise",
    "loss_global_levelset",
)


class DESSAMCriterion:
    """Weighted mask losses of DES-SAM; plain arguments, defaults = the paper's."""

    def __init__(
        self,
        *,
        image_size: int,
        distill_weight: float = 1.0,
        distill_bce_weight: float = 1.0,
        distill_dice_weight: float = 1.0,
        distill_reduction: str = "mean",
        pairwise_weight: float = 1.0,
        local_pairwise_weight: float = 1.0,
        global_pairwise_weight: float = 0.001,
        pairwise_loss: str = "boxsnake",
        pairwise_size: int = 3,
        pairwise_dilation: int = 2,
        pairwise_color_thresh: float = 0.3,
        crop_size: int = 72,
        projection_weight: float = 0.0,
    ):
        if pairwise_loss not in ("boxsnake", "boxinst"):
            raise ConfigError(f"MODEL.DESSAM.PAIRWISE_LOSS={pairwise_loss!r}: boxsnake or boxinst")
        if distill_reduction not in DISTILL_REDUCTIONS:
            raise ConfigError(
                f"MODEL.DESSAM.DISTILL_REDUCTION={distill_reduction!r}: one of {DISTILL_REDUCTIONS}"
            )
        self.image_size = image_size
        self.w_bce = distill_weight * distill_bce_weight
        self.w_dice = distill_weight * distill_dice_weight
        self.distill_reduction = distill_reduction
        self.w_local = pairwise_weight * local_pairwise_weight
        self.w_global = pairwise_weight * global_pairwise_weight
        self.pairwise_loss = pairwise_loss
        self.size = pairwise_size
        self.dilation = pairwise_dilation
        self.color_thresh = pairwise_color_thresh
        self.crop_size = crop_size
        self.w_projection = projection_weight

    @property
    def needs_teacher(self) -> bool:
        """Whether L_distill is on (and so the teacher's masks are needed)."""
        return self.w_bce != 0 or self.w_dice != 0

    @property
    def loss_names(self):
        """The keys ``__call__`` returns: MASK_LOSSES without L_distill's when it is off, with
        ``loss_projection`` when that is on."""
        names = [k for k in MASK_LOSSES if self.needs_teacher or "distill" not in k]
        return tuple(names + (["loss_projection"] if self.w_projection else []))

    def edge_crops(
        self,
        student: torch.Tensor,
        images: torch.Tensor,
        boxes: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoIAligned crops of each ground-truth box: (R x 1 x c x c logits, R x 3 x c x c RGB).

        ``student`` is R x 1 x m x m over the padded S x S input, ``images`` B x 3 x S x S RGB
        in [0, 255], ``boxes`` R x 4 XYXY in input pixels, ``image_ids`` R batch indices.
        """
        c = self.crop_size
        own = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None]
        scale = student.shape[-1] / self.image_size
        logits = roi_align(student, torch.cat([own, boxes], 1), c, scale, aligned=True)
        rois = torch.cat([image_ids[:, None].to(boxes.dtype), boxes], dim=1)
        rgb = roi_align(images.to(student.dtype), rois, c, aligned=True)
        return logits, rgb

    def __call__(
        self,
        student: torch.Tensor,
        teacher: Optional[torch.Tensor],
        images: torch.Tensor,
        boxes: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """The weighted terms of ``loss_names`` for R RoIs (student and teacher R x 1 x m x m;
        the teacher may be None when L_distill is off)."""
        losses = {}
        if self.needs_teacher:
            bce, dice = distillation_loss(student, teacher, self.distill_reduction)
            losses = {"loss_distill_bce": self.w_bce * bce, "loss_distill_dice": self.w_dice * dice}
        if self.w_projection:
            losses["loss_projection"] = self.w_projection * projection_loss(
                student, boxes, self.image_size
            )
        crop_logits, crop_rgb = self.edge_crops(student, images, boxes, image_ids)
        sim = color_similarity(rgb_to_lab(crop_rgb), self.size, self.dilation)
        if self.pairwise_loss == "boxsnake":
            local = local_pairwise_loss(crop_logits, sim, self.size, self.dilation)
        else:
            local = boxinst_pairwise_loss(
                crop_logits, sim, self.color_thresh, self.size, self.dilation
            )
        losses["loss_local_pairwise"] = self.w_local * local
        losses["loss_global_levelset"] = self.w_global * levelset_energy(crop_logits, crop_rgb)
        return losses
