"""DES-SAM's mask losses: self-distillation (Eq. 2) and the edge-aware loss (Eq. 4).

Every function takes mask *logits* (N x 1 x H x W) and returns a scalar averaged over the N
instances, so a loss does not grow with the number of nuclei in an image; L_distill can also be
summed over them, as the authors' release does (``distillation_loss(..., reduction="sum")``).
"""

import torch
import torch.nn.functional as F


def soft_dice_losses(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice(probs, targets) of each of the N instances: N. Identical binary masks -> 0."""
    p = probs.flatten(1)
    t = targets.flatten(1).to(p.dtype)
    return 1 - (2 * (p * t).sum(1) + eps) / (p.sum(1) + t.sum(1) + eps)


def soft_dice_loss(probs: torch.Tensor, targets: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - Dice(probs, targets) per instance, averaged."""
    return soft_dice_losses(probs, targets, eps).mean()


def dice_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of sigmoid(logits) against binary targets."""
    return soft_dice_loss(logits.sigmoid(), targets)


DISTILL_REDUCTIONS = ("mean", "sum")


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """L_distill's (BCE, Dice) terms: the student against the teacher's binarised mask [Y_t > 0].

    Each instance's BCE is the mean over its pixels and its Dice loss is 1 - Dice. ``reduction``
    "mean" averages both over the N instances (the paper's Eq. 2, scale free of N); "sum" adds
    them up over the instances, as the authors' release does (with weights 0.5 and 0.01).
    """
    if reduction not in DISTILL_REDUCTIONS:
        raise ValueError(f"distillation reduction {reduction!r}: one of {DISTILL_REDUCTIONS}")
    target = (teacher_logits > 0).to(student_logits.dtype)
    if reduction == "mean":
        bce = F.binary_cross_entropy_with_logits(student_logits, target)
        return bce, dice_loss(student_logits, target)
    bce = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    bce = bce.flatten(1).mean(1)  # N: each instance's mean over its pixels
    return bce.sum(), soft_dice_losses(student_logits.sigmoid(), target).sum()


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """N x 3 x H x W sRGB in [0, 255] -> CIE L*a*b* (D65), L in [0, 100]."""
    c = (rgb / 255.0).clamp(0, 1)
    c = torch.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    m = c.new_tensor(
        [
            [0.412453, 0.357580, 0.180423],
            [0.212671, 0.715160, 0.072169],
            [0.019334, 0.119193, 0.950227],
        ]
    )
    xyz = torch.einsum("ij,njhw->nihw", m, c)
    xyz = xyz / c.new_tensor([0.950456, 1.0, 1.088754]).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    L = 116 * f[:, 1] - 16
    a = 500 * (f[:, 0] - f[:, 1])
    b = 200 * (f[:, 1] - f[:, 2])
    return torch.stack([L, a, b], dim=1)


def _neighbours(x: torch.Tensor, size: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel's (size^2 - 1) dilated neighbours: N x C x K x H x W, plus their validity."""
    n, c, h, w = x.shape
    pad = size // 2 * dilation
    unfolded = F.unfold(x, kernel_size=size, dilation=dilation, padding=pad).view(n, c, -1, h, w)
    inside = F.unfold(x.new_ones(1, 1, h, w), kernel_size=size, dilation=dilation, padding=pad)
    inside = inside.view(1, 1, -1, h, w) > 0
    centre = size * size // 2
    keep = [k for k in range(size * size) if k != centre]
    return unfolded[:, :, keep], inside[:, :, keep]


def color_similarity(lab: torch.Tensor, size: int = 3, dilation: int = 2) -> torch.Tensor:
    """s = exp(-||c_i - c_j|| * 0.5) between each pixel and its neighbours: N x K x H x W.

    Neighbours outside the crop get similarity 0, so they never count as an edge.
    """
    neigh, inside = _neighbours(lab, size, dilation)
    diff = lab.unsqueeze(2) - neigh
    dist = (diff * diff).sum(dim=1).sqrt()  # the norm over channels; .norm(dim=1) is slower
    return torch.exp(-dist * 0.5) * inside[:, 0]


def local_pairwise_loss(
    logits: torch.Tensor, similarity: torch.Tensor, size: int = 3, dilation: int = 2
) -> torch.Tensor:
    """L_lp of the paper (BoxSnake's local pairwise term): sum w_ij |p_i - p_j| / sum w_ij.

    p = sigmoid(logits); w_ij the colour similarity of pixel i and its neighbour j
    (``color_similarity``, 0 for neighbours outside the crop). No threshold: similar neighbours
    with different probabilities cost most; a mask that is constant costs nothing, whatever its
    value (it does not push pixels towards 0 or 1).
    """
    p = logits.sigmoid()
    neigh, _ = _neighbours(p, size, dilation)  # N x 1 x K x H x W
    diff = (p.unsqueeze(2) - neigh).abs()[:, 0]  # N x K x H x W
    return (similarity * diff).sum() / similarity.sum().clamp_min(1e-6)


def boxinst_pairwise_loss(
    logits: torch.Tensor, similarity: torch.Tensor, thresh: float, size: int = 3, dilation: int = 2
) -> torch.Tensor:
    """BoxInst's pairwise term (an option, not the paper's): -log P(i and j take the same
    label), averaged over the edges whose colour similarity is >= ``thresh``.

    P(same) = p_i p_j + (1 - p_i)(1 - p_j), computed in log space from the logits for stability.
    """
    log_fg = F.logsigmoid(logits)
    log_bg = F.logsigmoid(-logits)
    neigh_fg, _ = _neighbours(log_fg, size, dilation)
    neigh_bg, _ = _neighbours(log_bg, size, dilation)
    log_same = torch.logaddexp(log_fg.unsqueeze(2) + neigh_fg, log_bg.unsqueeze(2) + neigh_bg)
    edges = (similarity >= thresh).to(logits.dtype)  # N x K x H x W
    return -(log_same[:, 0] * edges).sum() / edges.sum().clamp_min(1.0)


def box_masks(boxes: torch.Tensor, size: int, image_size: int) -> torch.Tensor:
    """R x 1 x size x size masks of XYXY ``boxes`` (input pixels of an ``image_size`` frame):
    1 where a cell's centre lies in the box."""
    centres = (torch.arange(size, device=boxes.device, dtype=boxes.dtype) + 0.5) * (
        image_size / size
    )
    x1, y1, x2, y2 = (boxes[:, k, None] for k in range(4))
    in_x = (centres >= x1) & (centres < x2)  # R x size
    in_y = (centres >= y1) & (centres < y2)
    return (in_y[:, :, None] & in_x[:, None, :]).unsqueeze(1)


def projection_loss(logits: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """BoxInst's box-projection term: Dice loss of the mask's max-projections onto the x and y
    axes against the box's, averaged over the N instances. ``logits`` N x 1 x m x m over the
    whole ``image_size`` frame, ``boxes`` N x 4 XYXY in its pixels. A mask that fills its box
    (or any shape touching all four sides) costs 0; it does not say which pixels inside."""
    p = logits.sigmoid()
    target = box_masks(boxes, logits.shape[-1], image_size).to(p.dtype)
    losses = soft_dice_losses(p.amax(-2), target.amax(-2)) + soft_dice_losses(
        p.amax(-1), target.amax(-1)
    )
    return losses.mean()


def levelset_energy(logits: torch.Tensor, image: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """L_gp: Chan-Vese region energy of the soft mask against the crop's intensities
    (BoxLevelSet), averaged over the N instances.

    E = sum_x sum_c [(I_c - m_in,c)^2 p + (I_c - m_out,c)^2 (1 - p)] / (C H W), with m_in / m_out
    the mask-weighted means inside / outside. A mask that splits a two-valued crop exactly -> 0.
    The paper's beta = 0.001 is sized for ``image`` in RGB on the 0-255 scale (as the authors'
    release computes it): on [0, 1] intensities the term would be 65025 times smaller.
    """
    p = logits.sigmoid()
    inside = (image * p).sum((2, 3), keepdim=True) / (p.sum((2, 3), keepdim=True) + eps)
    outside = (image * (1 - p)).sum((2, 3), keepdim=True) / (
        (1 - p).sum((2, 3), keepdim=True) + eps
    )
    energy = (image - inside) ** 2 * p + (image - outside) ** 2 * (1 - p)
    return energy.mean()
