"""An image and its boxes (drawn or corrected by a user, e.g. in napari) as a COCO box set that
``tools/train_net.py --dataset NAME=<folder>/annotations.json`` reads as it is.

A set is a folder: the images as PNG and ``annotations.json`` (COCO instances, one category
"nucleus"). Exporting an image again replaces its entry; other images stay, so several images
make one set. Where a label image is given, each box gets the mask of the label that fills most
of it, as an RLE ``segmentation``: for evaluation only, training reads the boxes alone.
"""

import os
from typing import Dict, List, Optional

import numpy as np
import pycocotools.mask as mask_util

from ..errors import UsageError
from ..utils.io import atomic_write_json
from .converters.user_datasets import read_coco_instances
from .image_io import write_image_rgb

__all__ = ["ANNOTATIONS", "box_annotations", "check_boxes", "export_box_set"]

ANNOTATIONS = "annotations.json"


def _read_set(path: str) -> Dict:
    if not os.path.exists(path):
        return {"images": [], "annotations": [], "categories": [{"id": 1, "name": "nucleus"}]}
    return read_coco_instances(path, "export into an empty folder, or delete the file")


def check_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """``boxes`` (N x 4 XYXY) as float64, each with positive size and overlapping the image; a
    one-line ``UsageError`` naming the first that is not."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        raise UsageError("no boxes: draw rectangles around nuclei in a Shapes layer first")
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        if not np.all(np.isfinite([x0, y0, x1, y1])) or x1 <= x0 or y1 <= y0:
            raise UsageError(f"box {i + 1} has no area: delete it or draw it again")
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            raise UsageError(
                f"box {i + 1} ({x0:.0f}, {y0:.0f}, {x1:.0f}, {y1:.0f}) lies outside the "
                f"{width} x {height} image: move it onto the image or delete it"
            )
    return boxes


def _mask_of_box(labels: np.ndarray, box, used: set) -> Optional[np.ndarray]:
    """The mask of the label (not yet ``used``) with the most pixels inside ``box``."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside = labels[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]
    ids, counts = np.unique(inside[inside > 0], return_counts=True)
    for i in ids[np.argsort(-counts, kind="stable")]:
        if int(i) not in used:
            used.add(int(i))
            return labels == i
    return None


def box_annotations(
    boxes: np.ndarray,
    image_id: int,
    first_id: int = 1,
    category: int = 1,
    labels: Optional[np.ndarray] = None,
) -> List[Dict]:
    """COCO annotations of ``boxes`` (N x 4 XYXY), ids from ``first_id``; with ``labels``, each
    gets the mask of the label that fills most of it (an RLE; none left: no segmentation)."""
    out, used = [], set()
    for k, (x0, y0, x1, y1) in enumerate(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)):
        ann = {
            "id": first_id + k,
            "image_id": image_id,
            "category_id": category,
            "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
            "area": float((x1 - x0) * (y1 - y0)),
            "iscrowd": 0,
            "segmentation": [],
        }
        mask = None if labels is None else _mask_of_box(np.asarray(labels), (x0, y0, x1, y1), used)
        if mask is not None:
            rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
            ann["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            ann["area"] = float(mask.sum())
        out.append(ann)
    return out


def export_box_set(
    folder: str,
    name: str,
    image: np.ndarray,
    boxes: np.ndarray,
    labels: Optional[np.ndarray] = None,
) -> str:
    """Write ``image`` (H x W x 3 uint8 RGB) as ``<folder>/<name>.png`` and its ``boxes`` (N x 4
    XYXY pixels, clipped to the image) into ``<folder>/annotations.json``, replacing that image's
    earlier entry; ``labels`` (H x W, optional) add masks for evaluation. Returns the JSON's
    path. Both files are written atomically."""
    if not name or os.sep in name or name.startswith("."):
        raise UsageError(f"image name {name!r}: give a plain file name, e.g. field_01")
    h, w = image.shape[:2]
    boxes = check_boxes(boxes, h, w).copy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
    if labels is not None and np.asarray(labels).shape != (h, w):
        raise UsageError(
            f"the labels ({np.asarray(labels).shape}) are not the image's size ({h}, {w}): "
            "pick the Labels layer of this image"
        )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, ANNOTATIONS)
    coco = _read_set(path)
    file_name = name + ".png"
    old = {im["id"] for im in coco["images"] if im.get("file_name") == file_name}
    coco["images"] = [im for im in coco["images"] if im["id"] not in old]
    coco["annotations"] = [a for a in coco["annotations"] if a.get("image_id") not in old]
    image_id = min(old) if old else max([im["id"] for im in coco["images"]] + [0]) + 1
    ann_id = max([a["id"] for a in coco["annotations"]] + [0]) + 1
    category = coco["categories"][0]["id"] if coco["categories"] else 1
    if not coco["categories"]:
        coco["categories"] = [{"id": 1, "name": "nucleus"}]
    coco["annotations"] += box_annotations(boxes, image_id, ann_id, category, labels)
    coco["images"].append({"id": image_id, "file_name": file_name, "height": h, "width": w})
    write_image_rgb(os.path.join(folder, file_name), image)
    atomic_write_json(path, coco)
    return path
