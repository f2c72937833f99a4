"""Synthetic cervical cytology: the embedded default data for the demo and the tests.

An image is drawn in this order, every random draw coming from one seed:
    1. pale lavender background with a low-frequency illumination field;
    2. translucent cytoplasm (blue-green or pink, alpha 0.3-0.5): where cells overlap the
       colours multiply, as in a Pap smear;
    3. dark elliptical nuclei with wavy borders, varied size and eccentricity and a chromatin
       texture; about a third are placed against an earlier nucleus so that they touch or overlap;
    4. small dark debris that is *not* annotated (so dark != nucleus), a per-channel stain shift,
       Gaussian blur and sensor noise.
Masks are exact. Where nuclei overlap, the one drawn later lies on top: its mask wins and the
earlier mask loses those pixels; an earlier nucleus left with < 25 % of its in-image area or fewer
than ``MIN_VISIBLE_AREA`` pixels is dropped from the annotations.

Determinism: image ``i`` of seed ``s`` comes from ``SeedSequence(s).spawn(n)[i]`` and PNG/JSON
are written without timestamps, so the same arguments give byte-identical files (on one
platform: OpenCV's float blur may round differently on another CPU).
"""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ...errors import UsageError
from ...utils.io import atomic_write_json
from ..converters.conversion import nucleus_categories
from ..datasets import default_dataset_root
from ..image_io import write_image_rgb

__all__ = [
    "MIN_VISIBLE_AREA",
    "render_synthetic_image",
    "generate_synthetic_dataset",
    "make_synthetic_cytology",
    "synthetic_model_input",
]

MIN_VISIBLE_AREA = 12  # pixels; smaller visible remnants of occluded nuclei are not annotated
_MIN_VISIBLE_FRACTION = 0.25
_TOUCH_PROBABILITY = 0.35
# Stain styles: Papanicolaou (the default: pale lavender background, cyanophilic / eosinophilic
# cytoplasm, blue-purple nuclei) and a shifted one for a generalisation test (warm background,
# yellow-green cytoplasm, brown nuclei), as the paper's TargetA/B differ in staining from
# ClusterSeg.
STYLES = {
    "pap": {
        "background": [232.0, 226.0, 238.0],
        "cytoplasm": [[150.0, 200.0, 205.0], [228.0, 165.0, 185.0]],
        "nucleus": [78.0, 58.0, 122.0],
    },
    "shifted": {
        "background": [238.0, 232.0, 215.0],
        "cytoplasm": [[205.0, 210.0, 150.0], [170.0, 205.0, 165.0]],
        "nucleus": [120.0, 78.0, 52.0],
    },
}


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-amplitude low-frequency field (a bicubic upsampled random grid)."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _blob_mask(
    shape: Tuple[int, int],
    center: Tuple[float, float],
    radii: Tuple[float, float],
    angle: float,
    wobble: np.ndarray,
) -> np.ndarray:
    """Boolean mask of a rotated ellipse whose radius is modulated by a few harmonics.

    ``wobble`` is K x 2 (amplitude, phase) for harmonics 2..K+1: small amplitudes give the slightly
    irregular outline of a real nucleus while keeping it star-shaped (one connected piece).
    """
    h, w = shape
    cy, cx = center
    ry, rx = radii
    reach = max(ry, rx) * (1.0 + np.abs(wobble[:, 0]).sum()) + 1.0
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
    mask = np.zeros(shape, bool)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx  # pixel centres
    cos, sin = np.cos(angle), np.sin(angle)
    u, v = (dx * cos + dy * sin) / rx, (-dx * sin + dy * cos) / ry
    theta = np.arctan2(v, u)
    limit = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(wobble, start=2):
        limit += amplitude * np.cos(k * theta + phase)
    mask[y0:y1, x0:x1] = np.hypot(u, v) <= limit
    return mask


def _composite(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> None:
    """In-place alpha blend of a colour (3,) or colour field (H x W x 3) with alpha H x W."""
    a = alpha[..., None]
    image *= 1.0 - a
    image += a * colour


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _place_nuclei(
    rng: np.random.Generator, shape: Tuple[int, int], count: int, radius: Tuple[float, float]
) -> List[Dict]:
    h, w = shape
    nuclei: List[Dict] = []
    for _ in range(count):
        major = rng.uniform(*radius)
        minor = major * rng.uniform(0.6, 1.0)
        if nuclei and rng.random() < _TOUCH_PROBABILITY:
            # next to an earlier nucleus: centre distance 0.75-1.05 x the sum of the radii
            other = nuclei[rng.integers(len(nuclei))]
            direction = rng.uniform(0.0, 2.0 * np.pi)
            dist = (other["radii"][1] + minor) * rng.uniform(0.75, 1.05)
            cy = other["center"][0] + dist * np.sin(direction)
            cx = other["center"][1] + dist * np.cos(direction)
        else:
            # anywhere, borders included: real patches cut nuclei at the edge
            cy = rng.uniform(0.3 * major, h - 0.3 * major)
            cx = rng.uniform(0.3 * major, w - 0.3 * major)
        nuclei.append(
            {
                "center": (float(np.clip(cy, 0, h - 1)), float(np.clip(cx, 0, w - 1))),
                "radii": (major, minor),
                "angle": rng.uniform(0.0, np.pi),
                "wobble": np.stack(
                    [rng.uniform(0.0, 0.06, 3), rng.uniform(0.0, 2.0 * np.pi, 3)], axis=1
                ),
                "darkness": rng.uniform(0.75, 1.2),  # hyper- vs hypochromatic
            }
        )
    return nuclei


def render_synthetic_image(
    rng: np.random.Generator,
    image_size: Tuple[int, int] = (256, 256),
    nuclei_per_image: Tuple[int, int] = (5, 20),
    nucleus_radius: Tuple[float, float] = (6.0, 16.0),
    style: str = "pap",
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Draw one image. Returns (H x W x 3 uint8 RGB, visible nucleus masks: list of H x W bool)."""
    if style not in STYLES:
        raise UsageError(f"unknown stain style {style!r}: one of {sorted(STYLES)}")
    colours = STYLES[style]
    shape = (int(image_size[0]), int(image_size[1]))
    image = np.empty(shape + (3,), np.float32)
    background = np.array(colours["background"]) + rng.uniform(-8, 8, 3)
    image[:] = background
    image += 6.0 * _smooth_field(rng, shape, 4)[..., None]

    nuclei = _place_nuclei(
        rng, shape, int(rng.integers(nuclei_per_image[0], nuclei_per_image[1] + 1)), nucleus_radius
    )

    # cytoplasm: one cell around most nuclei plus a few nucleus-free fragments
    cell_centers = [n["center"] for n in nuclei if rng.random() < 0.85]
    cell_centers += [tuple(rng.uniform(0, s) for s in shape) for _ in range(rng.integers(0, 3))]
    for cy, cx in cell_centers:
        r = rng.uniform(*nucleus_radius) * rng.uniform(2.2, 3.5)
        shift = rng.normal(0.0, 0.3 * r, 2)  # nucleus not exactly central
        wobble = np.stack([rng.uniform(0, 0.12, 3), rng.uniform(0, 2 * np.pi, 3)], axis=1)
        cell = _blob_mask(
            shape,
            (cy + shift[0], cx + shift[1]),
            (r, r * rng.uniform(0.6, 1.0)),
            rng.uniform(0, np.pi),
            wobble,
        )
        colour = np.array(colours["cytoplasm"][rng.integers(2)]) + rng.uniform(-10, 10, 3)
        _composite(image, colour, _soft(cell, 1.5) * rng.uniform(0.3, 0.5))

    # nuclei: chromatin texture shared by the image, colour and darkness per nucleus
    texture = cv2.GaussianBlur(rng.normal(0.0, 1.0, shape).astype(np.float32), (0, 0), 1.0)
    texture = 1.0 + 0.5 * texture / (np.abs(texture).max() + 1e-6)
    label = np.zeros(shape, np.int32)
    full_areas = []
    for index, n in enumerate(nuclei, start=1):
        mask = _blob_mask(shape, n["center"], n["radii"], n["angle"], n["wobble"])
        full_areas.append(int(mask.sum()))
        colour = (np.array(colours["nucleus"]) + rng.uniform(-12, 12, 3)) * n["darkness"]
        _composite(image, colour * texture[..., None], _soft(mask, 0.7) * rng.uniform(0.85, 0.95))
        label[mask] = index  # drawn later = on top

    # debris: small dark specks that must not be detected as nuclei
    for _ in range(rng.integers(0, 5)):
        speck = _blob_mask(
            shape,
            tuple(rng.uniform(0, s) for s in shape),
            (rng.uniform(1.0, 2.5),) * 2,
            0.0,
            np.zeros((1, 2)),
        )
        _composite(image, np.array([60.0, 45.0, 70.0]), _soft(speck, 0.6) * 0.8)

    image *= rng.uniform(0.93, 1.07, 3)  # stain batch
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.4, 1.0))
    image += rng.normal(0.0, 3.0, image.shape).astype(np.float32)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    masks = []
    for index, full_area in enumerate(full_areas, start=1):
        visible = label == index
        area = int(visible.sum())
        if area >= MIN_VISIBLE_AREA and area >= _MIN_VISIBLE_FRACTION * full_area:
            masks.append(visible)
    return image, masks


def _annotation(mask: np.ndarray, ann_id: int, image_id: int) -> Dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [float(v) for v in mask_util.toBbox(rle)],
        "area": int(mask_util.area(rle)),
        "iscrowd": 0,
        "segmentation": {
            "size": [int(s) for s in rle["size"]],
            "counts": rle["counts"].decode("ascii"),
        },
    }


def _check_range(name: str, value: Sequence[float], minimum: float) -> Tuple[float, float]:
    lo, hi = value
    if not minimum <= lo <= hi:
        raise UsageError(f"{name} must be (lo, hi) with {minimum} <= lo <= hi, got {tuple(value)}")
    return lo, hi


def generate_synthetic_dataset(
    output_dir: str,
    num_images: int,
    image_size: Tuple[int, int] = (256, 256),
    seed: int = 0,
    nuclei_per_image: Tuple[int, int] = (5, 20),
    nucleus_radius: Tuple[float, float] = (6.0, 16.0),
    style: str = "pap",
) -> str:
    """Write ``output_dir/images/*.png`` and ``output_dir/annotations.json`` (COCO, RLE masks).

    Returns the path of the JSON file. Same arguments → byte-identical files.
    """
    if num_images < 1:
        raise UsageError(f"num_images must be >= 1, got {num_images}")
    h, w = (int(s) for s in image_size)
    _check_range("nuclei_per_image", nuclei_per_image, 0)
    _, r_hi = _check_range("nucleus_radius", nucleus_radius, 2.0)
    if min(h, w) < 32 or 4 * r_hi > min(h, w):
        raise UsageError(
            f"image_size {(h, w)} is too small for nucleus_radius up to {r_hi}: "
            "use images >= 32 px and at least 4 x the largest radius"
        )
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)

    images, annotations = [], []
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(num_images)):
        image, masks = render_synthetic_image(
            np.random.default_rng(child), (h, w), nuclei_per_image, nucleus_radius, style
        )
        file_name = f"{index:05d}.png"
        write_image_rgb(os.path.join(image_dir, file_name), image)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for mask in masks:
            annotations.append(_annotation(mask, len(annotations) + 1, image_id))

    json_file = os.path.join(output_dir, "annotations.json")
    info = {
        "description": "DES-SAM synthetic cervical cytology",
        "seed": seed,
        "image_size": [h, w],
        "nuclei_per_image": list(nuclei_per_image),
        "nucleus_radius": [float(r) for r in nucleus_radius],
        "style": style,
    }
    atomic_write_json(
        json_file,
        {
            "info": info,
            "images": images,
            "annotations": annotations,
            "categories": nucleus_categories(),
        },
    )
    return json_file


def make_synthetic_cytology(
    root: Optional[str] = None,
    num_train: int = 48,
    num_test: int = 12,
    seed: int = 0,
    **kwargs,
) -> Dict[str, str]:
    """Write the ``train``, ``test`` and ``test_shifted`` splits that
    ``dessam_synthetic_{train,test,shifted_test}`` load.

    ``root`` defaults to ``$DETECTRON2_DATASETS/synthetic_cytology``. The test split uses
    ``seed + 1`` so it never repeats a training image; ``test_shifted`` (seed + 2) has the
    "shifted" stain and nuclei 1.5x larger, a domain the training set never shows. Extra keyword
    arguments go to :func:`generate_synthetic_dataset`. Returns {split: json path}.
    """
    root = root or os.path.join(default_dataset_root(), "synthetic_cytology")
    radius = kwargs.pop("nucleus_radius", (6.0, 16.0))
    shifted = {**kwargs, "nucleus_radius": (radius[0] * 1.5, radius[1] * 1.5), "style": "shifted"}
    return {
        "train": generate_synthetic_dataset(
            os.path.join(root, "train"), num_train, seed=seed, nucleus_radius=radius, **kwargs
        ),
        "test": generate_synthetic_dataset(
            os.path.join(root, "test"), num_test, seed=seed + 1, nucleus_radius=radius, **kwargs
        ),
        "test_shifted": generate_synthetic_dataset(
            os.path.join(root, "test_shifted"), num_test, seed=seed + 2, **shifted
        ),
    }


def synthetic_model_input(
    size: Tuple[int, int] = (256, 256),
    boxes: Optional[Sequence[Sequence[float]]] = None,
    num_nuclei: int = 0,
    seed: int = 0,
    background: Tuple[float, float] = (200.0, 20.0),
    colour: Sequence[float] = (80.0, 40.0, 120.0),
    file_name: str = "",
    with_gt: bool = True,
) -> Dict:
    """One model input as the mapper hands it over (uint8 C x H x W ``image``, ``height``,
    ``width``, ``image_id``, ``file_name``, GT ``instances`` with boxes), for tests and
    benchmarks: a pale noisy image (``background`` = mean, jitter) with a dark elliptical
    nucleus of ``colour`` inscribed in each box; ``boxes`` (XYXY) given, or ``num_nuclei`` on a
    jittered grid drawn from the same seeded generator."""
    import torch
    from detectron2.structures import Boxes, Instances

    h, w = size
    g = torch.Generator().manual_seed(seed)
    img = background[0] + background[1] * torch.rand(3, h, w, generator=g)
    if boxes is None:
        side = int(num_nuclei**0.5) + 1
        cell = min(h, w) / side
        boxes = []
        for i in range(num_nuclei):
            cy = (i // side + 0.5) * cell + (torch.rand(1, generator=g).item() - 0.5) * cell / 3
            cx = (i % side + 0.5) * cell + (torch.rand(1, generator=g).item() - 0.5) * cell / 3
            ry, rx = ((0.15 + 0.2 * torch.rand(2, generator=g)) * cell).tolist()
            boxes.append([cx - rx, cy - ry, cx + rx, cy + ry])
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for x0, y0, x1, y1 in boxes:
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
        inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        img[:, inside] = torch.tensor([float(c) for c in colour])[:, None]
    out = {
        "image": img.clamp(0, 255).to(torch.uint8),
        "height": h,
        "width": w,
        "image_id": seed,
        "file_name": file_name or f"synthetic_{seed}.png",
    }
    if with_gt:
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_boxes.clip((h, w))
        inst.gt_classes = torch.zeros(len(boxes), dtype=torch.int64)
        out["instances"] = inst
    return out
