"""The benchmark's multiply-add counts and peak rates (benchmarks/flops.py)."""

import torch
from conftest import synthetic_input, tiny_cfg
from detectron2.modeling import build_model
from fvcore.nn import FlopCountAnalysis

from benchmarks import flops


class Products(torch.nn.Module):
    def forward(self, a, v, base, b1, b2):
        return torch.matmul(a, v).sum() + torch.baddbmm(base, b1, b2).sum()


def test_matmul_with_a_vector_and_baddbmm_are_counted():
    a, v = torch.randn(2, 3, 5), torch.randn(5)
    base, b1, b2 = torch.randn(4, 3, 6), torch.randn(4, 3, 7), torch.randn(4, 7, 6)
    fca = FlopCountAnalysis(Products(), (a, v, base, b1, b2))
    fca.set_op_handle("aten::matmul", flops._matmul_macs, "aten::baddbmm", flops._baddbmm_macs)
    fca.unsupported_ops_warnings(False)
    assert fca.total() == 2 * 3 * 5 + 4 * 3 * 6 * 7


def test_inference_and_training_counts_split_into_the_parts(one_thread):
    cfg = tiny_cfg(**{"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 4})
    torch.manual_seed(0)
    model = build_model(cfg)
    inp = synthetic_input()
    counts = flops.count_inference(model, inp)
    parts = {k: counts[k] for k in flops.PARTS}
    assert sum(parts.values()) == counts["total"]
    assert all(parts[k] > 0 for k in ("encoder", "pyramid", "rpn", "box_head", "mask_decoder"))
    # more than its blocks' linear layers alone: per token and block qkv 3d^2, projection d^2,
    # MLP 8d^2 (depth 2, width d = 64, 256 px in patches of 16: 16^2 tokens)
    tokens = (256 // 16) ** 2
    assert counts["encoder"] > 2 * tokens * (3 * 64 * 64 + 64 * 64 + 8 * 64 * 64)
    step = flops.count_train_step(model, inp)
    assert step["forward"] == sum(step[k] for k in flops.PARTS) - step["encoder"]
    trained = step["pyramid"] + step["rpn"] + step["box_head"]
    assert step["backward"] == int(2 * trained + step["mask_decoder"] / 2)


def test_peak_rate_is_measured(one_thread):
    rate = flops.peak_macs("float32", repeats=3)
    assert 1e8 < rate < 1e13  # between a slow core and a large GPU
