"""How the mask head wires the losses: which crop, which image, which scale, which weight.

Boxes on whole pixels with crop size = box size make RoIAlign sample exactly the box's pixels,
so every expected value is computed from plain array slices with the numpy references of
test_losses.py.
"""

import numpy as np
import pytest
import torch
from test_modeling_losses import ref_bce, ref_dice, ref_levelset, ref_local_pairwise

from dessam_d2.data.synthetic import render_synthetic_image
from dessam_d2.modeling.criterion import MASK_LOSSES, DESSAMCriterion

WEIGHTS = dict(
    distill_weight=2.0,
    distill_bce_weight=3.0,
    distill_dice_weight=5.0,
    pairwise_weight=7.0,
    local_pairwise_weight=11.0,
    global_pairwise_weight=0.013,
)


def test_each_term_its_crop_its_image_its_scale_its_weight():
    rng = np.random.default_rng(0)
    size, crop = 32, 8
    student = rng.normal(0, 3, (2, 1, size, size))
    teacher = rng.normal(0, 3, (2, 1, size, size))
    images = rng.uniform(0, 255, (2, size, size, 3))
    # RoI 0 lies in image 1 and RoI 1 in image 0: a crop taken from the wrong image shows.
    boxes = np.array([[4, 10, 12, 18], [20, 2, 28, 10]], float)
    image_ids = np.array([1, 0])
    crit = DESSAMCriterion(image_size=size, crop_size=crop, **WEIGHTS)
    losses = crit(
        torch.tensor(student).float(),
        torch.tensor(teacher).float(),
        torch.tensor(images).permute(0, 3, 1, 2).float(),
        torch.tensor(boxes).float(),
        torch.tensor(image_ids),
    )
    assert set(losses) == set(MASK_LOSSES)
    target = (teacher > 0).astype(float)
    crops = [student[r, 0, y0:y1, x0:x1] for r, (x0, y0, x1, y1) in enumerate(boxes.astype(int))]
    rgb = [images[i, y0:y1, x0:x1] for i, (x0, y0, x1, y1) in zip(image_ids, boxes.astype(int))]
    crops, rgb = np.stack(crops), np.stack(rgb)
    expected = {
        "loss_distill_bce": 2 * 3 * ref_bce(student, target),
        "loss_distill_dice": 2 * 5 * ref_dice(student, target),
        "loss_local_pairwise": 7 * 11 * ref_local_pairwise(crops, rgb),
        "loss_global_levelset": 7 * 0.013 * ref_levelset(crops, rgb),
    }
    for name, value in expected.items():
        # 1 % for OpenCV's Lab (up to 0.2 units from ours) in the colour weights of L_lp.
        assert losses[name].item() == pytest.approx(value, rel=1e-2), name


def test_the_crop_follows_the_low_resolution_mask_frame():
    # Student logits at a quarter of the input resolution (SAM's 4h x 4w = S / 4 frame): the
    # crop of box (8, 8, 24, 24) in the 64 px input is mask pixels 2..6.
    crit = DESSAMCriterion(image_size=64, crop_size=4)
    student = torch.arange(16 * 16, dtype=torch.float32).view(1, 1, 16, 16)
    images = torch.zeros(1, 3, 64, 64)
    logits, _ = crit.edge_crops(
        student, images, torch.tensor([[8.0, 8.0, 24.0, 24.0]]), torch.tensor([0])
    )
    assert torch.equal(logits[0, 0], student[0, 0, 2:6, 2:6])


def nucleus_scene():
    """A real-looking crop: the synthetic cytology's first nucleus of seed 0, its box, its mask."""
    image, masks = render_synthetic_image(np.random.default_rng(0), (256, 256), (5, 20))
    mask = max(masks, key=lambda m: m.sum())
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
    return image, mask, box


def test_every_weighted_term_carries_weight_at_a_realistic_scale():
    """With the paper's weights, a half-right student on a real-looking nucleus: no term is
    silently off (each within two orders of magnitude of the others)."""
    image, mask, box = nucleus_scene()
    shift = int((box[2] - box[0]) / 4)
    half_right = np.roll(mask, shift, axis=1)  # the nucleus moved by half its radius
    low = lambda m: torch.nn.functional.interpolate(  # noqa: E731
        torch.tensor(m, dtype=torch.float32)[None, None], (64, 64), mode="area"
    )
    student = (low(half_right) - 0.5) * 8
    teacher = (low(mask) - 0.5) * 16
    crit = DESSAMCriterion(image_size=256)
    rgb = torch.tensor(image).permute(2, 0, 1)[None].float()
    losses = crit(student, teacher, rgb, torch.tensor(box)[None].float(), torch.tensor([0]))
    values = {k: v.item() for k, v in losses.items()}
    assert all(v > 0 for v in values.values()), values
    assert max(values.values()) / min(values.values()) < 100, values
    # The level-set term sees RGB on the 0-255 scale: on [0, 1] it would be ~65000x smaller.
    assert values["loss_global_levelset"] > 1e-2, values


def test_a_right_student_costs_less_than_a_half_right_one_in_every_term():
    image, mask, box = nucleus_scene()
    low = lambda m: torch.nn.functional.interpolate(  # noqa: E731
        torch.tensor(m, dtype=torch.float32)[None, None], (64, 64), mode="area"
    )
    teacher = (low(mask) - 0.5) * 16
    crit = DESSAMCriterion(image_size=256)
    rgb = torch.tensor(image).permute(2, 0, 1)[None].float()
    args = (rgb, torch.tensor(box)[None].float(), torch.tensor([0]))
    right = crit((low(mask) - 0.5) * 8, teacher, *args)
    shift = int((box[2] - box[0]) / 4)
    wrong = crit((low(np.roll(mask, shift, axis=1)) - 0.5) * 8, teacher, *args)
    for name in MASK_LOSSES:
        assert right[name].item() < wrong[name].item(), name
