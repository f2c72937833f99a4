"""Synthetic "anything" scenes: the pretraining data of the demo's tiny SAM.

SAM learnt masks from 11 M natural images, not from nuclei; the demo's stand-in for SAM must
likewise learn from data *other* than the cytology it is later distilled on. A scene here is a
textured background with 4-14 objects of random kinds (ellipses, rotated rectangles, triangles,
stars, wavy blobs, rings), colours (any hue, lighter or darker than the background), textures
(flat, noise, stripes, checks, gradient) and sizes (6-70 px), drawn in order so that later objects
occlude earlier ones. No object is a dark textured nucleus over pale cytoplasm on purpose: the
colours are drawn uniformly in HSV and the kinds are mostly not ellipses.

Every draw comes from ``numpy.random.default_rng(seed)``: the same seed gives the same scene.
"""

from typing import List, Tuple

import cv2
import numpy as np

__all__ = ["render_shapes_scene"]

_KINDS = ("ellipse", "rectangle", "triangle", "star", "blob", "ring")


def _hsv_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(0, 255), rng.uniform(30, 255)]]])
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _texture(rng: np.random.Generator, shape: Tuple[int, int], base: np.ndarray) -> np.ndarray:
    """H x W x 3 float image of one of five textures around a base colour."""
    h, w = shape
    kind = rng.integers(5)
    out = np.broadcast_to(base, (h, w, 3)).astype(np.float32).copy()
    if kind == 1:  # noise
        out += rng.normal(0, rng.uniform(5, 30), (h, w, 1)).astype(np.float32)
    elif kind in (2, 3):  # stripes / checks in a second colour
        other = _hsv_colour(rng)
        period = rng.uniform(3, 12)
        angle = rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u = np.cos(angle) * xx + np.sin(angle) * yy
        on = np.sin(2 * np.pi * u / period) > 0
        if kind == 3:
            v = -np.sin(angle) * xx + np.cos(angle) * yy
            on ^= np.sin(2 * np.pi * v / period) > 0
        mix = rng.uniform(0.2, 0.6)
        out[on] = (1 - mix) * out[on] + mix * other
    elif kind == 4:  # linear gradient towards a second colour
        other = _hsv_colour(rng)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = (np.cos(angle) * xx + np.sin(angle) * yy) / max(h, w)
        t = ((t - t.min()) / max(np.ptp(t), 1e-6))[..., None]
        out = (1 - t) * out + t * other
    return out


def _shape_mask(
    rng: np.random.Generator, shape: Tuple[int, int], size: float, kind: str = ""
) -> np.ndarray:
    """Boolean mask of one object of ``kind`` (random if empty), centred somewhere in the image."""
    h, w = shape
    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    angle = rng.uniform(0, 360)
    kind = kind or _KINDS[rng.integers(len(_KINDS))]
    canvas = np.zeros(shape, np.uint8)
    r = size / 2
    if kind == "ellipse":
        axes = (max(1, int(r)), max(1, int(r * rng.uniform(0.3, 1.0))))
        cv2.ellipse(canvas, (int(cx), int(cy)), axes, angle, 0, 360, 1, -1)
    elif kind == "rectangle":
        box = ((cx, cy), (size, size * rng.uniform(0.3, 1.0)), angle)
        cv2.fillPoly(canvas, [cv2.boxPoints(box).astype(np.int32)], 1)
    elif kind == "triangle":
        t = np.deg2rad(angle) + np.array([0, 2.1, 4.2]) + rng.uniform(-0.3, 0.3, 3)
        pts = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    elif kind == "star":
        n = int(rng.integers(4, 8))
        t = np.deg2rad(angle) + np.arange(2 * n) * np.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
        pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    elif kind == "blob":
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        rad = r * (
            1 + sum(rng.uniform(-0.25, 0.25) * np.cos(k * t + rng.uniform(0, 6)) for k in (2, 3, 5))
        )
        pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], 1)
        cv2.fillPoly(canvas, [pts.astype(np.int32)], 1)
    else:  # ring
        cv2.circle(canvas, (int(cx), int(cy)), max(2, int(r)), 1, -1)
        cv2.circle(canvas, (int(cx), int(cy)), max(1, int(r * rng.uniform(0.3, 0.6))), 0, -1)
    return canvas.astype(bool)


def render_shapes_scene(
    seed: int,
    size: int = 256,
    num_objects: Tuple[int, int] = (4, 14),
    min_area: int = 20,
    alike: float = 0.0,
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """One scene: (H x W x 3 uint8 RGB, the visible mask of each object, in drawing order).

    An object occluded to less than 40 % of its area, or below ``min_area`` pixels, is left out
    of the masks (it still shows in the image). With probability ``alike`` the scene's objects
    are all alike (one kind, one fill, sizes within +-30 %): a box prompt then has to be told
    apart from its look-alike neighbours by where it is, not by what it looks like.
    """
    rng = np.random.default_rng(seed)
    shape = (size, size)
    image = _texture(rng, shape, _hsv_colour(rng))
    masks: List[np.ndarray] = []
    full_areas: List[int] = []
    same = alike > 0 and rng.uniform() < alike
    if same:
        kind, base = _KINDS[rng.integers(len(_KINDS))], rng.uniform(8, 50)
        common_fill = _texture(rng, shape, _hsv_colour(rng))
    for _ in range(int(rng.integers(num_objects[0], num_objects[1] + 1))):
        if same:
            mask = _shape_mask(rng, shape, base * rng.uniform(0.7, 1.3), kind)
        else:
            mask = _shape_mask(rng, shape, rng.uniform(6, 70))
        if mask.sum() < min_area:
            continue
        fill = common_fill if same else _texture(rng, shape, _hsv_colour(rng))
        alpha = 1.0 if rng.uniform() < 0.8 else rng.uniform(0.6, 0.9)
        image[mask] = (1 - alpha) * image[mask] + alpha * fill[mask]
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        full_areas.append(int(mask.sum()))
    keep = [m for m, a in zip(masks, full_areas) if m.sum() >= max(min_area, 0.4 * a)]
    if rng.uniform() < 0.5:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.3, 1.2))
    image += rng.normal(0, rng.uniform(0, 8), image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), keep
