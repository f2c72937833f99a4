"""Where masks and boxes land: DESSAM.postprocess maps the padded SAM frame back to the image.

The mask logits are hand-built in the padded square frame (S/4 x S/4 cells of 4 px), with a
rectangle of +10 in a sea of -10 (far from any binarisation threshold); its place on the
original image is computed by hand from the resize factor of a non-square image.
"""

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from dessam_d2.data.transforms import sam_model_input


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(tiny_cfg()).eval()  # image_size 256: 64 x 64 logits, 4 px per cell


@pytest.mark.parametrize("height, width", [(150, 300), (300, 150), (123, 301), (40, 64)])
def test_a_mask_lands_where_computed_by_hand(model, height, width):
    size = model.image_size
    image = np.zeros((height, width, 3), np.uint8)
    model_input, _ = sam_model_input(image, size)
    h, w = model_input["image"].shape[-2:]  # the resized frame inside the padded square
    assert max(h, w) == size and (h, w) != (height, width)  # resize factor != 1, not square
    cell = size // 64
    # A rectangle of cells inside the resized frame: rows r0..r1, columns c0..c1 (exclusive).
    r0, r1 = h // cell // 4, h // cell // 2
    c0, c1 = w // cell // 3, 3 * w // cell // 4
    logits = torch.full((1, 1, 64, 64), -10.0)
    logits[..., r0:r1, c0:c1] = 10.0
    # The same rectangle in original pixels: padded frame px * (original / resized).
    sy, sx = height / h, width / w
    y0, y1, x0, x1 = r0 * cell * sy, r1 * cell * sy, c0 * cell * sx, c1 * cell * sx

    results = Instances((h, w))
    results.pred_boxes = Boxes(torch.tensor([[c0 * cell, r0 * cell, c1 * cell, r1 * cell]]).float())
    results.scores = torch.ones(1)
    results.pred_classes = torch.zeros(1, dtype=torch.int64)
    results.pred_mask_logits = logits
    out = model.postprocess(results, model_input, (h, w))

    assert out.image_size == (height, width)
    mask = out.pred_masks[0].numpy()
    assert mask.shape == (height, width)
    # Pixel centres more than 1.5 px (of the coarser axis' scale) from the edge are certain;
    # the bilinear ramp across one cell decides the others.
    yc = np.arange(height)[:, None] + 0.5
    xc = np.arange(width)[None, :] + 0.5
    m = 1.5 * max(sy, sx)
    inside = (yc > y0 + m) & (yc < y1 - m) & (xc > x0 + m) & (xc < x1 - m)
    outside = (yc < y0 - m) | (yc > y1 + m) | (xc < x0 - m) | (xc > x1 + m)
    assert mask[inside].all() and not mask[outside].any()
    assert mask.sum() == pytest.approx((y1 - y0) * (x1 - x0), rel=0.1)
    expected_box = [x0, y0, x1, y1]
    assert out.pred_boxes.tensor[0].tolist() == pytest.approx(expected_box, abs=1e-3)


@pytest.mark.parametrize(
    "input_size, original_size",
    [((256, 200), (300, 234)), ((120, 256), (60, 128)), ((7, 256), (7, 256))],
)
def test_mask_logits_to_original_gives_segment_anythings_postprocess_masks(
    input_size, original_size
):
    """Our function, with the padded side as a parameter, against ``Sam.postprocess_masks`` (which
    reads only ``image_encoder.img_size`` of its ``self``): the same numbers, bit for bit."""
    from types import SimpleNamespace

    from segment_anything.modeling import Sam

    from dessam_d2.modeling.postprocess import mask_logits_to_original

    torch.manual_seed(0)
    logits = torch.randn(5, 1, 64, 64) * 10
    sam = SimpleNamespace(image_encoder=SimpleNamespace(img_size=256))
    expected = Sam.postprocess_masks(sam, logits, input_size, original_size)
    ours = mask_logits_to_original(logits, 256, input_size, original_size)
    assert ours.shape == (5, 1, *original_size) and torch.equal(ours, expected)


@pytest.mark.parametrize("n", [0, 1, 16, 33])
def test_masks_across_chunks_equal_the_whole_batch_thresholded_at_once(n):
    """detections_to_original writes the bool masks 16 at a time into one tensor: the same as
    upsampling every logit map at once, at every chunk boundary, and empty for no detection."""
    from dessam_d2.modeling.postprocess import detections_to_original, mask_logits_to_original

    torch.manual_seed(0)
    r = Instances((256, 200))
    r.pred_boxes = Boxes(torch.tensor([[10.0, 10.0, 50.0, 60.0]]).repeat(n, 1))
    r.scores = torch.rand(n)
    r.pred_classes = torch.zeros(n, dtype=torch.int64)
    r.pred_mask_logits = torch.randn(n, 1, 64, 64).to(torch.bfloat16)
    out = detections_to_original(r, (256, 200), (300, 234), 256, 0.5)
    whole = mask_logits_to_original(r.pred_mask_logits.float(), 256, (256, 200), (300, 234))
    assert out.pred_masks.dtype == torch.bool and out.pred_masks.shape == (n, 300, 234)
    assert torch.equal(out.pred_masks, whole[:, 0] > 0.5)
