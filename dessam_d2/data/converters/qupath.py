"""QuPath GeoJSON exports (File > Export objects as GeoJSON) -> a COCO box file for training.

QuPath writes one file per image: a FeatureCollection, or a plain list of Features, each with a
``geometry`` in full-resolution pixel coordinates (origin top-left) and ``properties`` holding
``objectType`` ("annotation", "detection", ...; ``object_type`` in QuPath 0.2) and, for a
classified object, ``classification.name``. Rectangles and ellipses are written as Polygons
(a rectangle as its 4 corners, closed). Here each Polygon or MultiPolygon becomes one box; a
rectangle has an empty ``segmentation`` (boxes only, as CVAT and Label Studio write), any other
polygon keeps its outer ring(s) as the COCO polygon (usable for evaluation; holes are dropped).
Points and lines are not areas and are skipped, counted by reason.
"""

import json
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image

from ...errors import DatasetFormatError, InputNotFoundError
from ...utils.io import atomic_write_json
from .conversion import ConversionReport, SubsetReport, nucleus_categories

__all__ = ["read_qupath_features", "features_to_annotations", "convert_qupath"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def read_qupath_features(path: str) -> List[Dict]:
    """The Features of a QuPath GeoJSON export (FeatureCollection, list or single Feature)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InputNotFoundError(f"{path} not found: give QuPath's GeoJSON export") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path} is not JSON ({e}): export it again from QuPath") from None
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        data = data.get("features")
    elif isinstance(data, dict) and data.get("type") == "Feature":
        data = [data]
    if not isinstance(data, list) or not all(
        isinstance(f, dict) and f.get("type") == "Feature" for f in data
    ):
        raise DatasetFormatError(
            f"{path} is not GeoJSON features: in QuPath use File > Export objects as GeoJSON"
        )
    return data


def _class_name(properties: Dict) -> str:
    classification = properties.get("classification") or {}
    return classification.get("name") or "Unclassified"


def _is_rectangle(ring: Sequence[Sequence[float]]) -> bool:
    corners = [tuple(p[:2]) for p in ring]
    if len(corners) == 5 and corners[0] == corners[-1]:
        corners = corners[:4]
    if len(corners) != 4:
        return False
    xs, ys = {x for x, _ in corners}, {y for _, y in corners}
    return len(xs) == 2 and len(ys) == 2 and len(set(corners)) == 4


def features_to_annotations(
    features: Sequence[Dict],
    width: int,
    height: int,
    classes: Optional[Sequence[str]] = None,
) -> Tuple[List[Dict], Counter]:
    """COCO annotations (bbox XYWH clipped to the image, category 1, no ids) of the area
    features, and the skipped ones counted by reason. ``classes``: keep only these
    classification names (case-insensitive; "Unclassified" for none)."""
    wanted = {c.lower() for c in classes} if classes else None
    annotations, skipped = [], Counter()
    for feature in features:
        geometry = feature.get("geometry") or {}
        kind, coordinates = geometry.get("type"), geometry.get("coordinates")
        if kind == "Polygon":
            polygons = [coordinates]
        elif kind == "MultiPolygon":
            polygons = coordinates
        else:
            skipped[f"not an area ({kind})"] += 1
            continue
        properties = feature.get("properties") or {}
        if wanted is not None and _class_name(properties).lower() not in wanted:
            skipped["other class"] += 1
            continue
        shells = [p[0] for p in polygons if p and len(p[0]) >= 4]
        if not shells:
            skipped["empty polygon"] += 1
            continue
        xs = [float(p[0]) for ring in shells for p in ring]
        ys = [float(p[1]) for ring in shells for p in ring]
        x0, y0 = max(min(xs), 0.0), max(min(ys), 0.0)
        x1, y1 = min(max(xs), float(width)), min(max(ys), float(height))
        if x1 <= x0 or y1 <= y0:
            skipped["outside the image"] += 1
            continue
        rectangle = len(shells) == 1 and _is_rectangle(shells[0])
        segmentation = (
            [] if rectangle else [[float(c) for p in ring[:-1] for c in p[:2]] for ring in shells]
        )
        annotations.append(
            {
                "category_id": 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
                "segmentation": segmentation,
            }
        )
    return annotations, skipped


def _find_image(geojson: str, image_root: str) -> str:
    """The image a QuPath export belongs to: same name without .geojson (``a.tif.geojson``) or
    same stem with an image extension (``a.geojson`` -> ``a.tif``), anywhere under the root."""
    base = os.path.basename(geojson)
    for suffix in (".geojson", ".json"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    found = []
    for folder, _, names in os.walk(image_root):
        for name in names:
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS and base in (name, stem):
                found.append(os.path.join(folder, name))
    if len(found) != 1:
        what = "no image" if not found else f"{len(found)} images ({', '.join(sorted(found))})"
        raise InputNotFoundError(
            f"{geojson}: {what} named {base}.<png|jpg|tif|...> under {image_root}; name each "
            "export after its image (QuPath's default) or pass --image-root"
        )
    return found[0]


def _image_size(path: str) -> Tuple[int, int]:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # reads the header only; large fields of view are fine
    try:
        with Image.open(path) as image:
            return image.size
    except OSError as e:
        raise DatasetFormatError(f"{path}: cannot read the image size ({e})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def convert_qupath(
    geojson_files: Sequence[str],
    image_root: str,
    output: str,
    classes: Optional[Sequence[str]] = None,
) -> ConversionReport:
    """One COCO file of boxes from QuPath exports, one per image, images relative to
    ``image_root`` (the ``IMAGE_ROOT`` of ``--dataset NAME=OUTPUT:IMAGE_ROOT``)."""
    if not os.path.isdir(image_root):
        raise InputNotFoundError(f"image root {image_root} is not a folder: pass --image-root")
    subset = SubsetReport(os.path.basename(output))
    images, annotations = [], []
    for image_id, path in enumerate(sorted(geojson_files), start=1):
        features = read_qupath_features(path)
        image_path = _find_image(path, image_root)
        width, height = _image_size(image_path)
        annos, skipped = features_to_annotations(features, width, height, classes)
        subset.skipped_nuclei.update(skipped)
        images.append(
            {
                "id": image_id,
                "file_name": os.path.relpath(image_path, image_root),
                "width": width,
                "height": height,
            }
        )
        for anno in annos:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **anno})
        subset.images += 1
        subset.nuclei += len(annos)
    coco = {"images": images, "annotations": annotations, "categories": nucleus_categories()}
    atomic_write_json(output, coco)
    return ConversionReport(subsets=[subset], json_files=[output])
