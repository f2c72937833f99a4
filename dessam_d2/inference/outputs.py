"""The output files of a prediction, and what a run did (``RunSummary``).

Per input image ``<stem>`` the output folder gets
    <stem>_labels.png    instance label image, 16-bit (0 = background, 1..N = nucleus id)
    <stem>_overlay.png   the image with outlines, boxes and scores (Detectron2 Visualizer)
    <stem>_nuclei.csv    one row per nucleus id: score, box, area, perimeter, circularity,
                         eccentricity, mean and integrated intensity, brightfield integrated
                         optical density
    <stem>.geojson       nucleus polygons as QuPath detections
and, for all images, ``predictions_coco.json`` (COCO results: RLE masks, boxes, scores) with
``predictions_images.json`` (the image ids it refers to). Every file is written to a temporary
name and renamed; an image counts as done when its CSV (written last) exists, so an interrupted
run loses no finished image and a re-run skips them. Slides' outputs: ``slides``.
"""

import csv
import io
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from tabulate import tabulate

from ..errors import UsageError
from ..evaluation.metrics import masks_to_label_map
from ..utils.io import atomic_write_bytes, atomic_write_json
from .features import CSV_FIELDS, nucleus_features, to_geojson

NUCLEI = "nuclei found"  # a RunSummary's count of nuclei
EMPTY = "images with no detection"  # and of the finished images (predicted or skipped) without one


@dataclass
class RunSummary:
    """What a run over its inputs did, for a tool to print (``table``): inputs (``unit``: images
    or slides) done, skipped (done by an earlier run) and failed (input -> why), further counts
    (``counts``: row label -> number, in the table's order, e.g. "nuclei found"), seconds.
    ``done_as`` and ``skipped_as`` say how the first rows read."""

    unit: str = "images"
    done: int = 0
    skipped: int = 0
    failed: Dict[str, str] = field(default_factory=dict)
    counts: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    done_as: str = "predicted"
    skipped_as: str = "skipped (already done)"

    def add(self, label: str, n: int) -> None:
        self.counts[label] = self.counts.get(label, 0) + n

    def empty_warning(self) -> str:
        """One line when some finished images (predicted now or by an earlier run) have no
        detection ("" otherwise)."""
        n = self.counts.get(EMPTY, 0)
        if not n:
            return ""
        return (
            f"WARNING: {n} of {self.done + self.skipped} {self.unit} have no detection: check that "
            "they look like the training images (stain, magnification), lower the box score "
            "threshold (MODEL.ROI_HEADS.SCORE_THRESH_TEST) or train with TEST.SCORE_THRESH_AUTO "
            "True and a longer schedule"
        )

    def table(self) -> str:
        rows = [
            [f"{self.unit} {self.done_as}", self.done],
            [f"{self.unit} {self.skipped_as}", self.skipped],
            [f"{self.unit} failed", len(self.failed)],
        ]
        rows += [[label, n] for label, n in self.counts.items()]
        rows.append(["seconds", f"{self.seconds:.1f}"])
        return tabulate(rows, tablefmt="simple")

    @classmethod
    def of_all(cls, parts: Sequence["RunSummary"], order: Optional[Sequence[str]] = None):
        """The summary of the processes whose summaries are ``parts``: counts added, failures
        in the order of ``order`` (the inputs), the longest time."""
        failed = {path: message for s in parts for path, message in s.failed.items()}
        if order is not None:
            failed = {path: failed[path] for path in order if path in failed}
        counts: Dict[str, int] = {}
        for s in parts:
            for label, n in s.counts.items():
                counts[label] = counts.get(label, 0) + n
        first = parts[0]
        return cls(
            unit=first.unit,
            done=sum(s.done for s in parts),
            skipped=sum(s.skipped for s in parts),
            failed=failed,
            counts=counts,
            seconds=max(s.seconds for s in parts),
            done_as=first.done_as,
            skipped_as=first.skipped_as,
        )


def _png_bytes(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


def output_paths(output_dir: str, image_path: str) -> Dict[str, str]:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    base = os.path.join(output_dir, stem)
    return {
        "labels": base + "_labels.png",
        "overlay": base + "_overlay.png",
        "geojson": base + ".geojson",
        "csv": base + "_nuclei.csv",  # written last: its presence marks the image as done
    }


@contextmanager
def _fixed_numpy_random(seed: int = 0):
    """NumPy's global random state set to ``seed`` for the block, then restored: Detectron2's
    Visualizer picks outline colours at random, which made overlays differ run to run."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def labels_and_rows(image: np.ndarray, instances: Instances) -> Tuple[np.ndarray, List[Dict]]:
    """The label image (H x W int32, 0 = background, nucleus i = the i-th instance) and its CSV
    rows (``nucleus_features``) of one image's predictions: what ``write_outputs`` writes, and
    what the napari plugin shows, with the same ids."""
    masks = instances.pred_masks.numpy()
    scores = instances.scores.numpy()
    labels = masks_to_label_map(masks, scores)
    # masks_to_label_map numbers nuclei by their order in ``masks``; a nucleus hidden entirely by
    # higher-scoring ones gets no pixel and no row.
    id_scores = {i + 1: float(s) for i, s in enumerate(scores)}
    return labels, nucleus_features(image, labels, id_scores)


def write_outputs(image: np.ndarray, instances: Instances, paths: Dict[str, str]) -> int:
    labels, rows = labels_and_rows(image, instances)
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise UsageError(f"{paths['labels']}: more than 65535 nuclei do not fit a 16-bit image")
    atomic_write_bytes(paths["labels"], _png_bytes(labels.astype(np.uint16)))
    vis = Visualizer(image, metadata=None, scale=1.0, instance_mode=ColorMode.IMAGE)
    with _fixed_numpy_random():
        drawn = vis.draw_instance_predictions(instances).get_image()
    atomic_write_bytes(paths["overlay"], _png_bytes(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)))
    atomic_write_json(paths["geojson"], to_geojson(labels, rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(paths["csv"], text.getvalue().encode())
    return len(rows)


def wrote_no_nucleus(paths: Dict[str, str]) -> bool:
    """Whether the finished image of ``paths`` (``output_paths``) has no nucleus: its CSV has
    a header and no row."""
    with open(paths["csv"], newline="") as f:
        return next(csv.DictReader(f), None) is None


def coco_results(image_paths: Iterable[str], output_dir: str) -> Tuple[List[Dict], List[Dict]]:
    """COCO results and image entries rebuilt from the finished images' label images and CSVs.

    The same records as Detectron2's ``instances_to_coco_json`` (category id 1, not 0), encoded
    one mask at a time from the label image: its function needs every mask of an image at once
    (N x H x W booleans: 8 GB for 5 000 nuclei on a 4096^2 tiled image)."""
    results, images = [], []
    for image_id, path in enumerate(image_paths, start=1):
        paths = output_paths(output_dir, path)
        if not os.path.exists(paths["csv"]):
            continue
        labels = cv2.imread(paths["labels"], cv2.IMREAD_UNCHANGED)
        h, w = labels.shape
        images.append({"id": image_id, "file_name": path, "height": h, "width": w})
        with open(paths["csv"], newline="") as f:
            for row in csv.DictReader(f):
                mask = np.asfortranarray(labels == int(row["id"]))
                rle = mask_util.encode(mask)
                rle["counts"] = rle["counts"].decode("ascii")
                x0, y0, x1, y1 = (float(row[k]) for k in ("x0", "y0", "x1", "y1"))
                results.append(
                    {
                        "image_id": image_id,
                        "category_id": 1,
                        "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "score": float(row["score"]),
                        "segmentation": rle,
                    }
                )
    return results, images


def write_coco_results(image_paths: Sequence[str], output_dir: str) -> None:
    """predictions_coco.json and predictions_images.json of the finished ``image_paths``
    (image ids are positions in ``image_paths``, from 1)."""
    results, images = coco_results(image_paths, output_dir)
    atomic_write_json(os.path.join(output_dir, "predictions_coco.json"), results)
    atomic_write_json(os.path.join(output_dir, "predictions_images.json"), images)
