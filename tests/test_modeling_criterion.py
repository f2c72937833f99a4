"""How the mask head wires the losses: which crop, which image, which scale, which weight.

Boxes on whole pixels with crop size = box size make RoIAlign sample exactly the box's pixels,
so every expected value is computed from plain array slices with the numpy references of
test_losses.py.
"""

import functools

import cv2
import numpy as np
import pytest
import torch
from test_modeling_losses import ref_bce, ref_dice, ref_levelset, ref_local_pairwise

from dessam_d2.data.synthetic.cytology import render_synthetic_image
from dessam_d2.modeling.criterion import MASK_LOSSES, DESSAMCriterion
from dessam_d2.modeling.losses import distillation_loss

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


# ---- the paper's scale: 1024 px input, 256 x 256 low-res masks, ~100 positive RoIs -------------

RELEASE_DISTILL = dict(distill_reduction="sum", distill_bce_weight=0.5, distill_dice_weight=0.01)


def _sam_like_logits(mask, box, slope=6.0, saturation=15.0):
    """SAM-like low-res logits of a full-resolution mask: the signed distance to its outline in
    low-res pixels (4 input pixels each) times ``slope``, saturating at +-``saturation``.
    Computed in a window 64 px around ``box`` (XYXY): farther out the logit is saturated."""
    h, w = mask.shape
    x0, y0 = (max(0, int(v) - 64) // 4 * 4 for v in box[:2])
    x1, y1 = (min(s, int(v) + 64) for v, s in zip(box[2:], (w, h)))
    m = np.ascontiguousarray(mask[y0:y1, x0:x1], dtype=np.uint8)
    inside = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    outside = cv2.distanceTransform(1 - m, cv2.DIST_L2, 5)
    signed = np.clip((inside - outside)[2::4, 2::4] / 4.0, -10, 10)  # at low-res pixel centres
    logits = np.full((h // 4, w // 4), -saturation, np.float32)
    logits[y0 // 4 : y0 // 4 + signed.shape[0], x0 // 4 : x0 // 4 + signed.shape[1]] = np.clip(
        slope * signed, -saturation, saturation
    )
    return logits


def paper_scale_scene(seed=0, nuclei=25, rois_per_nucleus=4):
    """DES-SAM's training frame at the paper's size: a 1024 x 1024 synthetic cytology image with
    ``nuclei`` nuclei (radius 12-32 px), the teacher's SAM-like logits of each nucleus and,
    per nucleus, ``rois_per_nucleus`` positive RoIs whose student sees the nucleus of a box
    off by 2-12 px on each side (its mask moved and stretched accordingly).

    Returns student and teacher logits (R x 1 x 256 x 256, float32), the image (1 x 3 x 1024 x
    1024 RGB, 0-255), the R matched ground-truth boxes and their image ids.
    """
    rng = np.random.default_rng(seed)
    image, masks = render_synthetic_image(rng, (1024, 1024), (nuclei, nuclei), (12.0, 32.0))
    students, teachers, boxes = [], [], []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)
        teacher = _sam_like_logits(mask, box)
        for _ in range(rois_per_nucleus):
            # Each box side off by 2-12 px, either way: the student's nucleus is the GT mask
            # warped onto the student's box.
            off = rng.uniform(2, 12, 4) * rng.choice([-1, 1], 4)
            x0, y0, x1, y1 = box + off
            sx, sy = (x1 - x0) / (box[2] - box[0]), (y1 - y0) / (box[3] - box[1])
            warp = np.float32([[sx, 0, x0 - sx * box[0]], [0, sy, y0 - sy * box[1]]])
            moved = cv2.warpAffine(mask.astype(np.uint8), warp, (1024, 1024), flags=0)
            students.append(_sam_like_logits(moved, np.minimum(box, box + off)))
            teachers.append(teacher)
            boxes.append(box)
    as_tensor = lambda a: torch.tensor(np.stack(a), dtype=torch.float32)[:, None]  # noqa: E731
    rgb = torch.tensor(image, dtype=torch.float32).permute(2, 0, 1)[None]
    gt = torch.tensor(np.stack(boxes), dtype=torch.float32)
    return as_tensor(students), as_tensor(teachers), rgb, gt, torch.zeros(len(gt), dtype=torch.long)


def distill_shares(student, teacher, **weights):
    """BCE's share of L_distill and of its gradient w.r.t. the student's logits (L2 norms):
    (w_bce BCE, w_dice Dice, loss share, gradient share)."""
    crit = DESSAMCriterion(image_size=1024, **weights)
    student = student.clone().requires_grad_(True)
    bce, dice = distillation_loss(student, teacher, crit.distill_reduction)
    bce, dice = crit.w_bce * bce, crit.w_dice * dice
    (g_bce,) = torch.autograd.grad(bce, student)
    (g_dice,) = torch.autograd.grad(dice, student)
    n_bce, n_dice = g_bce.norm().item(), g_dice.norm().item()
    return bce.item(), dice.item(), bce.item() / (bce + dice).item(), n_bce / (n_bce + n_dice)


@functools.lru_cache(maxsize=1)
def paper_scene():
    return paper_scale_scene(seed=0)  # 100 positive RoIs over 25 nuclei


def test_at_the_paper_scale_the_averaged_l_distill_is_almost_all_dice():
    """Averaged over 100 RoIs x 256^2 pixels with weights 1 and 1 (MODEL.DESSAM.DISTILL_REDUCTION
    "mean"), BCE on saturated logits is ~1.5 % of L_distill and ~2 % of its gradient
    (docs/METHOD.md)."""
    student, teacher, *_ = paper_scene()
    bce, dice, loss_share, grad_share = distill_shares(student, teacher)
    assert (bce, dice) == pytest.approx((0.00478, 0.313), rel=0.02)
    assert loss_share == pytest.approx(0.015, abs=0.002)
    assert grad_share == pytest.approx(0.020, abs=0.002)


def test_at_the_paper_scale_the_release_sums_l_distill_over_the_rois():
    """The release's form (DISTILL_REDUCTION "sum", BCE x 0.5, Dice x 0.01): each term summed
    over the 100 RoIs, BCE ~43 % of L_distill and ~50 % of its gradient."""
    student, teacher, *_ = paper_scene()
    rois = len(student)
    bce_mean, dice_mean, _, _ = distill_shares(student, teacher)
    bce, dice, loss_share, grad_share = distill_shares(student, teacher, **RELEASE_DISTILL)
    assert bce == pytest.approx(0.5 * rois * bce_mean, rel=1e-4)
    assert dice == pytest.approx(0.01 * rois * dice_mean, rel=1e-4)
    assert loss_share == pytest.approx(0.43, abs=0.02)
    assert grad_share == pytest.approx(0.50, abs=0.02)


def test_every_weighted_mask_term_at_the_paper_scale():
    """The weighted mask terms docs/METHOD.md quotes, both forms of L_distill (seed 0)."""
    expected = {
        "mean": (0.00478, 0.313, 0.0358, 1.615),
        "sum": (0.239, 0.313, 0.0358, 1.615),
    }
    for form, weights in (("mean", {}), ("sum", RELEASE_DISTILL)):
        with torch.no_grad():
            losses = DESSAMCriterion(image_size=1024, **weights)(*paper_scene())
        values = tuple(losses[k].item() for k in MASK_LOSSES)
        assert values == pytest.approx(expected[form], rel=0.02), form


def test_local_pairwise_differences_pair_the_pixels_its_colour_weights_pair():
    """|p_i - p_j| is taken at the colour weights' dilation (2), on the crop the weights come
    from: on a uniform image, columns alternating between certain nucleus and certain background
    differ only at distance 1, so L_lp is 0 (the release's differences at dilation 1 against
    weights at dilation 2 would give ~0.74); columns alternating in pairs differ at distance 2."""
    crit = DESSAMCriterion(image_size=32, crop_size=32, pairwise_weight=1.0)
    rgb = torch.full((1, 3, 32, 32), 128.0)
    args = (rgb, torch.tensor([[0.0, 0.0, 32.0, 32.0]]), torch.tensor([0]))
    column = torch.arange(32)
    for period, expected in ((2, 0.0), (4, None)):
        stripes = ((column // (period // 2)) % 2 * 2 - 1).float().expand(32, 32) * 20
        logits = stripes[None, None]
        local = crit(logits, logits, *args)["loss_local_pairwise"].item()
        if expected is None:  # by hand: 6 of the 8 neighbours of each pixel differ
            expected = ref_local_pairwise(stripes[None].numpy(), rgb.permute(0, 2, 3, 1).numpy())
            assert expected > 0.7
        assert local == pytest.approx(expected, abs=1e-6), period


def test_without_distillation_no_teacher_terms_and_projection_when_asked():
    size = 32
    student = torch.randn(2, 1, size, size)
    images = torch.rand(2, 3, size, size) * 255
    boxes = torch.tensor([[4.0, 10.0, 12.0, 18.0], [20.0, 2.0, 28.0, 10.0]])
    ids = torch.tensor([1, 0])
    crit = DESSAMCriterion(image_size=size, crop_size=8, distill_weight=0.0, projection_weight=2.0)
    assert not crit.needs_teacher
    assert crit.loss_names == ("loss_local_pairwise", "loss_global_levelset", "loss_projection")
    losses = crit(student, None, images, boxes, ids)
    assert set(losses) == set(crit.loss_names)
    from dessam_d2.modeling.losses import projection_loss

    assert losses["loss_projection"].item() == pytest.approx(
        2 * projection_loss(student, boxes, size).item()
    )
    default = DESSAMCriterion(image_size=size, crop_size=8)
    assert default.needs_teacher and default.loss_names == MASK_LOSSES
