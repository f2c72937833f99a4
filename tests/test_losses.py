"""Each DES-SAM loss on small hand-made tensors against the value computed by hand."""

import math

import pytest
import torch

from dessam_d2.modeling.losses import (
    box_projection_loss,
    color_similarity,
    dice_loss,
    distillation_loss,
    levelset_energy,
    local_pairwise_loss,
    rgb_to_lab,
    soft_dice_loss,
)


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


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[255.0, 0, 255], [255.0, 0, 0], [255.0, 0, 0]]).view(1, 3, 1, 3)
    lab = rgb_to_lab(rgb)[0, :, 0].T  # white, black, red
    assert lab[0].tolist() == pytest.approx([100.0, 0.0, 0.0], abs=0.05)
    assert lab[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=0.05)
    assert lab[2].tolist() == pytest.approx([53.24, 80.09, 67.20], abs=0.05)


def test_local_pairwise_loss_of_a_two_pixel_mask():
    # 1 x 3 crop: with a 3x3 kernel and dilation 2, pixels 0 and 2 are each other's only
    # neighbour inside the crop (2 directed edges); pixel 1 has none.
    lab = torch.zeros(1, 3, 1, 3)
    logits = torch.logit(torch.tensor([0.8, 0.3, 0.6])).view(1, 1, 1, 3)
    sim = color_similarity(lab, 3, 2)
    assert sim.sum().item() == pytest.approx(2.0)
    expected = -math.log(0.8 * 0.6 + 0.2 * 0.4)
    assert local_pairwise_loss(logits, sim, 0.3, 3, 2).item() == pytest.approx(expected, rel=1e-5)


def test_local_pairwise_ignores_edges_across_a_colour_change():
    lab = torch.zeros(1, 3, 1, 3)
    lab[0, 0, 0, 2] = 50.0  # exp(-50 * 0.5) < 0.3
    logits = torch.tensor([2.0, 0.0, -2.0]).view(1, 1, 1, 3)
    sim = color_similarity(lab, 3, 2)
    assert local_pairwise_loss(logits, sim, 0.3, 3, 2).item() == 0.0
    # Colour distance d gives similarity exp(-d / 2).
    lab[0, 0, 0, 2] = 2.0
    assert color_similarity(lab, 3, 2)[0, :, 0, 0].max().item() == pytest.approx(math.exp(-1))


def test_levelset_energy_of_a_perfect_two_region_mask_is_zero():
    image = torch.full((1, 3, 4, 4), 0.2)
    image[..., :, 2:] = 0.8
    logits = torch.full((1, 1, 4, 4), -30.0)
    logits[..., :, 2:] = 30.0
    assert levelset_energy(logits, image).item() == pytest.approx(0.0, abs=1e-8)
    # An undecided mask (p = 0.5): both means are 0.5, energy = mean (I - 0.5)^2 = 0.09.
    assert levelset_energy(torch.zeros(1, 1, 4, 4), image).item() == pytest.approx(0.09)


def test_box_projection_loss_is_zero_for_the_box_itself():
    box = torch.zeros(1, 1, 8, 8)
    box[..., 2:5, 3:7] = 1
    logits = (box * 2 - 1) * 40
    assert box_projection_loss(logits, box).item() == pytest.approx(0.0, abs=1e-6)
    assert box_projection_loss(-logits.abs(), box).item() > 1.5
