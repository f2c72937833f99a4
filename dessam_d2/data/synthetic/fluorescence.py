"""Synthetic fluorescence microscopy (DAPI / Hoechst nuclear stain): a lab's own small box set.

Everything the demo's cytology set (``cytology.py``) is not: a dark background with bright
nuclei in one stain channel (blue pseudo-colour or grey, as Fiji exports an 8-bit RGB snapshot
for CVAT), 400 x 320 px fields (the model resizes the longest side to 256, so nuclei shrink by
0.64 rather than staying at their size), nuclei 14-40 px across before resizing, packed in
clusters where they press against each other. An image is drawn in this order, every random
draw coming from one seed:
    1. nuclei: rotated ellipses with wavy borders; about 60 % of them are attached to a cluster
       (centre distance 0.8-0.98 x the sum of the radii), the rest scattered. Where two nuclei
       would overlap, a pixel goes to the one it lies deeper inside (they deform against each
       other, as packed nuclei do), so touching nuclei share a border;
    2. the stain: per-nucleus brightness from dim (0.18) to bright (1.0, some saturate), a dome
       profile falling to 0 at the border, chromatin texture and dark nucleoli; about one in
       six nuclei out of focus (blurred, dimmer); a few bright specks (debris) that are *not*
       annotated, so bright != nucleus;
    3. the optics and the camera: a blurred autofluorescence haze, vignetting around an
       off-centre optical axis and an illumination gradient, a point-spread blur, shot (Poisson)
       noise at a few tens of photons, read noise and a camera offset.
Masks are the in-focus regions. A nucleus cut by the image border to < 25 % of its area or to
fewer than ``MIN_VISIBLE_AREA`` pixels is drawn but not annotated.

Each split gets two COCO files: ``boxes.json`` as CVAT ("COCO 1.0") exports boxes (``bbox`` =
the mask's extent, ``area`` = w x h, ``iscrowd`` 0, ``segmentation`` [], CVAT's ``licenses``,
``info`` and ``attributes`` keys), which ``train_net.py --dataset`` reads, and ``masks.json``
with the true RLE masks, for counting what a model outlined. Determinism as in ``cytology.py``:
image ``i`` of a split comes from one child of ``SeedSequence``; files carry no timestamps.
"""

import os
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ...errors import UsageError
from ...utils.io import atomic_write_json
from ..converters.conversion import nucleus_categories
from ..image_io import write_image_rgb

__all__ = [
    "MIN_VISIBLE_AREA",
    "CHANNELS",
    "render_fluorescence_image",
    "generate_fluorescence_dataset",
    "make_user_fluorescence_set",
]

MIN_VISIBLE_AREA = 20  # pixels
_MIN_VISIBLE_FRACTION = 0.25
_CLUSTER_PROBABILITY = 0.6
_DEFOCUS_PROBABILITY = 0.17
# 8-bit RGB renderings of the one stain channel: DAPI's blue look-up table (a little green, as
# Hoechst's cyan-blue), or grey.
CHANNELS = {"blue": (0.12, 0.45, 1.0), "grey": (1.0, 1.0, 1.0)}


def _nucleus_radius(nucleus: Dict, shape: Tuple[int, int]):
    """(window slices, normalised radius in the window): < 1 inside the nucleus' wavy ellipse."""
    h, w = shape
    cy, cx = nucleus["center"]
    ry, rx = nucleus["radii"]
    wobble = nucleus["wobble"]
    reach = max(ry, rx) * (1.0 + np.abs(wobble[:, 0]).sum()) + 2.0
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 2, h)
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 2, w)
    if y0 >= y1 or x0 >= x1:
        return None, None
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
    dy, dx = yy + 0.5 - cy, xx + 0.5 - cx
    cos, sin = np.cos(nucleus["angle"]), np.sin(nucleus["angle"])
    u, v = (dx * cos + dy * sin) / rx, (-dx * sin + dy * cos) / ry
    theta = np.arctan2(v, u)
    limit = np.ones_like(theta)
    for k, (amplitude, phase) in enumerate(wobble, start=2):
        limit += amplitude * np.cos(k * theta + phase)
    return (slice(y0, y1), slice(x0, x1)), np.hypot(u, v) / limit


def _new_nucleus(rng: np.random.Generator, diameter: Tuple[float, float]) -> Dict:
    major = 0.5 * float(np.exp(rng.uniform(np.log(diameter[0]), np.log(diameter[1]))))
    bright = rng.random() > 0.3
    return {
        "radii": (major, major * rng.uniform(0.65, 1.0)),
        "angle": rng.uniform(0.0, np.pi),
        "wobble": np.stack([rng.uniform(0.0, 0.05, 3), rng.uniform(0.0, 2 * np.pi, 3)], axis=1),
        "brightness": rng.uniform(0.45, 1.0) if bright else rng.uniform(0.18, 0.35),
        "defocus": rng.uniform(1.8, 3.2) if rng.random() < _DEFOCUS_PROBABILITY else 0.0,
    }


def _place_nuclei(
    rng: np.random.Generator, shape: Tuple[int, int], count: int, diameter: Tuple[float, float]
) -> List[Dict]:
    """Nuclei in 2-3 clusters of touching nuclei and scattered in between."""
    h, w = shape
    nuclei: List[Dict] = []
    clusters: List[List[int]] = [[] for _ in range(int(rng.integers(2, 4)))]
    for _ in range(count):
        nucleus = _new_nucleus(rng, diameter)
        radius = float(np.mean(nucleus["radii"]))
        cluster = int(rng.integers(len(clusters)))
        attach = rng.random() < _CLUSTER_PROBABILITY
        for _ in range(40):
            if attach and clusters[cluster]:
                other = nuclei[clusters[cluster][rng.integers(len(clusters[cluster]))]]
                direction = rng.uniform(0.0, 2.0 * np.pi)
                dist = (float(np.mean(other["radii"])) + radius) * rng.uniform(0.8, 0.98)
                cy = other["center"][0] + dist * np.sin(direction)
                cx = other["center"][1] + dist * np.cos(direction)
                closest = 0.75
            else:  # anywhere, borders included
                cy, cx = rng.uniform(0.2 * radius, h - 0.2 * radius), rng.uniform(0, w)
                closest = 1.0
            if not (0 <= cy < h and 0 <= cx < w):
                continue
            if all(
                np.hypot(cy - o["center"][0], cx - o["center"][1])
                >= closest * (radius + float(np.mean(o["radii"])))
                for o in nuclei
            ):
                break
        else:
            continue  # no room: one nucleus fewer
        nucleus["center"] = (float(cy), float(cx))
        if attach:
            clusters[cluster].append(len(nuclei))
        nuclei.append(nucleus)
    return nuclei


def _label_map(nuclei: List[Dict], shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Label image (0 = background, i = nucleus i) and each pixel's normalised radius in its
    nucleus; a pixel inside several nuclei goes to the one it lies deepest in."""
    label = np.zeros(shape, np.int32)
    depth = np.full(shape, np.inf)
    for index, nucleus in enumerate(nuclei, start=1):
        window, radius = _nucleus_radius(nucleus, shape)
        if window is None:
            continue
        take = (radius <= 1.0) & (radius < depth[window])
        depth[window][take] = radius[take]
        label[window][take] = index
    for index in range(1, len(nuclei) + 1):  # one piece per nucleus: the largest
        mask = (label == index).astype(np.uint8)
        n, pieces = cv2.connectedComponents(mask, connectivity=4)
        if n > 2:
            sizes = np.bincount(pieces.ravel())[1:]
            label[(pieces > 0) & (pieces != 1 + int(np.argmax(sizes)))] = 0
    return label, np.where(label > 0, depth, np.inf)


def _stain(
    rng: np.random.Generator, nuclei: List[Dict], label: np.ndarray, depth: np.ndarray
) -> np.ndarray:
    """Nuclear signal (0..1+): dome profile, chromatin texture, nucleoli, defocus."""
    shape = label.shape
    texture = cv2.GaussianBlur(rng.normal(0.0, 1.0, shape).astype(np.float32), (0, 0), 1.3)
    texture = 1.0 + 0.3 * texture / (np.abs(texture).max() + 1e-6)
    edge = np.clip((1.0 - depth) / 0.12, 0.0, 1.0)
    profile = (edge * edge * (3.0 - 2.0 * edge)) * (1.0 - 0.3 * np.minimum(depth, 1.0) ** 2)
    profile = np.where(label > 0, profile, 0.0).astype(np.float32) * texture
    in_focus = np.zeros(shape, np.float32)
    signal = np.zeros(shape, np.float32)
    for index, nucleus in enumerate(nuclei, start=1):
        region = label == index
        if not region.any():
            continue
        layer = np.where(region, profile * nucleus["brightness"], 0.0).astype(np.float32)
        for _ in range(int(rng.integers(0, 3))):  # nucleoli: dark in DAPI
            spot = dict(nucleus, wobble=np.zeros((1, 2)))
            spot["radii"] = tuple(r * rng.uniform(0.15, 0.25) for r in (nucleus["radii"][1],) * 2)
            offset = rng.uniform(-0.45, 0.45, 2) * nucleus["radii"][1]
            spot["center"] = (nucleus["center"][0] + offset[0], nucleus["center"][1] + offset[1])
            window, radius = _nucleus_radius(spot, shape)
            if window is not None:
                layer[window] *= np.where(radius < 1.0, 0.55, 1.0).astype(np.float32)
        if nucleus["defocus"]:
            signal += 0.75 * cv2.GaussianBlur(layer, (0, 0), nucleus["defocus"])
        else:
            in_focus += layer
    return signal + in_focus


def _field(rng: np.random.Generator, shape: Tuple[int, int], cells: int) -> np.ndarray:
    grid = rng.uniform(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    return cv2.resize(grid, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def render_fluorescence_image(
    rng: np.random.Generator,
    image_size: Tuple[int, int] = (320, 400),
    nuclei_per_image: Tuple[int, int] = (21, 27),
    nucleus_diameter: Tuple[float, float] = (14.0, 40.0),
    channel: str = "blue",
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """Draw one field. Returns (H x W x 3 uint8 RGB, annotated nucleus masks: H x W bool)."""
    if channel not in CHANNELS:
        raise UsageError(f"unknown channel {channel!r}: one of {sorted(CHANNELS)}")
    shape = (int(image_size[0]), int(image_size[1]))
    h, w = shape
    count = int(rng.integers(nuclei_per_image[0], nuclei_per_image[1] + 1))
    nuclei = _place_nuclei(rng, shape, count, nucleus_diameter)
    label, depth = _label_map(nuclei, shape)
    image = _stain(rng, nuclei, label, depth)

    for _ in range(int(rng.integers(3, 8))):  # bright debris specks, not annotated
        speck = {
            "center": (rng.uniform(0, h), rng.uniform(0, w)),
            "radii": (rng.uniform(1.0, 2.5),) * 2,
            "angle": 0.0,
            "wobble": np.zeros((1, 2)),
        }
        window, radius = _nucleus_radius(speck, shape)
        if window is not None:
            image[window] += np.where(radius < 1.0, rng.uniform(0.8, 1.5), 0.0).astype(np.float32)

    # optics: haze, point-spread blur, vignetting around an off-centre axis, a gradient
    image += rng.uniform(0.02, 0.05) + 0.03 * _field(rng, shape, 5)
    image = cv2.GaussianBlur(image, (0, 0), rng.uniform(0.6, 1.0))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.35, 0.65), w * rng.uniform(0.35, 0.65)
    r2 = ((yy - cy) ** 2 + (xx - cx) ** 2) / (0.25 * (h * h + w * w))
    angle = rng.uniform(0.0, 2.0 * np.pi)
    ramp = ((xx / w - 0.5) * np.cos(angle) + (yy / h - 0.5) * np.sin(angle)).astype(np.float32)
    image *= (1.0 - rng.uniform(0.3, 0.5) * r2) * (1.0 + rng.uniform(0.1, 0.3) * ramp)

    # camera: shot noise at a few tens of photons for a bright nucleus, read noise, offset
    photons = rng.uniform(40.0, 90.0)
    image = rng.poisson(np.maximum(image, 0.0) * photons).astype(np.float32) / photons
    image += 0.025 + rng.normal(0.0, 0.008, shape).astype(np.float32)
    grey = np.clip(image * 230.0, 0.0, 255.0)
    rgb = np.rint(grey[..., None] * np.asarray(CHANNELS[channel], np.float32))
    rgb = rgb.astype(np.uint8)

    masks = []
    for index, nucleus in enumerate(nuclei, start=1):
        visible = label == index
        area = int(visible.sum())
        full = np.pi * nucleus["radii"][0] * nucleus["radii"][1]
        if area >= MIN_VISIBLE_AREA and area >= _MIN_VISIBLE_FRACTION * full:
            masks.append(visible)
    return rgb, masks


def _cvat_json(images: List[Dict], masks: List[Tuple[int, np.ndarray]]) -> Dict:
    """Boxes only, laid out as CVAT's "COCO 1.0" export writes them."""
    annotations = []
    for image_id, mask in masks:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        x, y, bw, bh = (float(v) for v in mask_util.toBbox(rle))
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "segmentation": [],
                "area": bw * bh,
                "bbox": [x, y, bw, bh],
                "iscrowd": 0,
                "attributes": {"occluded": False, "rotation": 0.0},
            }
        )
    cvat_images = [
        {**im, "license": 0, "flickr_url": "", "coco_url": "", "date_captured": 0} for im in images
    ]
    info = dict.fromkeys(("contributor", "date_created", "description", "url", "version"), "")
    return {
        "licenses": [{"name": "", "id": 0, "url": ""}],
        "info": {**info, "year": ""},
        "categories": [{"id": 1, "name": "nucleus", "supercategory": ""}],
        "images": cvat_images,
        "annotations": annotations,
    }


def _masks_json(images: List[Dict], masks: List[Tuple[int, np.ndarray]], info: Dict) -> Dict:
    annotations = []
    for image_id, mask in masks:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append(
            {
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": 1,
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "area": int(mask_util.area(rle)),
                "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()},
            }
        )
    return {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": nucleus_categories(),
    }


def generate_fluorescence_dataset(
    output_dir: str,
    num_images: int,
    seed: int = 0,
    image_size: Tuple[int, int] = (320, 400),
    nuclei_per_image: Tuple[int, int] = (21, 27),
    nucleus_diameter: Tuple[float, float] = (14.0, 40.0),
    channel: str = "blue",
    first_index: int = 0,
) -> Tuple[str, str]:
    """Write ``output_dir/images/dapi_field_NN.png`` (NN from ``first_index``), ``boxes.json``
    (CVAT boxes) and ``masks.json`` (true RLE masks); returns (boxes json, masks json)."""
    if num_images < 1:
        raise UsageError(f"num_images must be >= 1, got {num_images}")
    h, w = (int(s) for s in image_size)
    lo, hi = nucleus_diameter
    if not 4.0 <= lo <= hi or 2 * hi > min(h, w):
        raise UsageError(
            f"nucleus_diameter must be (lo, hi) with 4 <= lo <= hi <= half the shorter image "
            f"side {min(h, w)}, got {tuple(nucleus_diameter)}"
        )
    if not 0 <= nuclei_per_image[0] <= nuclei_per_image[1]:
        raise UsageError(f"nuclei_per_image must be (lo, hi), got {tuple(nuclei_per_image)}")
    image_dir = os.path.join(output_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    images, masks = [], []
    for index, child in enumerate(np.random.SeedSequence(seed).spawn(num_images)):
        rgb, image_masks = render_fluorescence_image(
            np.random.default_rng(child), (h, w), nuclei_per_image, nucleus_diameter, channel
        )
        file_name = f"dapi_field_{first_index + index:02d}.png"
        write_image_rgb(os.path.join(image_dir, file_name), rgb)
        images.append({"id": index + 1, "width": w, "height": h, "file_name": file_name})
        masks += [(index + 1, m) for m in image_masks]
    info = {
        "description": "DES-SAM synthetic fluorescence (DAPI) nuclei",
        "seed": seed,
        "image_size": [h, w],
        "nuclei_per_image": list(nuclei_per_image),
        "nucleus_diameter": [float(d) for d in nucleus_diameter],
        "channel": channel,
    }
    boxes_json = os.path.join(output_dir, "boxes.json")
    masks_json = os.path.join(output_dir, "masks.json")
    atomic_write_json(boxes_json, _cvat_json(images, masks))
    atomic_write_json(masks_json, _masks_json(images, masks, info))
    return boxes_json, masks_json


def make_user_fluorescence_set(
    root: str, num_train: int = 4, num_test: int = 1, seed: int = 0, **kwargs
) -> Dict[str, str]:
    """A lab's small set: ``root/train`` (``num_train`` fields, ~25 boxed nuclei each) and
    ``root/test`` (``num_test`` held-out fields), each with ``images/``, ``boxes.json`` and
    ``masks.json``; the splits come from different seeds and their file names do not repeat.
    Extra keyword arguments go to :func:`generate_fluorescence_dataset`. Returns the paths:
    ``{train,test}_{images,boxes,masks}``."""
    paths: Dict[str, str] = {}
    splits: Sequence[Tuple[str, int, int, int]] = (
        ("train", num_train, seed, 0),
        ("test", num_test, seed + 1, num_train),
    )
    for split, n, split_seed, first in splits:
        folder = os.path.join(root, split)
        boxes, masks = generate_fluorescence_dataset(
            folder, n, seed=split_seed, first_index=first, **kwargs
        )
        paths.update(
            {
                f"{split}_images": os.path.join(folder, "images"),
                f"{split}_boxes": boxes,
                f"{split}_masks": masks,
            }
        )
    return paths
