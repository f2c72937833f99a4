"""Predict nuclei on your own images: label images, overlays, per-nucleus features, GeoJSON, COCO.

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
run loses no finished image and a re-run skips them (``overwrite=True`` redoes them).
"""

import csv
import glob
import io
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.visualizer import ColorMode, Visualizer
from tabulate import tabulate
from tqdm import tqdm

from ..data.image_io import read_image_rgb
from ..data.mapper import sam_model_input
from ..errors import ConfigError, ImageReadError, InputNotFoundError, UsageError
from ..evaluation.metrics import masks_to_label_map
from ..evaluation.release_protocol import RELEASE_MIN_AREA
from ..utils.io import atomic_write_bytes, atomic_write_json

# label_polygons: imported from here by slides.py
from .features import CSV_FIELDS, label_polygons, nucleus_features, to_geojson  # noqa: F401
from .outlines import one_piece_per_nucleus
from .tiling import tile_core, tile_starts

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def collect_images(inputs: Sequence[str]) -> List[str]:
    """Files, folders (their images, not recursive) and glob patterns -> sorted unique paths."""
    found: List[str] = []
    for item in inputs:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            found += [os.path.join(item, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
        elif any(c in item for c in "*?["):
            found += sorted(p for p in glob.glob(item) if p.lower().endswith(IMAGE_EXTENSIONS))
        else:
            found.append(item)  # a missing file is reported per image, the rest go on
    unique = list(dict.fromkeys(os.path.normpath(p) for p in found))
    if not unique:
        raise InputNotFoundError(f"no images found in {list(inputs)}: give files, folders or globs")
    return unique


class Predictor:
    """A DES-SAM model that segments whole images of any size (tiled when larger than a tile).

    ``clean_masks``: each tile's masks go through
    :func:`~dessam_d2.inference.outlines.one_piece_per_nucleus` (holes and islands under
    ``min_area`` px removed, overlaps to the higher score, the largest piece kept): one outline
    per nucleus. Off by default here (the model's masks as predicted); ``tools/predict.py`` turns
    it on."""

    def __init__(
        self,
        model: torch.nn.Module,
        tile_size: int = 0,
        tile_overlap: Optional[int] = None,
        image_format: str = "RGB",
        clean_masks: bool = False,
        min_area: int = RELEASE_MIN_AREA,
    ):
        self.model = model.eval()
        self.clean_masks = clean_masks
        self.min_area = min_area
        self.image_size = model.image_size
        self.image_format = image_format  # cfg.INPUT.FORMAT: what the model was trained on
        self.tile_size = tile_size or self.image_size
        if tile_overlap is None:  # default: 128 px, at most a quarter of the tile
            tile_overlap = min(128, self.tile_size // 4)
        if not 0 <= tile_overlap < self.tile_size:
            raise UsageError(
                f"tile overlap {tile_overlap} must be in [0, tile size {self.tile_size}): "
                "pass a smaller --tile-overlap or a larger --tile-size"
            )
        self.tile_overlap = tile_overlap

    def model_input(self, image: np.ndarray, boxes: Optional[np.ndarray] = None):
        """``sam_model_input`` (the mapper's): the input dict and ``boxes`` in its frame."""
        return sam_model_input(image, self.image_size, self.image_format, boxes=boxes)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Instances:
        """H x W x 3 uint8 RGB -> Instances at the image's size (pred_masks, boxes, scores)."""
        h, w = image.shape[:2]
        t = self.tile_size
        ys, xs = tile_starts(h, t, self.tile_overlap), tile_starts(w, t, self.tile_overlap)
        if len(ys) == len(xs) == 1:
            return self._predict_tile(image)
        parts = []
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                inst = self._predict_tile(image[y : y + t, x : x + t])
                boxes = inst.pred_boxes.tensor
                cy, cx = (boxes[:, 1] + boxes[:, 3]) / 2 + y, (boxes[:, 0] + boxes[:, 2]) / 2 + x
                (y0, y1), (x0, x1) = tile_core(ys, iy, t, h), tile_core(xs, ix, t, w)
                keep = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
                parts.append((inst[keep], y, x))
        return self._merge(parts, (h, w))

    def _predict_tile(self, tile: np.ndarray) -> Instances:
        inst = self.model([self.model_input(tile)[0]])[0]["instances"].to("cpu")
        if self.clean_masks and len(inst):
            masks = one_piece_per_nucleus(
                inst.pred_masks.numpy(), inst.scores.numpy(), self.min_area
            )
            inst.pred_masks = torch.from_numpy(masks)
        return inst

    @staticmethod
    def _merge(parts, size) -> Instances:
        h, w = size
        out = Instances(size)
        n = sum(len(p) for p, _, _ in parts)
        masks = torch.zeros(n, h, w, dtype=torch.bool)
        boxes, scores, i = [], [], 0
        for inst, y, x in parts:
            th, tw = inst.image_size
            masks[i : i + len(inst), y : y + th, x : x + tw] = inst.pred_masks
            boxes.append(inst.pred_boxes.tensor + torch.tensor([x, y, x, y], dtype=torch.float32))
            scores.append(inst.scores)
            i += len(inst)
        out.pred_masks = masks
        out.pred_boxes = Boxes(torch.cat(boxes) if boxes else torch.zeros(0, 4))
        out.scores = torch.cat(scores) if scores else torch.zeros(0)
        out.pred_classes = torch.zeros(n, dtype=torch.int64)
        return out


def _png_bytes(array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return buf.tobytes()


@dataclass
class PredictionSummary:
    done: int = 0
    skipped: int = 0
    nuclei: int = 0
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        rows = [
            ["images predicted", self.done],
            ["images skipped (already done)", self.skipped],
            ["images failed", len(self.failed)],
            ["nuclei found", self.nuclei],
            ["seconds", f"{self.seconds:.1f}"],
        ]
        return tabulate(rows, tablefmt="simple")


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


def write_outputs(image: np.ndarray, instances: Instances, paths: Dict[str, str]) -> int:
    masks = instances.pred_masks.numpy()
    scores = instances.scores.numpy()
    labels = masks_to_label_map(masks, scores)
    # masks_to_label_map numbers nuclei by their order in ``masks``; a nucleus hidden entirely by
    # higher-scoring ones gets no pixel and no row.
    id_scores = {i + 1: float(s) for i, s in enumerate(scores)}
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        raise UsageError(f"{paths['labels']}: more than 65535 nuclei do not fit a 16-bit image")
    atomic_write_bytes(paths["labels"], _png_bytes(labels.astype(np.uint16)))
    vis = Visualizer(image, metadata=None, scale=1.0, instance_mode=ColorMode.IMAGE)
    with _fixed_numpy_random():
        drawn = vis.draw_instance_predictions(instances).get_image()
    atomic_write_bytes(paths["overlay"], _png_bytes(cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR)))
    rows = nucleus_features(image, labels, id_scores)
    atomic_write_json(paths["geojson"], to_geojson(labels, rows))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(paths["csv"], text.getvalue().encode())
    return len(rows)


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


def predict_images(
    predictor: Predictor,
    image_paths: Sequence[str],
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
    coco: bool = True,
) -> PredictionSummary:
    """Predict ``image_paths`` one by one; ``coco``: then write the COCO results of all."""
    os.makedirs(output_dir, exist_ok=True)
    summary = PredictionSummary()
    start = time.perf_counter()
    for path in tqdm(image_paths, desc="predict", unit="image", disable=not progress):
        paths = output_paths(output_dir, path)
        if os.path.exists(paths["csv"]) and not overwrite:
            summary.skipped += 1
            continue
        try:
            image = read_image_rgb(path)
        except ImageReadError as e:
            summary.failed[path] = str(e)
            logger.warning(str(e))
            continue
        summary.nuclei += write_outputs(image, predictor(image), paths)
        summary.done += 1
    if coco:
        write_coco_results(image_paths, output_dir)
    summary.seconds = time.perf_counter() - start
    return summary


def write_coco_results(image_paths: Sequence[str], output_dir: str) -> None:
    """predictions_coco.json and predictions_images.json of the finished ``image_paths``
    (image ids are positions in ``image_paths``, from 1)."""
    results, images = coco_results(image_paths, output_dir)
    atomic_write_json(os.path.join(output_dir, "predictions_coco.json"), results)
    atomic_write_json(os.path.join(output_dir, "predictions_images.json"), images)


def predict_images_distributed(
    predictor: Predictor,
    image_paths: Sequence[str],
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
) -> PredictionSummary:
    """``predict_images`` by every process of a ``torch.distributed`` job (Detectron2's
    ``launch``): process r predicts every world-size-th image from the r-th, then process 0
    writes the COCO results of all (the same files as one process writes); every process gets
    the summary of all. ``output_dir`` must be one folder for all (shared between machines)."""
    from detectron2.utils import comm

    rank, world_size = comm.get_rank(), comm.get_world_size()
    mine = list(image_paths)[rank::world_size]
    summary = predict_images(predictor, mine, output_dir, overwrite, progress, coco=False)
    every = comm.all_gather(summary)  # also a barrier: every image is finished after it
    if rank == 0:
        write_coco_results(image_paths, output_dir)
    failed = {path: message for s in every for path, message in s.failed.items()}
    return PredictionSummary(
        done=sum(s.done for s in every),
        skipped=sum(s.skipped for s in every),
        nuclei=sum(s.nuclei for s in every),
        failed={path: failed[path] for path in image_paths if path in failed},
        seconds=max(s.seconds for s in every),
    )


def resolve_weights(cfg, weights: str, random_weights: bool, config_file: str, flag: str) -> str:
    """The trained weights to load: ``weights``, else ``cfg.MODEL.WEIGHTS``. Neither is a user
    error (a model with random weights predicts noise and would not say so) unless
    ``random_weights`` (the tools' ``--random-weights``, for tests and benchmarks) is set."""
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights and not random_weights:
        raise ConfigError(
            f"{config_file}: no trained weights (MODEL.WEIGHTS is empty and no --weights given): "
            f"pass {flag}, or --random-weights to run an untrained model"
        )
    return weights


def load_model_for_inference(cfg, weights: Optional[str]) -> torch.nn.Module:
    """Build the model of ``cfg`` and load ``weights`` (a trained DES-SAM checkpoint), strictly:
    a missing, truncated or other-config file is a one-line ``CheckpointError``."""
    from detectron2.modeling import build_model

    from ..modeling.checkpointer import DESSAMCheckpointer

    model = build_model(cfg)
    if weights:
        if not os.path.isfile(weights):
            raise InputNotFoundError(f"weights {weights} do not exist: pass a trained model_*.pth")
        DESSAMCheckpointer(model).load(weights)
    return model.eval()
