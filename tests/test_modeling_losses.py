"""Each DES-SAM loss against a value computed by hand or by an independent numpy reference."""

import math

import cv2
import numpy as np
import pytest
import torch

from dessam_d2.modeling.losses import (
    boxinst_pairwise_loss,
    color_similarity,
    dice_loss,
    distillation_loss,
    levelset_energy,
    local_pairwise_loss,
    projection_loss,
    rgb_to_lab,
    soft_dice_loss,
)

# ---- independent references (numpy, OpenCV's Lab, explicit neighbour offsets) -------------------


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def ref_bce(logits, target):
    p = np_sigmoid(logits.astype(np.float64))
    return float(np.mean(-(target * np.log(p) + (1 - target) * np.log(1 - p))))


def ref_dice(logits, target, eps=1.0):
    """1 - Dice per instance (first axis), averaged; the smoothing eps = 1 of the module."""
    p = np_sigmoid(logits.astype(np.float64)).reshape(len(logits), -1)
    t = target.reshape(len(target), -1)
    return float(np.mean(1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)))


def ref_local_pairwise(logits, rgb, dilation=2):
    """sum w_ij |p_i - p_j| / sum w_ij over the 8 dilated neighbours inside each crop, with
    w = exp(-0.5 ||lab_i - lab_j||) from OpenCV's L*a*b*. logits N x H x W, rgb N x H x W x 3."""
    num = den = 0.0
    for lg, im in zip(logits, rgb):
        p = np_sigmoid(lg.astype(np.float64))
        lab = cv2.cvtColor((im / 255.0).astype(np.float32), cv2.COLOR_RGB2Lab).astype(np.float64)
        h, w = p.shape
        for dy in (-dilation, 0, dilation):
            for dx in (-dilation, 0, dilation):
                if dy == dx == 0:
                    continue
                ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
                yn, xn = slice(max(0, dy), min(h, h + dy)), slice(max(0, dx), min(w, w + dx))
                wgt = np.exp(-0.5 * np.linalg.norm(lab[ys, xs] - lab[yn, xn], axis=-1))
                num += (wgt * np.abs(p[ys, xs] - p[yn, xn])).sum()
                den += wgt.sum()
    return num / den


def ref_levelset(logits, rgb):
    """Chan-Vese energy sum_c sum_x [(I - m_in)^2 p + (I - m_out)^2 (1 - p)] / (C H W), mean over
    instances; logits N x H x W, rgb N x H x W x 3 on the 0-255 scale."""
    out = []
    for lg, im in zip(logits, rgb):
        p = np_sigmoid(lg.astype(np.float64))[..., None]
        im = im.astype(np.float64)
        m_in = (im * p).sum((0, 1)) / (p.sum() + 1e-6)
        m_out = (im * (1 - p)).sum((0, 1)) / ((1 - p).sum() + 1e-6)
        out.append(((im - m_in) ** 2 * p + (im - m_out) ** 2 * (1 - p)).mean())
    return float(np.mean(out))


# ---- small hand-made cases ----------------------------------------------------------------------


def test_dice_of_identical_masks_is_zero_and_of_disjoint_masks_near_one():
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :2] = 1
    assert soft_dice_loss(m, m).item() == 0.0
    # Disjoint (4 and 12 pixels): 1 - (0 + 1) / (4 + 12 + 1) with the smoothing eps = 1.
    assert soft_dice_loss(m, 1 - m).item() == pytest.approx(1 - 1 / 17)


def test_distillation_against_a_zero_logit_student_is_log2_and_dice_by_hand():
    student = torch.zeros(2, 1, 4, 4)
    teacher = torch.full((2, 1, 4, 4), -3.0)
    teacher[:, :, :2] = 3.0  # 8 of 16 pixels are nucleus
    bce, dice = distillation_loss(student, teacher)
    assert bce.item() == pytest.approx(math.log(2))
    # p = 0.5 everywhere: 1 - (2 * 4 + 1) / (8 + 8 + 1)
    assert dice.item() == pytest.approx(1 - 9 / 17)
    assert dice_loss(teacher * 100, (teacher > 0).float()).item() == pytest.approx(0, abs=1e-6)


def test_distillation_target_is_the_binarised_teacher_not_its_probability():
    # A confident student that agrees with [Y_t > 0] costs almost nothing even though the
    # teacher itself is unsure (logits +-0.2): a soft target sigmoid(Y_t) would cost ~0.69.
    teacher = torch.tensor([0.2, -0.2, 0.2, -0.2]).view(1, 1, 2, 2)
    student = torch.tensor([12.0, -12.0, 12.0, -12.0]).view(1, 1, 2, 2)
    bce, dice = distillation_loss(student, teacher)
    assert bce.item() < 1e-4 and dice.item() < 1e-4
    rng = np.random.default_rng(0)
    s, t = rng.normal(0, 2, (3, 1, 8, 8)), rng.normal(0, 2, (3, 1, 8, 8))
    bce, dice = distillation_loss(torch.tensor(s), torch.tensor(t))
    assert bce.item() == pytest.approx(ref_bce(s, (t > 0).astype(float)), rel=1e-6)
    assert dice.item() == pytest.approx(ref_dice(s, (t > 0).astype(float)), rel=1e-6)


def test_distillation_sum_form_adds_each_instances_pixel_mean_bce_and_dice():
    """The release's reduction: per instance the BCE averaged over its pixels and 1 - Dice, then
    summed over the instances (numpy references on each instance alone)."""
    rng = np.random.default_rng(3)
    student = rng.normal(0, 4, (5, 1, 12, 12))
    teacher = rng.normal(0, 4, (5, 1, 12, 12))
    target = (teacher > 0).astype(float)
    bce, dice = distillation_loss(torch.tensor(student), torch.tensor(teacher), "sum")
    assert bce.item() == pytest.approx(sum(ref_bce(s, t) for s, t in zip(student, target)))
    assert dice.item() == pytest.approx(
        sum(ref_dice(s[None], t[None]) for s, t in zip(student, target))
    )
    mean = distillation_loss(torch.tensor(student), torch.tensor(teacher))
    assert [m.item() for m in mean] == pytest.approx([bce.item() / 5, dice.item() / 5])
    with pytest.raises(ValueError, match="reduction 'max'"):
        distillation_loss(torch.tensor(student), torch.tensor(teacher), "max")


def test_rgb_to_lab_known_colours_and_opencv():
    rgb = torch.tensor([[255.0, 0, 255], [255.0, 0, 0], [255.0, 0, 0]]).view(1, 3, 1, 3)
    lab = rgb_to_lab(rgb)[0, :, 0].T  # white, black, red
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert lab[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.05)
    assert lab[2].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)
    img = np.random.default_rng(1).uniform(0, 255, (5, 7, 3)).astype(np.float32)
    ours = rgb_to_lab(torch.from_numpy(img).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - cv2.cvtColor(img / 255, cv2.COLOR_RGB2Lab)).max() < 0.3  # its tables


def test_local_pairwise_is_boxsnakes_weighted_absolute_difference():
    # 1 x 3 crop: with a 3x3 kernel and dilation 2, pixels 0 and 2 are each other's only
    # neighbour inside the crop (2 directed edges, weight 1 each in a flat colour).
    lab = torch.zeros(1, 3, 1, 3)
    logits = torch.logit(torch.tensor([0.8, 0.3, 0.6])).view(1, 1, 1, 3)
    sim = color_similarity(lab, 3, 2)
    assert sim.sum().item() == pytest.approx(2.0)
    assert local_pairwise_loss(logits, sim, 3, 2).item() == pytest.approx(0.2, rel=1e-5)
    # A colour step of d between the two: both weights become exp(-d / 2); the ratio stays 0.2.
    lab[0, 0, 0, 2] = 2.0
    sim = color_similarity(lab, 3, 2)
    assert sim[0, :, 0, 0].max().item() == pytest.approx(math.exp(-1))
    assert local_pairwise_loss(logits, sim, 3, 2).item() == pytest.approx(0.2, rel=1e-5)


def test_local_pairwise_is_zero_for_any_constant_mask():
    # Unlike BoxInst's term, it does not push an undecided mask towards 0 or 1.
    lab = torch.randn(2, 3, 9, 9)
    sim = color_similarity(lab, 3, 2)
    for value in (-3.0, 0.0, 5.0):
        assert local_pairwise_loss(torch.full((2, 1, 9, 9), value), sim).item() == 0.0
    assert boxinst_pairwise_loss(torch.zeros(2, 1, 9, 9), sim, 1e-30).item() == pytest.approx(
        math.log(2)
    )


def test_boxinst_pairwise_option_by_hand():
    lab = torch.zeros(1, 3, 1, 3)
    logits = torch.logit(torch.tensor([0.8, 0.3, 0.6])).view(1, 1, 1, 3)
    sim = color_similarity(lab, 3, 2)
    expected = -math.log(0.8 * 0.6 + 0.2 * 0.4)
    assert boxinst_pairwise_loss(logits, sim, 0.3, 3, 2).item() == pytest.approx(expected, 1e-5)
    lab[0, 0, 0, 2] = 50.0  # exp(-50 * 0.5) < 0.3: the edge no longer counts
    assert boxinst_pairwise_loss(logits, color_similarity(lab, 3, 2), 0.3).item() == 0.0


def test_levelset_energy_of_a_perfect_two_region_mask_is_zero():
    image = torch.full((1, 3, 4, 4), 50.0)
    image[..., :, 2:] = 200.0
    logits = torch.full((1, 1, 4, 4), -30.0)
    logits[..., :, 2:] = 30.0
    assert levelset_energy(logits, image).item() == pytest.approx(0.0, abs=1e-6)
    # An undecided mask (p = 0.5): both means are 125, energy = mean (I - 125)^2 = 75^2.
    assert levelset_energy(torch.zeros(1, 1, 4, 4), image).item() == pytest.approx(5625.0)


def test_losses_match_the_numpy_references_on_random_crops():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (2, 12, 10))
    rgb = rng.uniform(0, 255, (2, 12, 10, 3))
    lg = torch.tensor(logits)[:, None].float()
    im = torch.tensor(rgb).permute(0, 3, 1, 2).float()
    sim = color_similarity(rgb_to_lab(im), 3, 2)
    assert local_pairwise_loss(lg, sim, 3, 2).item() == pytest.approx(
        ref_local_pairwise(logits, rgb), rel=1e-2  # OpenCV's Lab differs by up to 0.2
    )
    assert levelset_energy(lg, im).item() == pytest.approx(ref_levelset(logits, rgb), rel=1e-4)


def test_projection_loss_zero_for_any_mask_touching_its_box_sides_and_high_outside():
    size, m = 64, 16  # a 64 px frame at 16 x 16 logits: 4 px a cell
    boxes = torch.tensor([[8.0, 16.0, 40.0, 32.0]])  # cells x 2..9, y 4..7
    full = torch.full((1, 1, m, m), -20.0)
    full[..., 4:8, 2:10] = 20.0
    assert projection_loss(full, boxes, size).item() == pytest.approx(0.0, abs=1e-6)
    cross = torch.full((1, 1, m, m), -20.0)  # a plus sign touching all four sides
    cross[..., 5, 2:10] = 20.0
    cross[..., 4:8, 6] = 20.0
    assert projection_loss(cross, boxes, size).item() == pytest.approx(0.0, abs=1e-6)
    outside = torch.full((1, 1, m, m), -20.0)
    outside[..., 10:14, 11:15] = 20.0  # same size, elsewhere: both projections disjoint
    assert projection_loss(outside, boxes, size).item() > 1.5
    # By hand: a mask covering half the box's width costs 1 - Dice(x) = 1 - 2*4/(4+8) on x.
    half = torch.full((1, 1, m, m), -20.0)
    half[..., 4:8, 2:6] = 20.0
    expected = 1 - (2 * 4 + 1) / (4 + 8 + 1)  # soft Dice with eps 1
    assert projection_loss(half, boxes, size).item() == pytest.approx(expected, abs=1e-5)
