"""The plugin's reader and writer, as napari layer data (``(data, kwargs, layer type)``): no
napari import.

Reader (``get_reader``), for what this project writes and reads:
    <stem>_labels.png, <stem>_labels.ome.tif  label image (``tools/predict.py``; a slide's
                                              pyramid is opened multiscale) -> Labels, same ids
    <stem>.geojson                            QuPath detections (``tools/predict.py``; QuPath's
                                              export) -> Shapes (outer rings; measurements as
                                              features)
    a COCO instances .json                    each image with its boxes (Shapes) and, where
                                              annotated, outlines (Labels)
    predictions_coco.json                     ``tools/predict.py``'s results, with
                                              predictions_images.json beside it
Writer (``write_boxes``): a Shapes layer of boxes -> a COCO file of its image (a layer the plugin
made, or that this reader opened, knows its image; see ``IMAGE_KEY``).
"""

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ..data.export import box_annotations, check_boxes
from ..data.image_io import read_image_rgb
from ..errors import DatasetFormatError, UsageError
from ..utils.io import atomic_write_json
from .layers import boxes_to_rectangles, polygon_to_vertices, rectangles_to_boxes

__all__ = ["IMAGE_KEY", "get_reader", "read_path", "write_boxes", "boxes_layer_data"]

LayerData = Tuple[object, Dict, str]
# A Shapes layer's metadata[IMAGE_KEY] = {"file_name", "height", "width"}: the image its boxes
# belong to, what a COCO file needs beside the boxes.
IMAGE_KEY = "dessam_image"
LABEL_SUFFIXES = ("_labels.png", "_labels.ome.tif", "_labels.ome.tiff")


def boxes_layer_data(
    boxes: np.ndarray, name: str, image: Dict, features: Optional[Dict] = None
) -> LayerData:
    """A Shapes layer of rectangles for ``boxes`` (XYXY) of ``image`` (file_name, height,
    width), coloured by ``features['score']`` where given."""
    kwargs = {
        "name": name,
        "shape_type": "rectangle",
        "face_color": "transparent",
        "edge_width": 1,
        "metadata": {IMAGE_KEY: image},
    }
    if features:
        kwargs["features"] = features
        if "score" in features:
            kwargs.update(edge_color="score", edge_colormap="viridis")
    else:
        kwargs["edge_color"] = "yellow"
    return boxes_to_rectangles(boxes), kwargs, "shapes"


def _read_labels(path: str) -> List[LayerData]:
    stem = os.path.basename(path).split("_labels.")[0]
    if path.lower().endswith(".png"):
        labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if labels is None or labels.ndim != 2:
            raise DatasetFormatError(f"{path} is not a label image (one channel, 8 or 16 bit)")
        return [(labels.astype(np.int32), {"name": f"{stem} nuclei"}, "labels")]
    import tifffile

    with tifffile.TiffFile(path) as tif:
        levels = [level.asarray() for level in tif.series[0].levels]
    data = levels if len(levels) > 1 else levels[0]
    return [(data, {"name": f"{stem} nuclei", "multiscale": len(levels) > 1}, "labels")]


def _read_geojson(path: str) -> List[LayerData]:
    with open(path, encoding="utf-8") as f:
        collection = json.load(f)
    features = collection.get("features", []) if isinstance(collection, dict) else collection
    shapes, rows = [], []
    for feature in features:
        geometry = feature.get("geometry") or {}
        if geometry.get("type") == "Polygon":
            polygons = [geometry["coordinates"]]
        elif geometry.get("type") == "MultiPolygon":
            polygons = geometry["coordinates"]
        else:
            continue
        properties = feature.get("properties") or {}
        row = {"name": properties.get("name", ""), **(properties.get("measurements") or {})}
        for polygon in polygons:  # napari shapes have no holes: the outer ring of each piece
            shapes.append(polygon_to_vertices(polygon[0]))
            rows.append(row)
    if not shapes:
        raise DatasetFormatError(f"{path} has no Polygon or MultiPolygon feature")
    columns = sorted({k for r in rows for k in r}, key=lambda k: (k != "name", k))
    table = {k: [r.get(k) for r in rows] for k in columns}
    stem = os.path.splitext(os.path.basename(path))[0]
    kwargs = {
        "name": f"{stem} outlines",
        "shape_type": "polygon",
        "face_color": "transparent",
        "edge_color": "cyan",
        "edge_width": 1,
        "features": table,
    }
    return [(shapes, kwargs, "shapes")]


def _annotation_mask(ann: Dict, height: int, width: int) -> Optional[np.ndarray]:
    segm = ann.get("segmentation")
    if not segm:
        return None
    if isinstance(segm, list):
        rle = mask_util.merge(mask_util.frPyObjects(segm, height, width))
    elif isinstance(segm.get("counts"), list):
        rle = mask_util.frPyObjects(segm, height, width)
    else:
        rle = segm
    return mask_util.decode(rle).astype(bool)


def _image_layers(
    info: Dict, anns: List[Dict], root: str, source: str, with_image: bool = True
) -> List[LayerData]:
    path = info["file_name"]
    if not os.path.isabs(path):
        path = os.path.join(root, path)
    name = os.path.splitext(os.path.basename(info["file_name"]))[0]
    out = []
    if with_image:
        out.append((read_image_rgb(path), {"name": name, "rgb": True}, "image"))
    h, w = int(info["height"]), int(info["width"])
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    features = {"id": [a.get("id") for a in anns]}
    if all("score" in a for a in anns) and anns:
        features["score"] = [float(a["score"]) for a in anns]
    image = {"file_name": info["file_name"], "height": h, "width": w}
    data, kwargs, kind = boxes_layer_data(boxes, f"{name} boxes", image, features)
    kwargs["metadata"]["source"] = source
    out.append((data, kwargs, kind))
    masks = [_annotation_mask(a, h, w) for a in anns]
    if any(m is not None for m in masks):
        labels = np.zeros((h, w), np.int32)
        for k in reversed(range(len(masks))):  # the first annotation wins an overlap
            if masks[k] is not None:
                labels[masks[k]] = k + 1
        out.append((labels, {"name": f"{name} outlines"}, "labels"))
    return out


def _read_coco(path: str) -> List[LayerData]:
    with open(path, encoding="utf-8") as f:
        coco = json.load(f)
    root = os.path.dirname(os.path.abspath(path))
    if isinstance(coco, list):  # tools/predict.py's results: images listed beside them
        images_json = os.path.join(root, "predictions_images.json")
        if not os.path.isfile(images_json):
            raise DatasetFormatError(
                f"{path} is a list of COCO results: predictions_images.json, which names their "
                "images, must lie beside it (tools/predict.py writes both)"
            )
        with open(images_json, encoding="utf-8") as f:
            coco = {"images": json.load(f), "annotations": coco}
    by_image: Dict[int, List[Dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    out = []
    for info in coco["images"]:
        out += _image_layers(info, by_image.get(info["id"], []), root, path)
    return out


def _is_coco(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    name = os.path.basename(path)
    return name == "predictions_coco.json" or ('"images"' in head and '"annotations"' in head)


def read_path(path: str) -> List[LayerData]:
    """Every layer of ``path`` (see the module doc); a one-line error for what it cannot read."""
    lower = path.lower()
    if lower.endswith(LABEL_SUFFIXES):
        return _read_labels(path)
    if lower.endswith(".geojson"):
        return _read_geojson(path)
    if lower.endswith(".json"):
        return _read_coco(path)
    raise UsageError(f"{path}: not a file this plugin reads (see dessam_d2/plugin/io.py)")


def get_reader(path) -> Optional[Callable[[str], List[LayerData]]]:
    """napari's reader hook: a reader for ``path`` (one file) when it is one of ours, else None
    (napari then asks other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = str(path)
    lower = path.lower()
    if lower.endswith(LABEL_SUFFIXES) or lower.endswith(".geojson"):
        return lambda p: read_path(path)
    if lower.endswith(".json") and _is_coco(path):
        return lambda p: read_path(path)
    return None


def write_boxes(path: str, data: Sequence[np.ndarray], meta: Dict) -> List[str]:
    """napari's writer hook for a Shapes layer: its shapes' bounding boxes as a COCO file of the
    layer's image (``meta['metadata'][IMAGE_KEY]``), boxes only."""
    image = (meta.get("metadata") or {}).get(IMAGE_KEY)
    if not image:
        raise UsageError(
            f"layer '{meta.get('name', '')}' does not say which image its boxes belong to: "
            "export it with the DES-SAM widget's Export section, which writes the image too"
        )
    boxes = check_boxes(rectangles_to_boxes(data), image["height"], image["width"])
    coco = {
        "images": [{"id": 1, **image}],
        "annotations": box_annotations(boxes, image_id=1),
        "categories": [{"id": 1, "name": "nucleus"}],
    }
    if not path.lower().endswith(".json"):
        path += ".json"
    atomic_write_json(path, coco)
    return [path]
