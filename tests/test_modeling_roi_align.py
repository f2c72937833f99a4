"""SparseROIAlign: Detectron2's ROIAlign as a sparse matrix product on a CPU. Outputs and
gradients equal torchvision's roi_align; the box heads use it (MODEL.DESSAM.FAST_ROI_ALIGN)."""

import pytest
import torch
from conftest import tiny_cfg
from detectron2.layers import ROIAlign
from detectron2.modeling import build_model
from detectron2.structures import Boxes
from torchvision.ops import roi_align

from dessam_d2.modeling import roi_align as sparse_roi_align
from dessam_d2.modeling.roi_align import SparseROIAlign, roi_align_matrix


def edge_rois(dtype=torch.float64, n=60, seed=0):
    """Random RoIs on 2 images of 20 x 30 px (stride 4), with the border cases of the kernel:
    entirely outside, zero size, inverted, the whole map, beyond its right/bottom edge."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 160 - 20
    wh = torch.rand(n, 2, generator=g) * 60
    batch = torch.randint(0, 2, (n, 1), generator=g).to(dtype)
    rois = torch.cat([batch, xy.to(dtype), (xy + wh).to(dtype)], 1)
    special = [[-30, -30, -10, -10], [3, 3, 3, 3], [100, 70, 50, 20], [0, 0, 120, 80],
               [100, 60, 130, 95], [-3, -3, 2, 2], [118.5, 78.5, 119.9, 79.9]]  # fmt: skip
    rois[: len(special), 1:] = torch.tensor(special, dtype=dtype)
    return rois


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("output_size", [(7, 7), (5, 3)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_torchvision_forward_and_backward(aligned, sampling_ratio, output_size, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 20, 30, dtype=dtype, requires_grad=True)
    rois = edge_rois(dtype)
    ref = roi_align(x, rois, output_size, 0.25, sampling_ratio, aligned)
    grad = torch.randn_like(ref)
    (ref_grad,) = torch.autograd.grad(ref, x, grad)
    out = SparseROIAlign(output_size, 0.25, sampling_ratio, aligned)(x, rois)
    (out_grad,) = torch.autograd.grad(out, x, grad)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert out.shape == ref.shape and out.dtype == dtype and out.is_contiguous()
    assert ref.abs().max() > 0.5  # not all empty cells
    torch.testing.assert_close(out, ref, atol=tol, rtol=0)
    torch.testing.assert_close(out_grad, ref_grad, atol=tol, rtol=0)
    assert out_grad.is_contiguous()


def test_the_matrix_rows_average_the_bilinear_weights():
    # An RoI well inside the map: every row's weights sum to 1 (an average of bilinear
    # interpolations), and an RoI outside it has empty rows.
    rois = torch.tensor([[0, 8.0, 8.0, 40.0, 36.0], [0, -50.0, -50.0, -30.0, -30.0]])
    m = roi_align_matrix(rois, (1, 20, 30), (7, 7), 0.25, 0, True).to_dense()
    assert m.shape == (2 * 49, 600)
    torch.testing.assert_close(m[:49].sum(1), torch.ones(49))
    assert m[49:].abs().sum() == 0


def test_bfloat16_features_keep_float32_boxes():
    # Detectron2's ROIAlign casts the boxes to the features' dtype: in bfloat16 a coordinate
    # near 1000 px moves by up to 2 px. SparseROIAlign samples at the float32 boxes.
    torch.manual_seed(0)
    x = torch.randn(1, 16, 256, 256)
    rois = torch.tensor([[0, 1001.3, 903.7, 1019.1, 1017.9], [0, 517.2, 611.6, 549.8, 640.3]])
    with torch.autocast("cpu", torch.bfloat16):
        out = SparseROIAlign((7, 7), 0.25, 0, True)(x.bfloat16(), rois)
        rounded = ROIAlign((7, 7), 0.25, 0, True)(x.bfloat16(), rois)
    assert out.dtype == torch.bfloat16 and rounded.dtype == torch.bfloat16
    ref = roi_align(x.bfloat16().float(), rois, (7, 7), 0.25, 0, True)
    err = (out.float() - ref).abs().max()
    assert err < 0.02  # the output's bfloat16 rounding only
    assert (rounded.float() - ref).abs().max() > 5 * err


def test_bfloat16_gradient_reaches_the_features():
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    rois = edge_rois(torch.float32)
    rois[:, 0] = 0
    with torch.autocast("cpu", torch.bfloat16):
        out = SparseROIAlign((7, 7), 0.25, 0, True)(x.bfloat16(), rois)
    (g,) = torch.autograd.grad(out.float().sum(), x)
    (ref,) = torch.autograd.grad(roi_align(x, rois, (7, 7), 0.25, 0, True).sum(), x)
    assert g.dtype == torch.float32
    torch.testing.assert_close(g, ref, atol=2e-2, rtol=1e-2)


def test_empty_and_bad_rois():
    m = SparseROIAlign((7, 7), 0.25, 0, True)
    x = torch.randn(1, 4, 16, 16, requires_grad=True)
    out = m(x, torch.zeros(0, 5))
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()  # no error
    nan = torch.tensor([[0, float("nan"), 1.0, 20.0, 20.0], [0, 1.0, 1.0, float("inf"), 9.0]])
    assert torch.isfinite(m(x, nan)).all()
    with pytest.raises(ValueError, match="batch index"):
        m(x, torch.tensor([[1, 1.0, 1.0, 20.0, 20.0]]))
    with pytest.raises(ValueError, match="R x 5"):
        m(x, torch.zeros(3, 4))


def test_above_the_size_cap_torchvision_runs(monkeypatch):
    calls = []
    real = ROIAlign.forward
    monkeypatch.setattr(ROIAlign, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    x = torch.randn(2, 8, 20, 30, dtype=torch.float64)
    rois = edge_rois()
    m = SparseROIAlign((7, 7), 0.25, 0, True)
    fast = m(x, rois)
    assert calls == []
    monkeypatch.setattr(sparse_roi_align, "MAX_ENTRIES", 1000)
    slow = m(x, rois)
    assert calls == [1]
    torch.testing.assert_close(fast, slow, atol=1e-12, rtol=0)


def test_the_box_head_pools_with_it_and_checkpoints_do_not_change():
    fast = build_model(tiny_cfg()).eval()
    slow = build_model(tiny_cfg(**{"MODEL.DESSAM.FAST_ROI_ALIGN": False})).eval()
    levels = fast.roi_heads.box_pooler.level_poolers
    assert len(levels) > 1 and all(type(p) is SparseROIAlign for p in levels)
    assert all(type(p) is ROIAlign for p in slow.roi_heads.box_pooler.level_poolers)
    assert fast.state_dict().keys() == slow.state_dict().keys()
    slow.load_state_dict(fast.state_dict())
    # The same pooled features on every level the box head reads (boxes of every size).
    shapes = fast.backbone.output_shape()
    torch.manual_seed(0)
    feats = [torch.randn(1, shapes[f].channels, 256 // shapes[f].stride, 256 // shapes[f].stride)
             for f in fast.roi_heads.box_in_features]  # fmt: skip
    boxes = [Boxes(torch.tensor([[20.0, 30, 60, 70], [10, 12, 140, 150], [0, 0, 256, 256]]))]
    a = fast.roi_heads.box_pooler(feats, boxes)
    b = slow.roi_heads.box_pooler(feats, boxes)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
