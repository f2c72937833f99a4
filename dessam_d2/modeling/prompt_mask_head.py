"""The self-distillation prompting mask head (Sec. 2.2).

SAM's prompt encoder and mask decoder are shared by a teacher (ground-truth box prompts, SAM's own
output tokens, no gradient) and a student (predicted box prompts, output tokens plus learnable
tokens). Both read their mask from the first mask token (single-mask output).
"""

import contextlib
import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY
from detectron2.structures import Instances
from detectron2.utils.events import get_event_storage
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn
from torch.profiler import record_function

from ..errors import ConfigError
from .criterion import DESSAMCriterion
from .fast_decoder import SharedImageDecoder, fast_path_mismatch

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


# MODEL.DESSAM.DECODER_INFERENCE_DTYPE: "auto" follows the model's bfloat16 autocast (decode).
DECODER_DTYPES = ("auto", "float32", "bfloat16")


def checked_decoder_dtype(setting: str) -> str:
    if setting not in DECODER_DTYPES:
        raise ConfigError(f"decoder inference dtype {setting!r}: auto, float32 or bfloat16")
    return setting


@ROI_MASK_HEAD_REGISTRY.register()
class SAMPromptMaskHead(nn.Module):
    """Teacher/student SAM decoding of box prompts, with DES-SAM's losses.

    Inputs of ``forward``: ``embeddings`` (B x 256 x h x w, SAM's whole embeddings), per-image
    ``Instances`` (training: foreground proposals whose ``proposal_boxes`` are the student's
    prompts, the box head's predictions or the proposals themselves as
    MODEL.DESSAM.STUDENT_PROMPTS says, and ``gt_boxes`` their matched ground truth; inference:
    ``pred_boxes``, the final detections) and, in training, ``raw_images`` (B x 3 x S x S padded
    RGB in [0, 255], for the colour losses).
    Inference adds ``pred_mask_logits`` (R x 1 x 4h x 4w, over the padded S x S input).
    """

    @configurable
    def __init__(
        self,
        *,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        image_size: int,
        criterion: Optional[DESSAMCriterion] = None,
        num_learnable_tokens: int = 1,
        token_init_std: float = 1.0,
        chunk_size: int = 40,
        freeze_decoder: bool = True,
        max_train_masks: int = 0,
        fast_decoder: bool = True,
        inference_dtype: str = "float32",
    ):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # The paper's losses and weights unless given.
        self.criterion = criterion or DESSAMCriterion(image_size=image_size)
        self.image_size = image_size
        embed_dim = mask_decoder.transformer_dim
        # T~ of Eq. 3, drawn from N(0, token_init_std^2) (the authors' release: N(0, 1), the
        # scale of SAM's own token embeddings). Its starting value is kept (a buffer, saved with
        # the model) so training can report how far the token moved.
        tokens = torch.randn(num_learnable_tokens, embed_dim) * token_init_std
        self.learnable_tokens = nn.Parameter(tokens)
        self.register_buffer("learnable_tokens_init", tokens.clone())
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
        # Inference decodes as the student (with T~); False gives SAM's own tokens, the paper's
        # ablation without the prompt (Tables 4-5, first row).
        self.tokens_at_inference = True
        self.fast_decoder = fast_decoder
        self._fast_path_checked: Optional[tuple] = None  # (id of the decoder checked, ok)
        self.inference_dtype = checked_decoder_dtype(inference_dtype)

    def set_tokens_at_inference(self, enabled: bool) -> bool:
        """Whether inference decodes as the student (with T~, the default) or with SAM's own
        output tokens only (the paper's ablation without the prompt); returns the previous
        setting."""
        previous, self.tokens_at_inference = self.tokens_at_inference, bool(enabled)
        return previous

    def set_decoding(
        self,
        *,
        fast: Optional[bool] = None,
        inference_dtype: Optional[str] = None,
        chunk_size: Optional[int] = None,
    ) -> Dict:
        """Change how ``decode`` runs (what is not None): the fast path (MODEL.DESSAM.FAST_DECODER),
        the inference dtype (MODEL.DESSAM.DECODER_INFERENCE_DTYPE), the boxes per decoder call
        (MODEL.DESSAM.DECODER_CHUNK_SIZE). Returns the previous settings, as keywords."""
        previous = {
            "fast": self.fast_decoder,
            "inference_dtype": self.inference_dtype,
            "chunk_size": self.chunk_size,
        }
        if inference_dtype is not None:
            self.inference_dtype = checked_decoder_dtype(inference_dtype)
        if fast is not None:
            self.fast_decoder = bool(fast)
        if chunk_size is not None:
            self.chunk_size = max(int(chunk_size), 1)
        return previous

    def token_stats(self) -> Dict[str, float]:
        """How the learnable tokens T~ moved: ``norm`` (||T~||), ``change`` (||T~ - T~_0||, T~_0
        their initial value) and ``grad_norm`` (of the last backward pass's gradient, 0 when
        there is none)."""
        tokens = self.learnable_tokens.detach()
        grad = self.learnable_tokens.grad
        return {
            "norm": float(tokens.norm()),
            "change": float((tokens - self.learnable_tokens_init).norm()),
            "grad_norm": float(grad.norm()) if grad is not None else 0.0,
        }

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape=None):
        sam, d = cfg.MODEL.SAM, cfg.MODEL.DESSAM
        prompt_encoder, mask_decoder = build_sam_prompt_modules(
            sam.IMAGE_SIZE, sam.PATCH_SIZE, sam.PROMPT_EMBED_DIM, sam.DECODER_MLP_DIM
        )
        criterion = DESSAMCriterion(
            image_size=sam.IMAGE_SIZE,
            distill_weight=d.LOSS_DISTILL_WEIGHT,
            distill_bce_weight=d.DISTILL_BCE_WEIGHT,
            distill_dice_weight=d.DISTILL_DICE_WEIGHT,
            distill_reduction=d.DISTILL_REDUCTION,
            pairwise_weight=d.LOSS_PAIRWISE_WEIGHT,
            local_pairwise_weight=d.LOCAL_PAIRWISE_WEIGHT,
            global_pairwise_weight=d.GLOBAL_PAIRWISE_WEIGHT,
            pairwise_loss=d.PAIRWISE_LOSS,
            pairwise_size=d.PAIRWISE_SIZE,
            pairwise_dilation=d.PAIRWISE_DILATION,
            pairwise_color_thresh=d.PAIRWISE_COLOR_THRESH,
            crop_size=d.EDGE_CROP_SIZE,
            projection_weight=d.LOSS_PROJECTION_WEIGHT,
        )
        return {
            "prompt_encoder": prompt_encoder,
            "mask_decoder": mask_decoder,
            "criterion": criterion,
            "image_size": sam.IMAGE_SIZE,
            "num_learnable_tokens": d.NUM_LEARNABLE_TOKENS,
            "token_init_std": d.TOKEN_INIT_STD,
            "chunk_size": d.DECODER_CHUNK_SIZE,
            "freeze_decoder": sam.FREEZE_DECODER,
            "max_train_masks": d.MAX_TRAIN_MASKS_PER_IMAGE,
            "fast_decoder": d.FAST_DECODER,
            "inference_dtype": d.DECODER_INFERENCE_DTYPE,
        }

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_decoder:
            self.prompt_encoder.eval()
            self.mask_decoder.eval()
        return self

    def fast_path_ok(self) -> bool:
        """Whether the mask decoder has the structure fast_decoder.py relies on; checked once per
        decoder, with one warning when not (decoding then uses SAM's own MaskDecoder)."""
        if self._fast_path_checked is None or self._fast_path_checked[0] != id(self.mask_decoder):
            reason = fast_path_mismatch(self.mask_decoder)
            if reason:
                logger.warning(
                    f"MODEL.DESSAM.FAST_DECODER: the mask decoder differs from what the fast "
                    f"path was written for ({reason}); decoding with segment-anything's "
                    f"MaskDecoder instead"
                )
            self._fast_path_checked = (id(self.mask_decoder), reason is None)
        return self._fast_path_checked[1]

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, student: bool) -> torch.Tensor:
        """Mask logits for N boxes (XYXY, input frame) on one image's embedding (1 x C x h x w).

        Returns N x 1 x 4h x 4w. Boxes go through the decoder ``chunk_size`` at a time. With
        ``fast_decoder`` the image-side work all prompts share is done once per call
        (fast_decoder.py; same outputs up to float rounding). In inference the decoder runs in
        ``inference_dtype`` (MODEL.DESSAM.DECODER_INFERENCE_DTYPE): "bfloat16", "float32" (also
        under the model's bfloat16 autocast), or "auto": as called, i.e. in bfloat16 under the
        model's bfloat16 autocast (MODEL.DESSAM.INFERENCE_DTYPE) and in float32 otherwise.
        bfloat16 moves a few border pixels of the smallest masks
        (tests/test_modeling_meta_arch_inference_dtype.py). Training is left as called: float32, or
        bfloat16 under MODEL.DESSAM.TRAIN_DTYPE's autocast. Returns float32 logits.
        """
        if len(boxes) == 0:
            side = 4 * embedding.shape[-1]
            return embedding.new_zeros(0, 1, side, side)
        device = embedding.device.type
        if self.training or self.inference_dtype == "auto":
            precision = contextlib.nullcontext()
        elif self.inference_dtype == "bfloat16":
            precision = torch.autocast(device, torch.bfloat16)
        else:
            precision = torch.autocast(device, enabled=False)
        with record_function("dessam/mask_decoder"), precision:
            return self._decode(embedding.float(), boxes.float(), student)

    def _decode(self, embedding: torch.Tensor, boxes: torch.Tensor, student: bool) -> torch.Tensor:
        image_pe = self.prompt_encoder.get_dense_pe()
        fast = self.fast_decoder and self.fast_path_ok()
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
            if not fast:
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

    def forward(
        self,
        embeddings: torch.Tensor,
        instances: List[Instances],
        raw_images: Optional[torch.Tensor] = None,
    ):
        """Inference: ``instances`` with ``pred_mask_logits``. Training: the mask losses (needs
        ``raw_images``)."""
        if not self.training:
            for emb, inst in zip(embeddings, instances):
                boxes = inst.pred_boxes.tensor
                inst.pred_mask_logits = self.decode(emb[None], boxes, self.tokens_at_inference)
            return instances
        if raw_images is None:
            raise ValueError("the mask head's losses need the raw images (raw_images)")
        return self.losses(embeddings, raw_images, instances)

    def _select(self, inst: Instances) -> Instances:
        if self.max_train_masks > 0 and len(inst) > self.max_train_masks:
            keep = torch.randperm(len(inst), device=inst.gt_boxes.device)[: self.max_train_masks]
            inst = inst[keep]
        return inst

    def losses(
        self, embeddings: torch.Tensor, images: torch.Tensor, instances: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """Teacher (GT box, SAM's tokens, no grad) and student (the RoI's ``proposal_boxes``,
        tokens + T~) logits for every positive RoI, then the criterion's weighted terms; L_edge
        is cropped at the matched GT box."""
        student_logits, teacher_logits, gt_boxes, image_ids = [], [], [], []
        prompts = {"teacher": 0, "student": 0}
        for i, (emb, inst) in enumerate(zip(embeddings, instances)):
            inst = self._select(inst)
            if len(inst) == 0:
                continue
            gt = inst.gt_boxes.tensor
            if self.criterion.needs_teacher:
                # One teacher run per ground-truth nucleus, shared by all its positive RoIs.
                uniq, inverse = torch.unique(gt, dim=0, return_inverse=True)
                with torch.no_grad(), record_function("dessam/teacher"):
                    teacher = self.decode(emb[None], uniq, student=False)
                teacher_logits.append(teacher[inverse])
                prompts["teacher"] += len(uniq)
            pred = inst.proposal_boxes.tensor.detach().clamp(0, self.image_size)
            with record_function("dessam/student"):
                student_logits.append(self.decode(emb[None], pred, student=True))
            gt_boxes.append(gt)
            image_ids.append(torch.full((len(inst),), i, device=gt.device))
            prompts["student"] += len(pred)
        try:  # how many prompts each decoder ran this step (metrics.json, benchmarks/phases.py)
            get_event_storage().put_scalars(
                **{f"mask_head/{k}_prompts": v for k, v in prompts.items()}, smoothing_hint=False
            )
        except AssertionError:  # no EventStorage: called outside a trainer
            pass
        if not student_logits:
            # No positive RoI in the batch: zero losses that still reach every trainable
            # parameter, so data-parallel training sees the same graph on every rank.
            zero = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            return {k: zero for k in self.criterion.loss_names}
        # The loss terms in float32 also under MODEL.DESSAM.TRAIN_DTYPE bfloat16 (the decoders'
        # logits, the raw images and the boxes are float32): L_edge's colour sums would lose
        # digits in bfloat16.
        with torch.autocast(images.device.type, enabled=False):
            return self.criterion(
                torch.cat(student_logits),  # R x 1 x m x m
                torch.cat(teacher_logits) if teacher_logits else None,
                images,
                torch.cat(gt_boxes),
                torch.cat(image_ids),
            )


__all__ = ["SAMPromptMaskHead", "build_sam_prompt_modules"]
