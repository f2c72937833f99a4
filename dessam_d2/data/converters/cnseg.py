"""CNSeg (labelme polygons + jpg) → COCO JSON, one file per subset, images copied or linked.

Input: any folder that contains the CNSeg subset folders, at most four levels down (names are
matched case-insensitively, ignoring ``-``, ``_`` and spaces):

    PatchSeg   train-images/ train-labels/ test-images/ test-labels/
    ClusterSeg sample/ normal/ difficult/ (train) test-sample/ test-normal/ test-difficult/
               (``test/sample`` etc. are read as test-sample etc.)
    DomainSeg  TargetA/ TargetB/

Inside a subset folder, images and labelme ``.json`` files are gathered recursively and paired by
file stem, so both "images and json side by side" and "images/ + labels/ sub-folders" work; the
PatchSeg ``*-labels`` folder is paired with its ``*-images`` sibling.

Output (``--output``, usually ``$DETECTRON2_DATASETS/cnseg``)::

    patchseg/{train,test}/<image>                 patchseg/annotations/{train,test}.json
    clusterseg/<part>/<image>                     clusterseg/annotations/<part>.json
                                                  clusterseg/annotations/{train,test}.json (unions)
    domainseg/{targeta,targetb}/<image>           domainseg/annotations/{targeta,targetb}.json

``file_name`` in the JSON is ``<part>/<image>`` relative to the family folder (the image root).

Polygon rules (each skip is counted by reason and reported; the conversion never stops on one
bad file):
    * shapes that are not polygons (rectangle, point, ...) or whose points are not finite (x, y)
      pairs are skipped; repeated consecutive points are merged first;
    * fewer than 3 distinct points, zero area, or a self-intersecting outline (edges crossing or
      touching, including spikes that double back) → skipped: such outlines have no well-defined
      inside, and repairing them would invent a mask;
    * partly outside the image → clipped to the image rectangle [0, W] x [0, H] (annotation slop
      at the border is common, the nucleus is real); entirely outside → skipped.
``bbox`` is the extent of the clipped polygon and ``area`` its shoelace area.
"""

import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ...errors import CNSegLayoutError, ImageReadError
from ...utils.io import atomic_copy, atomic_write_json
from ..image_io import read_image_rgb
from ..polygons import clip_polygon, dedup_vertices, polygon_area, polygon_self_intersects
from .conversion import ConversionReport, SubsetReport, nucleus_categories

__all__ = ["convert_cnseg", "find_cnseg_subsets"]

# Written into each file's "info": the module's name before it moved to converters/, kept so
# that converted files stay byte-identical across versions (split: it names no module now).
_CONVERTER = "dessam_d2" ".data.cnseg"

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
_MAX_DEPTH = 3  # folders deeper than this are not entered: subsets at most 4 levels down

# subset key → (family, output part). Order = order of image ids and of the report.
SUBSETS: Dict[str, Tuple[str, str]] = {
    "trainimages": ("patchseg", "train"),
    "testimages": ("patchseg", "test"),
    "sample": ("clusterseg", "sample"),
    "normal": ("clusterseg", "normal"),
    "difficult": ("clusterseg", "difficult"),
    "testsample": ("clusterseg", "test-sample"),
    "testnormal": ("clusterseg", "test-normal"),
    "testdifficult": ("clusterseg", "test-difficult"),
    "targeta": ("domainseg", "targeta"),
    "targetb": ("domainseg", "targetb"),
}
# union JSONs: family → {union name: parts}
UNIONS = {
    "clusterseg": {
        "train": ("sample", "normal", "difficult"),
        "test": ("test-sample", "test-normal", "test-difficult"),
    }
}


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]", "", name.lower())


def _subset_key(path: str) -> str:
    key = _norm(os.path.basename(path))
    if key in ("sample", "normal", "difficult") and "test" in _norm(
        os.path.basename(os.path.dirname(path))
    ):
        key = "test" + key  # ClusterSeg/test/sample layout
    return key


@dataclass
class Subset:
    family: str
    part: str
    folders: List[str] = field(default_factory=list)  # searched recursively for images + labels


def find_cnseg_subsets(root: str) -> List[Subset]:
    """Locate the subset folders under ``root`` (see the module doc), in ``SUBSETS`` order."""
    if not os.path.isdir(root):
        raise CNSegLayoutError(f"{root}: input folder not found; pass the CNSeg root as --input")
    found: Dict[str, Subset] = {}

    def claim(key: str, folders: List[str]) -> None:
        if key in found:
            raise CNSegLayoutError(
                f"{root}: two folders for CNSeg subset '{'/'.join(SUBSETS[key])}': "
                f"{found[key].folders[0]} and {folders[0]}; point --input at one copy of CNSeg"
            )
        found[key] = Subset(*SUBSETS[key], folders=folders)

    root = os.path.abspath(root)
    key = _subset_key(root)
    if key in SUBSETS and SUBSETS[key][0] != "patchseg":
        claim(key, [root])  # --input is one subset folder itself
        return list(found.values())
    for dirpath, dirnames, _ in os.walk(root):
        depth = os.path.relpath(dirpath, root).count(os.sep) + (dirpath != root)
        dirnames.sort()
        keep = []
        for name in dirnames:
            path = os.path.join(dirpath, name)
            key = _subset_key(path)
            if key in ("trainimages", "testimages"):
                labels = [d for d in dirnames if _norm(d) == key.replace("images", "labels")]
                claim(key, [path] + [os.path.join(dirpath, d) for d in labels])
            elif key in SUBSETS:
                claim(key, [path])
            elif key not in ("trainlabels", "testlabels") and depth < _MAX_DEPTH:
                keep.append(name)
        dirnames[:] = keep
    if not found:
        raise CNSegLayoutError(
            f"{root}: no CNSeg subset folder found (expected e.g. train-images/, sample/, "
            "test-sample/, TargetA/); see datasets/README.md"
        )
    return [found[key] for key in SUBSETS if key in found]


# ---------------------------------------------------------------- polygon geometry


def _shape_to_annotation(shape: Dict, width: int, height: int) -> Tuple[Optional[Dict], str]:
    """Return (COCO annotation without ids, "") or (None, skip reason); "clipped" as a note."""
    if not isinstance(shape, dict):
        return None, "malformed shape"
    if (shape.get("shape_type") or "polygon") != "polygon":
        return None, "not a polygon"
    try:
        points = np.asarray(shape.get("points"), dtype=np.float64)
    except (TypeError, ValueError):
        return None, "malformed shape"
    if points.ndim != 2 or points.shape[1] != 2 or not np.all(np.isfinite(points)):
        return None, "malformed shape" if points.size else "< 3 points"
    points = dedup_vertices(points)
    if len(points) < 3:
        return None, "< 3 points"
    if np.linalg.matrix_rank(points - points[0], tol=1e-9) < 2:
        return None, "zero area"  # all points on one line
    if polygon_self_intersects(points):
        return None, "self-intersecting"
    outside = np.any((points < 0) | (points > (width, height)))
    clipped = dedup_vertices(clip_polygon(points, width, height)) if outside else points
    area = polygon_area(clipped) if len(clipped) >= 3 else 0.0
    if area <= 1e-9:
        return None, "outside the image"
    x0, y0 = clipped.min(0)
    x1, y1 = clipped.max(0)
    annotation = {
        "category_id": 1,
        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
        "area": round(area, 2),
        "iscrowd": 0,
        "segmentation": [[round(float(v), 2) for v in clipped.reshape(-1)]],
    }
    return annotation, "clipped to image" if outside else ""


# ---------------------------------------------------------------- conversion


def _gather(folders: Iterable[str]) -> Tuple[Dict[str, List[str]], Dict[str, List[str]]]:
    """stem → paths, for images and for labelme json files, searched recursively."""
    images: Dict[str, List[str]] = {}
    labels: Dict[str, List[str]] = {}
    for folder in folders:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                stem, ext = os.path.splitext(name)
                target = images if ext.lower() in IMAGE_SUFFIXES else None
                target = labels if ext.lower() == ".json" else target
                if target is not None:
                    target.setdefault(stem, []).append(os.path.join(dirpath, name))
    return images, labels


def _read_labelme(path: str) -> Dict:
    with open(path, "rb") as f:
        data = json.loads(f.read().decode("utf-8-sig"))
    if not isinstance(data, dict) or not isinstance(data.get("shapes", []), list):
        raise ValueError("not a labelme file: no 'shapes' list")
    return data


def _convert_subset(
    subset: Subset,
    output: str,
    link: bool,
    progress: bool,
    image_id_start: int,
    ann_id_start: int,
) -> Tuple[SubsetReport, List[Dict], List[Dict]]:
    report = SubsetReport(f"{subset.family}/{subset.part}")
    images, labels = _gather(subset.folders)
    for kind, table in (("image", images), ("label", labels)):
        for stem, paths in table.items():
            if len(paths) > 1:
                logger.warning(
                    "%s: duplicate %s stem %r: %s; skipped", report.name, kind, stem, paths
                )
    dupes = {s for t in (images, labels) for s, p in t.items() if len(p) > 1}
    if dupes:
        report.skipped_images["duplicate stem"] += len(dupes)
    for stem in sorted(set(images) - set(labels) - dupes):
        logger.warning("%s: image without label: %s", report.name, images[stem][0])
        report.skipped_images["image without label"] += 1
    for stem in sorted(set(labels) - set(images) - dupes):
        logger.warning("%s: label without image: %s", report.name, labels[stem][0])
        report.skipped_images["label without image"] += 1

    out_dir = os.path.join(output, subset.family, subset.part)
    image_records: List[Dict] = []
    ann_records: List[Dict] = []
    stems = sorted((set(images) & set(labels)) - dupes)
    for stem in tqdm(stems, desc=report.name, unit="img", disable=not progress):
        image_path, label_path = images[stem][0], labels[stem][0]
        try:
            label = _read_labelme(label_path)
        except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError included
            logger.warning("%s: cannot parse %s (%s); skipped", report.name, label_path, e)
            report.skipped_images["unparseable json"] += 1
            continue
        try:
            height, width = read_image_rgb(image_path).shape[:2]
        except ImageReadError as e:
            logger.warning("%s: %s; skipped", report.name, e)
            report.skipped_images["unreadable image"] += 1
            continue
        declared = (label.get("imageHeight"), label.get("imageWidth"))
        if None not in declared and tuple(declared) != (height, width):
            logger.warning(
                "%s: %s says %sx%s but %s is %dx%d; skipped",
                report.name,
                label_path,
                declared[0],
                declared[1],
                image_path,
                height,
                width,
            )
            report.skipped_images["size mismatch"] += 1
            continue

        image_id = image_id_start + len(image_records)
        shape_skips: Counter = Counter()
        for shape in label.get("shapes", []):
            annotation, reason = _shape_to_annotation(shape, width, height)
            if annotation is None:
                shape_skips[reason] += 1
                continue
            if reason:
                report.notes[reason] += 1
            annotation.update(id=ann_id_start + len(ann_records), image_id=image_id)
            ann_records.append(annotation)
            report.nuclei += 1
        if shape_skips:
            logger.warning("%s: %s: skipped %s", report.name, label_path, dict(shape_skips))
            report.skipped_nuclei.update(shape_skips)

        file_name = os.path.basename(image_path)
        atomic_copy(image_path, os.path.join(out_dir, file_name), link)
        image_records.append(
            {
                "id": image_id,
                "file_name": f"{subset.part}/{file_name}",
                "height": int(height),
                "width": int(width),
            }
        )
        report.images += 1
    return report, image_records, ann_records


def _write_coco(path: str, images: List[Dict], annotations: List[Dict], source: str) -> None:
    atomic_write_json(
        path,
        {
            "info": {"description": f"CNSeg {source}, converted by {_CONVERTER}"},
            "images": images,
            "annotations": annotations,
            "categories": nucleus_categories(),
        },
    )


def convert_cnseg(
    input_root: str, output_dir: str, *, link: bool = False, progress: bool = True
) -> ConversionReport:
    """Convert every CNSeg subset found under ``input_root`` into ``output_dir`` (layout: module
    doc). ``link`` hard-links images instead of copying them. Returns the per-subset report."""
    subsets = find_cnseg_subsets(input_root)
    if os.path.abspath(output_dir) in {os.path.abspath(f) for s in subsets for f in s.folders}:
        raise CNSegLayoutError(f"{output_dir}: --output must not be one of the input folders")
    report = ConversionReport()
    per_family: Dict[str, Dict[str, Tuple[List[Dict], List[Dict]]]] = {}
    next_ids: Counter = Counter()  # (family, "image" | "ann") → ids used so far
    with logging_redirect_tqdm():  # warnings print above the progress bar
        for subset in subsets:
            sub_report, images, annotations = _convert_subset(
                subset,
                output_dir,
                link,
                progress,
                image_id_start=1 + next_ids[(subset.family, "image")],
                ann_id_start=1 + next_ids[(subset.family, "ann")],
            )
            next_ids[(subset.family, "image")] += len(images)
            next_ids[(subset.family, "ann")] += len(annotations)
            per_family.setdefault(subset.family, {})[subset.part] = (images, annotations)
            report.subsets.append(sub_report)

    for family, parts in per_family.items():
        outputs = {part: parts[part] for part in parts}
        for union, members in UNIONS.get(family, {}).items():
            present = [m for m in members if m in parts]
            if present:
                outputs[union] = (
                    [im for m in present for im in parts[m][0]],
                    [an for m in present for an in parts[m][1]],
                )
        for name, (images, annotations) in outputs.items():
            path = os.path.join(output_dir, family, "annotations", f"{name}.json")
            _write_coco(path, images, annotations, f"{family}/{name}")
            report.json_files.append(path)
    return report
