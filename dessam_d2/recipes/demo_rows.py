"""The demo's rows that are not a model of their own: the box prior (an ellipse in each true or
detected box), SAM prompted with the true boxes (the teacher), SAM's own tokens in the
detector's boxes; and ``test_on``, one test set with the model's own score threshold."""

import contextlib
from typing import Dict, List

import numpy as np
import torch
from detectron2.data import DatasetCatalog

from ..config import score_threshold_of
from ..data.mapper import DESSAMDatasetMapper
from ..engine import Trainer
from .box_prior import ellipse_instances, gt_boxes_of

__all__ = [
    "test_on",
    "without_learnable_tokens",
    "evaluate_with_gt_boxes",
    "evaluate_box_prior_gt",
    "prompt_ious",
    "EllipsesInDetections",
]


def test_on(cfg, model, dataset_name: str, evaluator) -> Dict:
    """``Trainer.test`` on one test set with the model's box score threshold: the one fitted
    on its training boxes when it has one, else the set's own (a set that is not in
    DATASETS.TEST gets MODEL.ROI_HEADS.SCORE_THRESH_TEST)."""
    fitted = getattr(model, "fitted_score_threshold", None)
    one = cfg.clone()
    one.defrost()
    one.DATASETS.TEST = (dataset_name,)
    one.DATASETS.TEST_SCORE_THRESH = (
        () if fitted is not None else (score_threshold_of(cfg, dataset_name),)
    )
    one.freeze()
    return Trainer.test(one, model, evaluators=[evaluator])


@contextlib.contextmanager
def without_learnable_tokens(model):
    """Inference with SAM's own output tokens only (the paper's ablation without the prompt)."""
    previous = model.set_learnable_tokens(False)
    try:
        yield model
    finally:
        model.set_learnable_tokens(previous)


@torch.no_grad()
def evaluate_with_gt_boxes(cfg, model, dataset_name: str, output_folder: str) -> Dict:
    """The teacher's masks: SAM (no learnable token) prompted with every ground-truth box."""
    evaluator = Trainer.build_evaluator(cfg, dataset_name, output_folder=output_folder)
    evaluator.reset()
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    model.eval()
    ious = []
    for record in DatasetCatalog.get(dataset_name):
        inputs = mapper(record)
        scale = inputs["image"].shape[-1] / record["width"]
        boxes = torch.as_tensor(gt_boxes_of(record), dtype=torch.float32) * scale
        outputs = model.segment_boxes([inputs], [boxes], student=False)
        evaluator.process([inputs], outputs)
        ious += prompt_ious(record, outputs[0]["instances"].pred_masks)
    return {**evaluator.evaluate(), "prompted": _mean_iou(ious)}


def prompt_ious(record: Dict, masks: torch.Tensor) -> List[float]:
    """IoU of each prompted mask with the true mask of the box it was prompted with (masks in
    the order of ``gt_boxes_of(record)``, original image size)."""
    from pycocotools import mask as mask_util

    from ..evaluation.nuclei_evaluator import segmentation_to_rle

    h, w = record["height"], record["width"]
    annotations = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
    ious = []
    for a, pred in zip(annotations, masks.cpu().numpy().astype(bool)):
        gt = mask_util.decode(segmentation_to_rle(a["segmentation"], h, w)).astype(bool)
        ious.append(float((gt & pred).sum() / max((gt | pred).sum(), 1)))
    return ious


def _mean_iou(ious: List[float]) -> Dict:
    return {"mean IoU": 100.0 * float(np.mean(ious)) if ious else float("nan"), "n": len(ious)}


@torch.no_grad()
def evaluate_box_prior_gt(cfg, dataset_name: str, output_folder: str) -> Dict:
    """The box prior on ground-truth boxes: an inscribed ellipse per true box, score 1."""
    evaluator = Trainer.build_evaluator(cfg, dataset_name, output_folder=output_folder)
    evaluator.reset()
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    ious = []
    for record in DatasetCatalog.get(dataset_name):
        inputs = mapper(record)
        boxes = gt_boxes_of(record)
        inst = ellipse_instances(boxes, np.ones(len(boxes)), record["height"], record["width"])
        evaluator.process([inputs], [{"instances": inst}])
        ious += prompt_ious(record, inst.pred_masks)
    return {**evaluator.evaluate(), "prompted": _mean_iou(ious)}


class EllipsesInDetections(torch.nn.Module):
    """A detector's outputs with each mask replaced by the ellipse inscribed in its box (the box
    prior on detector boxes); its score threshold is the detector's, so ``Trainer.test`` applies
    the same per-test-set score thresholds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def set_score_threshold(self, value: float) -> float:
        return self.model.set_score_threshold(value)

    @property
    def fitted_score_threshold(self):
        return getattr(self.model, "fitted_score_threshold", None)

    def forward(self, batched_inputs):
        outputs = self.model(batched_inputs)
        for out in outputs:
            inst = out["instances"].to("cpu")
            h, w = inst.image_size
            boxes = inst.pred_boxes.tensor.numpy()
            out["instances"] = ellipse_instances(boxes, inst.scores.numpy(), h, w)
        return outputs
