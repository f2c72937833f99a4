"""Inference settings of a Detectron2 R-CNN as public methods, for the callers that change them
while the model lives (per-test-set score thresholds, benchmarks at a fixed detection count)."""

__all__ = ["DetectorSettings"]


class DetectorSettings:
    """Mixin for a model whose ``roi_heads.box_predictor`` is Detectron2's
    ``FastRCNNOutputLayers`` (DESSAM; Detectron2's GeneralizedRCNN as the demo's reference).
    Each setter returns the previous value, to restore it."""

    @property
    def score_threshold(self) -> float:
        """The box score a detection needs at inference (MODEL.ROI_HEADS.SCORE_THRESH_TEST)."""
        return self.roi_heads.box_predictor.test_score_thresh

    def set_score_threshold(self, value: float) -> float:
        predictor = self.roi_heads.box_predictor
        previous, predictor.test_score_thresh = predictor.test_score_thresh, value
        return previous

    @property
    def detections_per_image(self) -> int:
        """The most detections kept per image (TEST.DETECTIONS_PER_IMAGE)."""
        return self.roi_heads.box_predictor.test_topk_per_image

    def set_detections_per_image(self, n: int) -> int:
        predictor = self.roi_heads.box_predictor
        previous, predictor.test_topk_per_image = predictor.test_topk_per_image, n
        return previous
