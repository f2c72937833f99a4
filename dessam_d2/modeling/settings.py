"""Inference settings of a Detectron2 R-CNN as public methods, for the callers that change them
while the model lives (per-test-set score thresholds, benchmarks at a fixed detection count),
and the detector state a checkpoint carries besides the weights (``detector_state``): the score
threshold fitted after training and the anchors, which may have been fitted to the training
boxes (``MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES``) and so need not be the config's."""

from typing import Dict, List, Optional

import torch

__all__ = ["DetectorSettings"]


class DetectorSettings:
    """Mixin for a model whose ``roi_heads.box_predictor`` is Detectron2's
    ``FastRCNNOutputLayers`` and whose ``proposal_generator`` is Detectron2's RPN (DESSAM;
    Detectron2's GeneralizedRCNN as the demo's reference). Each setter returns the previous
    value, to restore it."""

    fitted_score_threshold: Optional[float] = None

    @property
    def score_threshold(self) -> float:
        """The box score a detection needs at inference (MODEL.ROI_HEADS.SCORE_THRESH_TEST)."""
        return self.roi_heads.box_predictor.test_score_thresh

    def set_score_threshold(self, value: float) -> float:
        predictor = self.roi_heads.box_predictor
        previous, predictor.test_score_thresh = predictor.test_score_thresh, value
        return previous

    def set_fitted_score_threshold(self, value: Optional[float]) -> None:
        """The threshold fitted on the training boxes (TEST.SCORE_THRESH_AUTO), or None: it is
        saved with the model and becomes its score threshold."""
        self.fitted_score_threshold = None if value is None else float(value)
        if value is not None:
            self.set_score_threshold(float(value))

    @property
    def detections_per_image(self) -> int:
        """The most detections kept per image (TEST.DETECTIONS_PER_IMAGE)."""
        return self.roi_heads.box_predictor.test_topk_per_image

    def set_detections_per_image(self, n: int) -> int:
        predictor = self.roi_heads.box_predictor
        previous, predictor.test_topk_per_image = predictor.test_topk_per_image, n
        return previous

    def cell_anchors(self) -> List[torch.Tensor]:
        """The anchor generator's cell anchors, one A x 4 tensor per pyramid level."""
        return list(self.proposal_generator.anchor_generator.cell_anchors)

    def detector_state(self) -> Dict:
        """What a checkpoint keeps besides the state dict (the cell anchors are not in it)."""
        anchors = [a.detach().cpu().clone() for a in self.cell_anchors()]
        return {"score_threshold": self.fitted_score_threshold, "cell_anchors": anchors}

    def load_detector_state(self, state: Dict) -> Optional[str]:
        """Restore ``detector_state()``; returns why it does not fit this model, else None."""
        anchors = state.get("cell_anchors")
        if anchors is not None:
            mine = self.cell_anchors()
            shapes = [tuple(a.shape) for a in anchors]
            if shapes != [tuple(a.shape) for a in mine]:
                return (
                    f"its anchors {shapes} are not this config's {[tuple(a.shape) for a in mine]}"
                )
            for buffer, saved in zip(mine, anchors):
                buffer.copy_(saved.to(buffer))
        self.set_fitted_score_threshold(state.get("score_threshold"))
        return None
