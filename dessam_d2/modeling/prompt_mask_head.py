"""The self-distillation prompting mask head (Sec. 2.2) and its ROI heads.

SAM's prompt encoder and mask decoder are shared by a teacher (ground-truth box prompts, SAM's own
output tokens, no gradient) and a student (predicted box prompts, output tokens plus learnable
tokens). Both read their mask from the first mask token (single-mask output).
"""

import logging
from typing import Dict, List

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY, build_mask_head
from detectron2.structures import Instances
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn
from torchvision.ops import roi_align

from .fast_decoder import SharedImageDecoder
from .losses import (
    box_projection_loss,
    color_similarity,
    distillation_loss,
    levelset_energy,
    local_pairwise_loss,
    rgb_to_lab,
)

logger = logging.getLogger(__name__)


def build_sam_prompt_modules(
    image_size: int, patch_size: int, embed_dim: int = 256, mlp_dim: int = 2048
) -> tuple[PromptEncoder, MaskDecoder]:
    """SAM's prompt encoder and mask decoder with the shapes of segment_anything/build_sam.py."""
    embed_size = image_size // patch_size
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(embed_size, embed_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(
            depth=2, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=8
        ),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


@ROI_MASK_HEAD_REGISTRY.register()
class SAMPromptMaskHead(nn.Module):
    """Teacher/student SAM decoding of box prompts, with DES-SAM's losses.

    Inputs of ``forward``: ``features["sam_embed"]`` (B x 256 x h x w SAM embeddings),
    ``features["image"]`` (B x 3 x S x S padded RGB in [0, 255], training only) and per-image
    ``Instances`` (training: foreground proposals whose ``proposal_boxes`` are the box head's
    predictions and ``gt_boxes`` their matched ground truth; inference: ``pred_boxes``).
    Inference adds ``pred_mask_logits`` (R x 1 x 4h x 4w, over the padded S x S input).
    """

    @configurable
    def __init__(
        self,
        *,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        num_learnable_tokens: int = 1,
        chunk_size: int = 40,
        freeze_decoder: bool = True,
        max_train_masks: int = 0,
        distill_weight: float = 1.0,
        distill_bce_weight: float = 1.0,
        distill_dice_weight: float = 1.0,
        pairwise_weight: float = 1.0,
        local_pairwise_weight: float = 1.0,
        global_pairwise_weight: float = 0.001,
        pairwise_size: int = 3,
        pairwise_dilation: int = 2,
        pairwise_color_thresh: float = 0.3,
        edge_crop_size: int = 72,
        box_projection_weight: float = 0.0,
        teacher: str = "sam",
        distill_region: str = "frame",
        fast_decoder: bool = True,
        inference_dtype: str = "float32",
    ):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.image_size = image_size
        embed_dim = mask_decoder.transformer_dim
        # T~ of Eq. 3. Small init: at step 0 the student is close to SAM itself.
        self.learnable_tokens = nn.Parameter(torch.zeros(num_learnable_tokens, embed_dim))
        nn.init.trunc_normal_(self.learnable_tokens, std=0.02)
        self.chunk_size = max(int(chunk_size), 1)
        self.freeze_decoder = freeze_decoder
        if freeze_decoder:
            for p in list(prompt_encoder.parameters()) + list(mask_decoder.parameters()):
                p.requires_grad_(False)
        else:
            # Box prompts with single-mask output never use these: leaving them trainable would
            # give them no gradient, which data-parallel training rejects.
            unused = [
                prompt_encoder.point_embeddings[0],
                prompt_encoder.point_embeddings[1],
                prompt_encoder.not_a_point_embed,
                prompt_encoder.mask_downscaling,
                mask_decoder.iou_prediction_head,
                *mask_decoder.output_hypernetworks_mlps[1:],
            ]
            for module in unused:
                for p in module.parameters():
                    p.requires_grad_(False)
        self.max_train_masks = max_train_masks
        self.w_bce = distill_weight * distill_bce_weight
        self.w_dice = distill_weight * distill_dice_weight
        self.w_local = pairwise_weight * local_pairwise_weight
        self.w_global = pairwise_weight * global_pairwise_weight
        self.pairwise_size = pairwise_size
        self.pairwise_dilation = pairwise_dilation
        self.pairwise_color_thresh = pairwise_color_thresh
        self.edge_crop_size = edge_crop_size
        self.w_proj = box_projection_weight
        if teacher not in ("sam", "box_ellipse"):
            raise ValueError(f"MODEL.DESSAM.TEACHER={teacher!r}: use 'sam' or 'box_ellipse'")
        self.teacher = teacher
        if distill_region not in ("frame", "box"):
            raise ValueError(f"MODEL.DESSAM.DISTILL_REGION={distill_region!r}: 'frame' or 'box'")
        self.distill_region = distill_region
        self.fast_decoder = fast_decoder
        if inference_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"decoder inference dtype {inference_dtype!r}: float32 or bfloat16")
        self.inference_dtype = inference_dtype

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape=None):
        sam, d = cfg.MODEL.SAM, cfg.MODEL.DESSAM
        prompt_encoder, mask_decoder = build_sam_prompt_modules(
            sam.IMAGE_SIZE, sam.PATCH_SIZE, sam.PROMPT_EMBED_DIM, sam.DECODER_MLP_DIM
        )
        return {
            "prompt_encoder": prompt_encoder,
            "mask_decoder": mask_decoder,
            "image_size": sam.IMAGE_SIZE,
            "num_learnable_tokens": d.NUM_LEARNABLE_TOKENS,
            "chunk_size": d.DECODER_CHUNK_SIZE,
            "freeze_decoder": sam.FREEZE_DECODER,
            "max_train_masks": d.MAX_TRAIN_MASKS_PER_IMAGE,
            "distill_weight": d.LOSS_DISTILL_WEIGHT,
            "distill_bce_weight": d.DISTILL_BCE_WEIGHT,
            "distill_dice_weight": d.DISTILL_DICE_WEIGHT,
            "pairwise_weight": d.LOSS_PAIRWISE_WEIGHT,
            "local_pairwise_weight": d.LOCAL_PAIRWISE_WEIGHT,
            "global_pairwise_weight": d.GLOBAL_PAIRWISE_WEIGHT,
            "pairwise_size": d.PAIRWISE_SIZE,
            "pairwise_dilation": d.PAIRWISE_DILATION,
            "pairwise_color_thresh": d.PAIRWISE_COLOR_THRESH,
            "edge_crop_size": d.EDGE_CROP_SIZE,
            "box_projection_weight": d.BOX_PROJECTION_WEIGHT,
            "teacher": d.TEACHER,
            "distill_region": d.DISTILL_REGION,
            "fast_decoder": d.FAST_DECODER,
            "inference_dtype": d.DECODER_INFERENCE_DTYPE,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_decoder:
            self.prompt_encoder.eval()
            self.mask_decoder.eval()
        return self

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, student: bool) -> torch.Tensor:
        """Mask logits for N boxes (XYXY, input frame) on one image's embedding (1 x C x h x w).

        Returns N x 1 x 4h x 4w. Boxes go through the decoder ``chunk_size`` at a time. With
        ``fast_decoder`` the image-side work all prompts share is done once per call
        (fast_decoder.py; same outputs up to float rounding). In inference, the decoder runs in
        bfloat16 if ``inference_dtype`` says so (never in training: the teacher's targets and
        the student's gradients stay float32).
        """
        if len(boxes) == 0:
            side = 4 * embedding.shape[-1]
            return embedding.new_zeros(0, 1, side, side)
        bf16 = self.inference_dtype == "bfloat16" and not self.training
        with torch.autocast(embedding.device.type, torch.bfloat16, enabled=bf16):
            image_pe = self.prompt_encoder.get_dense_pe()
            shared = None
            out = []
            for chunk in boxes.split(self.chunk_size):
                sparse, dense = self.prompt_encoder(points=None, boxes=chunk, masks=None)
                if student:
                    # Appending T~ after the box tokens equals T (+) T~ in Eq. 3: the two-way
                    # transformer has no token order (each token is its own positional
                    # encoding).
                    tokens = self.learnable_tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1)
                    sparse = torch.cat([sparse, tokens.to(sparse.dtype)], dim=1)
                if not self.fast_decoder:
                    masks, _ = self.mask_decoder(
                        image_embeddings=embedding,
                        image_pe=image_pe,
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=False,
                    )
                    out.append(masks)
                    continue
                if shared is None:
                    # The dense "no mask" embedding is one vector for every box prompt.
                    shared = SharedImageDecoder(self.mask_decoder, embedding, image_pe, dense[:1])
                out.append(shared(sparse))
        return torch.cat(out).float()

    def forward(self, features: Dict[str, torch.Tensor], instances: List[Instances]):
        embeddings = features["sam_embed"]
        if not self.training:
            for emb, inst in zip(embeddings, instances):
                inst.pred_mask_logits = self.decode(emb[None], inst.pred_boxes.tensor, student=True)
            return instances
        return self.losses(embeddings, features["image"], instances)

    def _select(self, inst: Instances) -> Instances:
        if self.max_train_masks > 0 and len(inst) > self.max_train_masks:
            keep = torch.randperm(len(inst), device=inst.gt_boxes.device)[: self.max_train_masks]
            inst = inst[keep]
        return inst

    def losses(
        self, embeddings: torch.Tensor, images: torch.Tensor, instances: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        student_logits, teacher_logits, gt_boxes, image_ids = [], [], [], []
        for i, (emb, inst) in enumerate(zip(embeddings, instances)):
            inst = self._select(inst)
            if len(inst) == 0:
                continue
            gt = inst.gt_boxes.tensor
            # One teacher run per ground-truth nucleus, shared by all its positive RoIs.
            uniq, inverse = torch.unique(gt, dim=0, return_inverse=True)
            with torch.no_grad():
                if self.teacher == "box_ellipse":
                    teacher = box_ellipse_logits(uniq, 4 * emb.shape[-1], self.image_size)
                else:
                    teacher = self.decode(emb[None], uniq, student=False)
            pred = inst.proposal_boxes.tensor.detach().clamp(0, self.image_size)
            student_logits.append(self.decode(emb[None], pred, student=True))
            teacher_logits.append(teacher[inverse])
            gt_boxes.append(gt)
            image_ids.append(torch.full((len(inst),), i, device=gt.device))
        if not student_logits:
            # No positive RoI in the batch: zero losses that still reach every trainable
            # parameter, so data-parallel training sees the same graph on every rank.
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            names = ["loss_distill_bce", "loss_distill_dice", "loss_local_pairwise"]
            names += ["loss_global_levelset"] + (["loss_box_proj"] if self.w_proj > 0 else [])
            return {k: zero for k in names}

        student = torch.cat(student_logits)  # R x 1 x m x m
        teacher = torch.cat(teacher_logits)
        boxes = torch.cat(gt_boxes)
        # RoIs into the images (batch index = image) and into the masks (one mask per RoI).
        rois = torch.cat([torch.cat(image_ids)[:, None].to(boxes.dtype), boxes], dim=1)
        own = torch.arange(len(boxes), device=boxes.device, dtype=boxes.dtype)[:, None]

        if self.distill_region == "box":
            # Around each box only (x1.5): nucleus and background pixels in balance.
            centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) * 0.75
            around = torch.cat([own, centre - half, centre + half], dim=1)
            scale = student.shape[-1] / self.image_size
            s_crop = roi_align(student, around, 32, spatial_scale=scale, aligned=True)
            t_crop = roi_align(teacher, around, 32, spatial_scale=scale, aligned=True)
            bce, dice = distillation_loss(s_crop, t_crop)
        else:
            bce, dice = distillation_loss(student, teacher)
        losses = {"loss_distill_bce": self.w_bce * bce, "loss_distill_dice": self.w_dice * dice}

        # Edge-aware loss on the ground-truth box's crop (the only region boxes tell about).
        crop = self.edge_crop_size
        scale = student.shape[-1] / self.image_size
        crop_logits = roi_align(student, torch.cat([own, boxes], 1), crop, scale, aligned=True)
        crop_rgb = roi_align(images.to(student.dtype), rois, crop, aligned=True)
        lab = rgb_to_lab(crop_rgb)
        sim = color_similarity(lab, self.pairwise_size, self.pairwise_dilation)
        losses["loss_local_pairwise"] = self.w_local * local_pairwise_loss(
            crop_logits, sim, self.pairwise_color_thresh, self.pairwise_size, self.pairwise_dilation
        )
        losses["loss_global_levelset"] = self.w_global * levelset_energy(
            crop_logits, crop_rgb / 255
        )
        if self.w_proj > 0:
            losses["loss_box_proj"] = self.w_proj * box_projection_loss(
                student, box_masks_like(student, boxes * scale)
            )
        return losses


def box_ellipse_logits(boxes: torch.Tensor, side: int, image_size: int) -> torch.Tensor:
    """R x 1 x side x side logits (+10 / -10) of the ellipses inscribed in XYXY boxes.

    The demo's stand-in teacher when no pretrained SAM exists: a box-only shape prior.
    """
    b = boxes * (side / image_size)
    coords = torch.arange(side, device=boxes.device, dtype=boxes.dtype) + 0.5
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    rx, ry = ((b[:, 2] - b[:, 0]) / 2).clamp_min(0.5), ((b[:, 3] - b[:, 1]) / 2).clamp_min(0.5)
    dx = ((coords[None] - cx[:, None]) / rx[:, None]) ** 2  # R x side
    dy = ((coords[None] - cy[:, None]) / ry[:, None]) ** 2
    inside = dy[:, :, None] + dx[:, None, :] <= 1
    return (inside.to(boxes.dtype) * 20 - 10)[:, None]


def box_masks_like(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """R x 1 x m x m binary masks of XYXY boxes given in the mask's pixel frame."""
    side = logits.shape[-1]
    coords = torch.arange(side, device=logits.device, dtype=logits.dtype) + 0.5
    inside_x = (coords[None] >= boxes[:, 0:1]) & (coords[None] <= boxes[:, 2:3])
    inside_y = (coords[None] >= boxes[:, 1:2]) & (coords[None] <= boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(logits.dtype)[:, None]


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

    @classmethod
    def _init_mask_head(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]):
        if not cfg.MODEL.MASK_ON:
            return {}
        return {
            "mask_in_features": ["sam_embed", "image"],
            "mask_pooler": None,
            "mask_head": build_mask_head(cfg, input_shape),
        }


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen


__all__ = ["SAMPromptMaskHead", "DESSAMROIHeads", "build_sam_prompt_modules", "count_parameters"]
