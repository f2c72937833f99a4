"""The model's inference settings are methods (DetectorSettings): each returns the previous value
and takes effect at the next inference."""

import torch
from conftest import synthetic_input, tiny_cfg
from detectron2.modeling import build_model


def test_score_threshold_and_detections_per_image():
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 5})
    model = build_model(cfg).eval()
    inp = synthetic_input(0)
    del inp["instances"]
    assert (model.score_threshold, model.detections_per_image) == (0.0, 5)
    assert len(model([inp])[0]["instances"]) == 5
    assert model.set_detections_per_image(2) == 5 and model.detections_per_image == 2
    assert len(model([inp])[0]["instances"]) == 2
    assert model.set_score_threshold(1.0) == 0.0 and model.score_threshold == 1.0
    assert len(model([inp])[0]["instances"]) == 0  # no sigmoid score passes 1
    assert model.set_score_threshold(0.0) == 1.0
    assert len(model([inp])[0]["instances"]) == 2
