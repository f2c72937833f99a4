"""The box prior (dessam_d2/recipes/box_prior.py): an ellipse inscribed in each box, the
baseline that needs no model."""

import numpy as np
import torch

from dessam_d2.recipes.box_prior import ellipse_instances, inscribed_ellipses


def test_the_inscribed_ellipse_fills_pi_over_4_of_its_box_and_stays_inside():
    masks = inscribed_ellipses(np.array([[10, 20, 50, 40], [0, 0, 0, 5], [-5, -5, 7, 9]]), 60, 70)
    assert masks.shape == (3, 60, 70) and masks.dtype == torch.bool
    assert abs(int(masks[0].sum()) - np.pi * 20 * 10) < 12
    ys, xs = torch.nonzero(masks[0], as_tuple=True)
    assert xs.min() >= 10 and xs.max() < 50 and ys.min() >= 20 and ys.max() < 40
    assert masks[0, 30, 30] and not masks[0, 20, 10]  # centre in, corner out
    assert not masks[1].any()  # an empty box gives an empty mask
    assert masks[2].any() and not masks[2][10:].any()  # clipped at the image border
    inst = ellipse_instances(np.array([[10, 20, 50, 40]]), np.array([0.7]), 60, 70)
    assert inst.image_size == (60, 70) and torch.equal(inst.pred_masks[0], masks[0])
