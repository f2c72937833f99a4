"""benchmarks/measure.py: the parts of a run come from the model's own profiler labels; timing,
inputs and boxes."""

import torch
from conftest import synthetic_input, tiny_cfg
from detectron2.modeling import build_model

from benchmarks import measure
from benchmarks.phases import INFER_PARTS


def test_the_parts_of_an_inference_come_from_the_model_labels(one_thread):
    torch.manual_seed(0)
    opts = {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 3}
    model = build_model(tiny_cfg(**opts)).eval()
    timing = {}
    with torch.no_grad():
        out, parts = measure.labelled(lambda: model([synthetic_input(0)]), timing)
    assert len(out[0]["instances"]) == 3
    for part in INFER_PARTS:
        assert parts[part] > 0, parts
    inner = [f"decoder/block{i}" for i in range(2)] + ["decoder/upscaling"]
    assert all(parts[k] > 0 for k in inner + ["decoder/shared_image_side"]), parts
    # The labelled parts are disjoint and lie within the run.
    assert sum(parts[p] for p in INFER_PARTS) < timing["s"] < 10


def test_measure_warms_up_then_times_and_keeps_each_runs_extras():
    calls = []
    seconds, extras = measure.measure(lambda: calls.append(1) or {"n": len(calls)}, repeats=3)
    assert len(calls) == 4 and seconds >= 0
    assert [e["n"] for e in extras] == [2, 3, 4]
    assert measure.median_of(extras, "n") == 3 and measure.median_of(extras, "x") is None
    assert measure.peak_rss_gb() > 0


def test_synthetic_input_and_random_boxes():
    inp = measure.synthetic_input(10, size=128)
    assert tuple(inp["image"].shape) == (3, 128, 128) and len(inp["instances"]) == 10
    assert inp["sam_transform"] == "longest128"
    boxes = measure.random_boxes(5, size=256)
    assert boxes.shape == (5, 4) and (boxes[:, 2:] > boxes[:, :2]).all()
    assert torch.equal(boxes, measure.random_boxes(5, size=256))  # seeded


def test_bf16_wanted_follows_the_switch():
    assert measure.bf16_wanted("always") and not measure.bf16_wanted("never")
    assert measure.bf16_wanted("auto") == measure.native_bf16()
