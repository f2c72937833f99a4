"""Detectron2 evaluators for nuclei: Dice, AJI, AJI+, DQ / SQ / PQ and object Dice per image
(optionally also under the authors' release's protocol), plus COCO AP."""

import csv
import itertools
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pycocotools.mask as mask_util
from detectron2.data import DatasetCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

from ..utils.io import atomic_open
from .boxes import BOX_IOU, box_scores, match_boxes, true_boxes
from .metrics import METRIC_NAMES, masks_to_label_map, mean_metrics, nuclei_metrics
from .release_protocol import RELEASE_MIN_AREA, relabel_components, release_label_map

__all__ = [
    "CSV_FIELDS",
    "NucleiEvaluator",
    "annotations_to_label_map",
    "build_nuclei_evaluators",
    "segmentation_to_rle",
]

OBJECT_DICE = "objDice"  # object-level Dice (metrics.object_dice); "Dice" is the pixel Dice
SCORES = METRIC_NAMES + (OBJECT_DICE,)
# box_tp: detections matched to a true box at IoU 0.5 (evaluation.boxes), for box precision/recall
CSV_FIELDS = ("image_id", "file_name", "num_gt", "num_pred", "box_tp") + SCORES
RELEASE_PREFIX = "release_"  # CSV columns of the release's protocol: release_Dice, ...
RELEASE_FIELDS = tuple(RELEASE_PREFIX + name for name in SCORES)


def segmentation_to_rle(segm: Any, height: int, width: int) -> Dict[str, Any]:
    """One COCO RLE for an annotation's "segmentation" (polygons, or RLE compressed or not)."""
    if isinstance(segm, list):
        if not segm:
            raise ValueError("empty polygon list")
        return mask_util.merge(mask_util.frPyObjects(segm, height, width))
    if not isinstance(segm, dict):
        raise ValueError(f"unknown segmentation type {type(segm).__name__}")
    if list(segm["size"]) != [height, width]:
        raise ValueError(f"RLE size {segm['size']} does not match the image ({height}, {width})")
    if isinstance(segm["counts"], list):  # uncompressed RLE, as written by hand or by converters
        return mask_util.frPyObjects(segm, height, width)
    return segm  # compressed RLE; pycocotools accepts str or bytes counts


def annotations_to_label_map(
    annotations: Sequence[Mapping[str, Any]], height: int, width: int
) -> np.ndarray:
    """GT instance label map (height x width, int32) from Detectron2 annotation dicts.

    Annotation ``i`` gets label ``i + 1``; where annotations overlap, the later one wins (the map
    is painted in list order). ``iscrowd`` annotations are regions, not nuclei, so they are left
    out. An annotation without "segmentation" raises ``ValueError``: boxes alone cannot be scored.
    """
    labels = np.zeros((height, width), dtype=np.int32)
    for i, anno in enumerate(annotations):
        if anno.get("iscrowd", 0):
            continue
        if "segmentation" not in anno:
            raise ValueError(f"annotation {i} has no 'segmentation'; nuclei metrics need masks")
        rle = segmentation_to_rle(anno["segmentation"], height, width)
        # Paint inside the mask's box only: painting the full map per nucleus would dominate.
        x, y, w, h = mask_util.toBbox(rle)
        rows = slice(int(np.floor(y)), int(np.ceil(y + h)))
        cols = slice(int(np.floor(x)), int(np.ceil(x + w)))
        mask = mask_util.decode(rle)[rows, cols].view(bool)  # decode gives 0 / 1 uint8
        np.copyto(labels[rows, cols], i + 1, where=mask)
    return labels


class NucleiEvaluator(DatasetEvaluator):
    """Per-image Dice, AJI, AJI+, DQ, SQ, PQ averaged over the images of a split.

    GT comes from ``DatasetCatalog.get(dataset_name)`` (standard dataset dicts with polygon or
    RLE masks), turned into a label map by :func:`annotations_to_label_map` only when its image
    is processed. Predictions are ``outputs[i]["instances"]`` with ``pred_masks`` (N x H x W bool
    at the original image size) and ``scores``; overlaps are resolved by
    :func:`~dessam_d2.evaluation.metrics.masks_to_label_map` (higher score wins).

    ``evaluate()`` returns ``{"nuclei": {"Dice", "AJI", "AJI+", "DQ", "SQ", "PQ", "objDice": mean
    over images in percent, "num_images": n}, "boxes": {"precision", "recall", "F1" (percent,
    pooled over the images: detections matched to a true box at IoU 0.5 over all detections /
    all true boxes, :mod:`~dessam_d2.evaluation.boxes`), "detections", "nuclei"}}`` and, with
    an ``output_dir``, writes one row per image (same percent units; ``num_gt`` = non-crowd
    annotations, ``num_pred`` = predicted instances, ``box_tp`` = detections matched) to
    ``<output_dir>/nuclei_metrics_<dataset_name>.csv``. "Dice" is the pixel Dice of the
    foregrounds (HoVer-Net's Dice1), "objDice" the object-level Dice.

    ``release_protocol=True`` also scores every image as the authors' release does
    (:mod:`~dessam_d2.evaluation.release_protocol`: holes and islands under ``min_area`` px
    removed, later masks overwrite earlier ones, connected components relabelled, GT too): the
    same metrics under ``"nuclei_release"`` and in the CSV's ``release_*`` columns.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        release_protocol: bool = False,
        min_area: int = RELEASE_MIN_AREA,
    ):
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._release = release_protocol
        self._min_area = min_area
        self._logger = logging.getLogger(__name__)
        self._records: Optional[Dict[Any, Dict[str, Any]]] = None  # image_id -> dict, on demand
        self._rows: List[Dict[str, Any]] = []

    def reset(self) -> None:
        self._rows = []

    def _dataset_records(self) -> Dict[Any, Dict[str, Any]]:
        if self._records is None:
            dicts = DatasetCatalog.get(self._dataset_name)
            self._records = {d["image_id"]: d for d in dicts}
        return self._records

    def _record(self, image_id: Any) -> Dict[str, Any]:
        records = self._dataset_records()
        if image_id not in records:
            raise ValueError(f"image_id {image_id!r} is not in dataset '{self._dataset_name}'")
        return records[image_id]

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            if "instances" in out:  # same rule as COCOEvaluator: no instances, nothing to score
                self._rows.append(self._score_image(inp["image_id"], out["instances"].to("cpu")))

    def _score_image(self, image_id: Any, instances: Any) -> Dict[str, Any]:
        record = self._record(image_id)
        height, width = record["height"], record["width"]
        if not instances.has("pred_masks"):
            raise ValueError("NucleiEvaluator needs 'pred_masks' in the predicted Instances")
        masks = instances.pred_masks.numpy()  # N x H x W bool
        if masks.shape[1:] != (height, width):
            raise ValueError(
                f"pred_masks of image {image_id!r} are {tuple(masks.shape[1:])}, expected the "
                f"original size ({height}, {width}); paste masks with detector_postprocess"
            )
        annotations = record.get("annotations", [])
        gt = annotations_to_label_map(annotations, height, width)
        pred = masks_to_label_map(masks, instances.scores.numpy())
        row = {
            "image_id": image_id,
            "file_name": os.path.basename(record.get("file_name", "")),
            "num_gt": sum(1 for a in annotations if not a.get("iscrowd", 0)),
            "num_pred": len(instances),
            "box_tp": _matched(instances, record),
        }
        row.update(_percent(gt, pred))
        if self._release:
            released = release_label_map(masks, instances.scores.numpy(), self._min_area)
            scores = _percent(relabel_components(gt), released)
            row.update({RELEASE_PREFIX + k: v for k, v in scores.items()})
        return row

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        if self._distributed:
            comm.synchronize()
            rows = list(itertools.chain(*comm.gather(self._rows, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            rows = self._rows
        if not rows:
            self._logger.warning("[NucleiEvaluator] Did not receive valid predictions.")
            return {}
        rows = self._in_dataset_order(rows)
        if self._output_dir:
            self._write_csv(rows)
        results = {"nuclei": {**mean_metrics(rows, SCORES), "num_images": len(rows)}}
        results["boxes"] = box_scores(rows)
        if self._release:
            means = mean_metrics(rows, RELEASE_FIELDS)
            results["nuclei_release"] = {
                **{k[len(RELEASE_PREFIX) :]: v for k, v in means.items()},
                "num_images": len(rows),
            }
        tasks = (
            ("nuclei", "as predicted"),
            ("nuclei_release", "release protocol"),
            ("boxes", f"box precision / recall at IoU {BOX_IOU}"),
        )
        for task, what in tasks:
            if task in results:
                self._logger.info(
                    f"Nuclei metrics (%) on {self._dataset_name}, {what}:\n"
                    + create_small_table(results[task])
                )
        return results

    def _in_dataset_order(self, rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """Rows in dataset order, one per image, whatever the number of processes."""
        position = {image_id: i for i, image_id in enumerate(self._dataset_records())}
        unique = {row["image_id"]: row for row in rows}
        if len(unique) < len(rows):
            self._logger.warning("[NucleiEvaluator] Some images were processed twice; kept one.")
        return sorted(unique.values(), key=lambda row: position[row["image_id"]])

    def _write_csv(self, rows: List[Dict[str, Any]]) -> None:
        path = os.path.join(self._output_dir, f"nuclei_metrics_{self._dataset_name}.csv")
        with atomic_open(path, "w", newline="") as f:  # a reader never sees half a file
            fields = CSV_FIELDS + (RELEASE_FIELDS if self._release else ())
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
        self._logger.info(f"Per-image nuclei metrics saved to {path}")


def _matched(instances: Any, record: Dict[str, Any]) -> int:
    if not instances.has("pred_boxes") or len(instances) == 0:
        return 0
    boxes = instances.pred_boxes.tensor
    is_tp, _ = match_boxes(boxes, instances.scores, true_boxes(record), iou_threshold=BOX_IOU)
    return int(is_tp.sum())


def _percent(gt: np.ndarray, pred: np.ndarray) -> Dict[str, float]:
    return {k: 100.0 * v for k, v in nuclei_metrics(gt, pred, with_object_dice=True).items()}


def build_nuclei_evaluators(
    dataset_name: str,
    output_dir: Optional[str],
    max_dets_per_image: int = 1000,
    release_protocol: bool = True,
) -> DatasetEvaluators:
    """COCO box / mask AP plus :class:`NucleiEvaluator`, for ``Trainer.build_evaluator``; by
    default the nuclei metrics both as predicted and under the release's protocol.

    COCO's default of 100 detections per image would cap recall on dense nuclei images;
    Detectron2 turns ``max_dets_per_image`` into ``maxDets = [1, 10, max_dets_per_image]`` and
    reports AP at the last value. ``use_fast_impl=False`` because this build has no C++ COCOeval.
    """
    coco = COCOEvaluator(
        dataset_name,
        tasks=("bbox", "segm"),
        distributed=True,
        output_dir=output_dir,
        use_fast_impl=False,
        max_dets_per_image=max_dets_per_image,
    )
    nuclei = NucleiEvaluator(
        dataset_name, output_dir, distributed=True, release_protocol=release_protocol
    )
    return DatasetEvaluators([coco, nuclei])
