"""The fully supervised reference of the demo: the same detector with Detectron2's Mask R-CNN
mask head, trained on the ground-truth masks (the paper's Table 3 baseline, in miniature).

It is the only model in this project that reads masks in training, and it lives here, outside
DES-SAM's model code: Detectron2's own ``GeneralizedRCNN`` (as ``ReferenceRCNN``, with the
score-threshold setter ``Trainer.test`` calls) and ``StandardROIHeads`` with
``MaskRCNNConvUpsampleHead``, on DES-SAM's backbone (the frozen SAM encoder + SimpleFeaturePyramid,
loaded from the same SAM checkpoint), RPN and box head, same schedule, same seed.
"""

import copy
import os
from typing import Dict, List, Optional

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ..data.image_io import read_image_rgb
from ..data.transforms import sam_model_input
from ..engine import Trainer
from ..modeling.embedding_cache import (
    EmbeddingCache,
    cached_encode,
    encoder_fingerprint,
    weights_state,
)
from ..modeling.sam_weights import read_sam_state_dict
from ..modeling.settings import DetectorSettings

__all__ = ["reference_config", "ReferenceRCNN", "ReferenceTrainer", "MaskSupervisedMapper"]


@META_ARCH_REGISTRY.register()
class ReferenceRCNN(DetectorSettings, GeneralizedRCNN):
    """Detectron2's GeneralizedRCNN with DES-SAM's public settings (``set_score_threshold``,
    ``set_detections_per_image``) and, with MODEL.DESSAM.EMBEDDING_CACHE_DIR set, DES-SAM's
    embedding cache: the same frozen encoder fed the same images gives the same entries, so the
    demo's reference reads the embeddings DES-SAM's training stored (``cached_encode``)."""

    @configurable
    def __init__(self, *, embedding_cache: Optional[EmbeddingCache] = None, **kwargs):
        super().__init__(**kwargs)
        self.embedding_cache = embedding_cache
        self._batch: List[Dict] = []
        self._fingerprint, self._fingerprint_state = "", None
        if embedding_cache is not None:
            net = self.backbone.net
            if not net.frozen:
                raise ValueError("the embedding cache needs a frozen SAM encoder")
            # GeneralizedRCNN calls backbone(images.tensor) right after preprocess_image
            self.backbone.encode = self._cached_encode

    @classmethod
    def from_config(cls, cfg: CfgNode):
        ret = super().from_config(cfg)
        d = cfg.MODEL.DESSAM
        if d.EMBEDDING_CACHE_DIR and cfg.MODEL.SAM.FREEZE_ENCODER:
            ret["embedding_cache"] = EmbeddingCache(
                d.EMBEDDING_CACHE_DIR, d.EMBEDDING_CACHE_DTYPE, d.EMBEDDING_CACHE_MAX_GB
            )
        return ret

    def preprocess_image(self, batched_inputs: List[Dict]):
        self._batch = batched_inputs
        return super().preprocess_image(batched_inputs)

    def _cached_encode(self, images: torch.Tensor) -> torch.Tensor:
        net = self.backbone.net
        state = weights_state(net.encoder)
        if state != self._fingerprint_state:  # e.g. the SAM checkpoint was loaded
            self._fingerprint = encoder_fingerprint(
                net.encoder, self.pixel_mean, self.pixel_std, net.img_size
            )
            self._fingerprint_state = state
        shape = (net.out_chans, net.embed_size, net.embed_size)
        return cached_encode(
            self.embedding_cache, self._batch, images, net.encode, self._fingerprint,
            net.img_size, shape,
        )  # fmt: skip


def reference_config(cfg: CfgNode) -> CfgNode:
    """``cfg`` with DES-SAM's mask head replaced by Mask R-CNN's (4 convs, 14 x 14 RoIs, the
    pyramid's channels), outputs under OUTPUT_DIR/reference_mask_rcnn."""
    ref = cfg.clone()
    ref.defrost()
    ref.MODEL.META_ARCHITECTURE = "ReferenceRCNN"
    ref.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    ref.MODEL.MASK_ON = True
    ref.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
    ref.MODEL.ROI_MASK_HEAD.NUM_CONV = 4
    ref.MODEL.ROI_MASK_HEAD.CONV_DIM = cfg.MODEL.FPN.OUT_CHANNELS
    ref.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
    ref.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"
    ref.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "reference_mask_rcnn")
    ref.freeze()
    return ref


class MaskSupervisedMapper:
    """Dataset dict -> GeneralizedRCNN training input with ``gt_masks``: the image through
    DES-SAM's own resize (``sam_model_input``), boxes and masks through the same transform."""

    def __init__(self, cfg: CfgNode):
        self.image_size = cfg.MODEL.SAM.IMAGE_SIZE

    def __call__(self, record: Dict) -> Dict:
        image = read_image_rgb(record["file_name"])
        utils.check_image_size(record, image)
        out, _ = sam_model_input(image, self.image_size)
        shape = tuple(out["image"].shape[-2:])
        resize = T.TransformList([T.ResizeTransform(*image.shape[:2], *shape)])
        annotations = [
            utils.transform_instance_annotations(copy.deepcopy(a), resize, shape)
            for a in record.get("annotations", [])
            if a.get("iscrowd", 0) == 0
        ]
        for a in annotations:  # a resized mask comes back read-only from PIL; torch warns of it
            if isinstance(a.get("segmentation"), np.ndarray):
                a["segmentation"] = np.array(a["segmentation"])
        out["instances"] = utils.filter_empty_instances(
            utils.annotations_to_instances(annotations, shape, mask_format="bitmask")
        )
        out["file_name"], out["image_id"] = record["file_name"], record["image_id"]
        return out


class ReferenceTrainer(Trainer):
    """DES-SAM's trainer (same sampler, seeding, checkpoints, evaluators) for the reference."""

    @classmethod
    def build_model(cls, cfg: CfgNode):
        model = super().build_model(cfg)
        if cfg.MODEL.SAM.CHECKPOINT:  # the same frozen SAM encoder as DES-SAM's
            state = read_sam_state_dict(cfg.MODEL.SAM.CHECKPOINT)
            prefix = "image_encoder."
            encoder = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            model.backbone.net.encoder.load_state_dict(encoder, strict=True)
        return model

    @classmethod
    def build_train_mapper(cls, cfg: CfgNode):
        return MaskSupervisedMapper(cfg)

    def model_hooks(self):
        return []
