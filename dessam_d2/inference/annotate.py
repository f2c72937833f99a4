"""Boxes -> masks: bootstrap nucleus outlines from a COCO file that has boxes only.

SAM is prompted with each given box, either as DES-SAM's teacher (SAM's own output tokens: works
with the official SAM checkpoint alone) or as the trained student (with its learnable tokens).
Progress is appended per image to ``<output>.partial.jsonl``, so a killed run resumes where it
stopped; the output JSON is written once, atomically, at the end.
"""

import json
import math
import os
import time
from typing import Dict, List

import numpy as np
import torch
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.structures import Instances
from tqdm import tqdm

from ..data.image_io import read_image_rgb
from ..errors import DatasetFormatError, EmptyDatasetError, ImageReadError, InputNotFoundError
from ..utils.io import atomic_write_json
from .outputs import RunSummary
from .predictor import Predictor

MASKS = "masks written"  # the RunSummary's counts
DEGENERATE = "boxes skipped (malformed, zero or negative size, outside the image)"


def read_coco(path: str) -> Dict:
    if not os.path.isfile(path):
        raise InputNotFoundError(f"annotation file {path} does not exist")
    try:
        with open(path) as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"{path} is not valid JSON ({e}): fix or re-export it") from None
    if not isinstance(coco, dict) or not {"images", "annotations"} <= coco.keys():
        raise DatasetFormatError(f"{path} is not a COCO file: it needs 'images' and 'annotations'")
    if not isinstance(coco["images"], list) or not isinstance(coco["annotations"], list):
        raise DatasetFormatError(f"{path}: 'images' and 'annotations' must be lists")
    for kind, keys in (("images", ("id", "file_name")), ("annotations", ("image_id",))):
        for i, entry in enumerate(coco[kind]):
            if not isinstance(entry, dict) or not all(k in entry for k in keys):
                raise DatasetFormatError(
                    f"{path}: {kind}[{i}] has no {' or '.join(keys)}; fix or re-export the file"
                )
    if not coco["images"]:
        raise EmptyDatasetError(f"{path} lists no images: nothing to segment")
    return coco


def _valid_box(bbox, width: int, height: int) -> bool:
    """A box of 4 finite numbers, of positive size, that overlaps the image."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return False
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        return False
    x, y, w, h = bbox
    return w > 0 and h > 0 and x < width and y < height and x + w > 0 and y + h > 0


@torch.no_grad()
def segment_image_boxes(
    predictor: Predictor, image: np.ndarray, xyxy: np.ndarray, student: bool = False
) -> Instances:
    """SAM's masks for the boxes ``xyxy`` (N x 4, image pixels; clipped to the image) of one
    H x W x 3 RGB image, as the teacher (``student=False``: SAM's own output tokens) or the
    trained student; Instances at the image's size, one per box, in the boxes' order."""
    h, w = image.shape[:2]
    xyxy = np.array(xyxy, dtype=np.float64).reshape(-1, 4)
    xyxy[:, 0::2] = xyxy[:, 0::2].clip(0, w)
    xyxy[:, 1::2] = xyxy[:, 1::2].clip(0, h)
    inputs, boxes = predictor.model_input(image, xyxy)  # boxes in the input's frame
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    model = predictor.model
    return model.segment_boxes([inputs], [boxes], student=student)[0]["instances"].to("cpu")


def _read_partial(path: str) -> Dict[int, List[Dict]]:
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: that image is redone
                done[entry["image_id"]] = entry["annotations"]
    return done


@torch.no_grad()
def boxes_to_masks(
    predictor: Predictor,
    annotation_file: str,
    image_root: str,
    output_file: str,
    student: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> RunSummary:
    """Write ``output_file``: the input COCO file with a ``segmentation`` (RLE) for every box.
    Raises ImageReadError, writing nothing, when not one image could be read."""
    coco = read_coco(annotation_file)
    by_image: Dict[int, List[Dict]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    partial = output_file + ".partial.jsonl"
    if overwrite and os.path.exists(partial):
        os.remove(partial)
    done = _read_partial(partial)
    summary = RunSummary(
        counts={MASKS: 0, DEGENERATE: 0},
        done_as="segmented",
        skipped_as="resumed from an earlier run",
    )
    start = time.perf_counter()
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    with open(partial, "a") as log:
        for info in tqdm(coco["images"], desc="boxes->masks", disable=not progress):
            if info["id"] in done:
                summary.skipped += 1
                continue
            path = os.path.join(image_root, info["file_name"])
            try:
                image = read_image_rgb(path)
            except ImageReadError as e:
                summary.failed[path] = str(e)  # the tool lists them after the summary
                continue
            h, w = image.shape[:2]
            anns = [a for a in by_image.get(info["id"], []) if _valid_box(a.get("bbox"), w, h)]
            summary.add(DEGENERATE, len(by_image.get(info["id"], [])) - len(anns))
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            inst = segment_image_boxes(predictor, image, xyxy, student)
            # Detectron2's COCO encoding of the masks (RLE), one per box, in the boxes' order
            encoded = instances_to_coco_json(inst, info["id"])
            areas = inst.pred_masks.flatten(1).sum(1).tolist()
            out = [
                {**ann, "segmentation": e["segmentation"], "area": float(area)}
                for ann, e, area in zip(anns, encoded, areas)
            ]
            log.write(json.dumps({"image_id": info["id"], "annotations": out}) + "\n")
            log.flush()
            done[info["id"]] = out
            summary.done += 1
    if summary.failed and not done:
        os.remove(partial)  # empty: nothing to resume
        raise ImageReadError(
            f"no image of {annotation_file} could be read under {image_root} (first: "
            f"{next(iter(summary.failed.values()))}); nothing written"
        )
    annotations = [a for anns in done.values() for a in anns]
    summary.add(MASKS, len(annotations))
    atomic_write_json(output_file, {**coco, "annotations": annotations})
    if not summary.failed:
        os.remove(partial)
    summary.seconds = time.perf_counter() - start
    return summary
