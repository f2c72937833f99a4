"""The embedded demo: synthetic cytology -> train DES-SAM at toy scale on the CPU -> evaluate ->
predict.

Needs no data set and no downloaded weights: SAM is the tiny one shipped in
``weights/tiny_sam_shapes.pth`` (pretrained on other synthetic scenes by
``tools/pretrain_tiny_sam.py``). The table is the paper's ablation (its Tables 4-5) in miniature,
on the held-out images and on a held-out set in a shifted stain style:

* untrained: the detector before training (SAM pretrained, nothing else);
* box prior, ground-truth boxes: an ellipse inscribed in each true box (no model at all: what
  the teacher must beat to be worth distilling);
* SAM + ground-truth boxes: the frozen tiny SAM prompted with the true boxes, i.e. the teacher
  (an upper reference for the masks: it is given the boxes);
* box prior, detector boxes: an ellipse inscribed in each box of the trained detector (what
  DES-SAM's masks must beat);
* SAM + detector boxes: the trained detector's boxes, SAM's own tokens (no learnable token);
* DES-SAM: the trained detector + the learnable token (distillation + edge-aware loss);
* fully supervised reference: the same detector with Detectron2's Mask R-CNN mask head trained
  on the ground-truth masks for the same schedule (``dessam_d2/recipes/reference.py``; the only
  row that reads masks).
"""

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from ..config import apply_epoch_schedule, load_config, num_training_images, score_threshold_of
from ..data.datasets import default_dataset_root
from ..data.mapper import DESSAMDatasetMapper
from ..data.synthetic.cytology import make_synthetic_cytology
from ..engine import Trainer
from ..inference.images import predict_images
from ..inference.predictor import Predictor
from ..utils.io import atomic_open
from .box_prior import ellipse_instances, gt_boxes_of
from .demo_picture import comparison_picture
from .reference import ReferenceTrainer, reference_config

logger = logging.getLogger(__name__)

COLUMNS = [("nuclei", "Dice"), ("nuclei", "AJI"), ("nuclei", "AJI+"), ("nuclei", "PQ")]
COLUMNS += [("bbox", "AP"), ("segm", "AP"), ("prompted", "mean IoU")]
# "IoU/box": mean IoU of the mask each true box prompts with that nucleus (rows given the true
# boxes only)
HEADERS = [{"nuclei": k, "prompted": "IoU/box"}.get(t, f"{t} {k}") for t, k in COLUMNS]
SPLITS = ("train", "test", "test_shifted")
BOX_PRIOR_GT = "box prior, ground-truth boxes"
BOX_PRIOR_DET = "box prior, detector boxes"
REFERENCE = "fully supervised reference"


Progress = Callable[[str], None]


def _silent(message: str) -> None:
    pass


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured and wrote (``demo_report`` makes the console text of it)."""

    tables: Dict[str, Dict[str, Dict]]  # test set -> row (model) -> metrics
    token_norm: float  # the learnable token's norm after training
    token_change: float  # and how far it moved from its initial value
    picture: str  # ground truth | teacher | DES-SAM (PNG)
    prediction_dir: str  # labels, CSV, GeoJSON and overlays of the held-out images
    output_dir: str  # the run's OUTPUT_DIR
    data_set: str  # the first test set's annotation file


def ensure_synthetic_data(
    num_train: int = 48, num_test: int = 12, progress: Progress = _silent
) -> str:
    """The synthetic cytology data set under the data root, generated unless it is there."""
    root = os.path.join(default_dataset_root(), "synthetic_cytology")
    have = all(os.path.isfile(os.path.join(root, s, "annotations.json")) for s in SPLITS)
    if not have:
        progress(
            f"[demo] generating synthetic cytology ({num_train} train, {num_test} test, "
            f"{num_test} test in a shifted stain) in {root}"
        )
        make_synthetic_cytology(root, num_train=num_train, num_test=num_test)
    return root


def _test_on(cfg, model, dataset_name: str, evaluator) -> Dict:
    """``Trainer.test`` on one test set, with its own box score threshold (a set that is not in
    DATASETS.TEST gets MODEL.ROI_HEADS.SCORE_THRESH_TEST)."""
    one = cfg.clone()
    one.defrost()
    one.DATASETS.TEST = (dataset_name,)
    one.DATASETS.TEST_SCORE_THRESH = (score_threshold_of(cfg, dataset_name),)
    one.freeze()
    return Trainer.test(one, model, evaluators=[evaluator])


def _row(name: str, results: Dict) -> List:
    values = [results.get(task, {}).get(k) for task, k in COLUMNS]
    return [name] + ["" if v is None else round(v, 2) for v in values]


def results_table(rows: Dict[str, Dict]) -> str:
    headers = ["model"] + HEADERS
    return tabulate([_row(n, r) for n, r in rows.items()], headers=headers, tablefmt="github")


@contextlib.contextmanager
def without_learnable_tokens(model):
    """Inference with SAM's own output tokens only (the paper's ablation without the prompt)."""
    previous = model.set_learnable_tokens(False)
    try:
        yield model
    finally:
        model.set_learnable_tokens(previous)


@torch.no_grad()
def evaluate_with_gt_boxes(cfg, model, dataset_name: str, output_folder: str) -> Dict:
    """The teacher's masks: SAM (no learnable token) prompted with every ground-truth box."""
    evaluator = Trainer.build_evaluator(cfg, dataset_name, output_folder=output_folder)
    evaluator.reset()
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    model.eval()
    ious = []
    for record in DatasetCatalog.get(dataset_name):
        inputs = mapper(record)
        scale = inputs["image"].shape[-1] / record["width"]
        boxes = torch.as_tensor(gt_boxes_of(record), dtype=torch.float32) * scale
        outputs = model.segment_boxes([inputs], [boxes], student=False)
        evaluator.process([inputs], outputs)
        ious += prompt_ious(record, outputs[0]["instances"].pred_masks)
    return {**evaluator.evaluate(), "prompted": _mean_iou(ious)}


def prompt_ious(record: Dict, masks: torch.Tensor) -> List[float]:
    """IoU of each prompted mask with the true mask of the box it was prompted with (masks in
    the order of ``gt_boxes_of(record)``, original image size)."""
    from pycocotools import mask as mask_util

    from ..evaluation.nuclei_evaluator import segmentation_to_rle

    h, w = record["height"], record["width"]
    annotations = [a for a in record.get("annotations", []) if a.get("iscrowd", 0) == 0]
    ious = []
    for a, pred in zip(annotations, masks.cpu().numpy().astype(bool)):
        gt = mask_util.decode(segmentation_to_rle(a["segmentation"], h, w)).astype(bool)
        ious.append(float((gt & pred).sum() / max((gt | pred).sum(), 1)))
    return ious


def _mean_iou(ious: List[float]) -> Dict:
    return {"mean IoU": 100.0 * float(np.mean(ious)) if ious else float("nan"), "n": len(ious)}


@torch.no_grad()
def evaluate_box_prior_gt(cfg, dataset_name: str, output_folder: str) -> Dict:
    """The box prior on ground-truth boxes: an inscribed ellipse per true box, score 1."""
    evaluator = Trainer.build_evaluator(cfg, dataset_name, output_folder=output_folder)
    evaluator.reset()
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    ious = []
    for record in DatasetCatalog.get(dataset_name):
        inputs = mapper(record)
        boxes = gt_boxes_of(record)
        inst = ellipse_instances(boxes, np.ones(len(boxes)), record["height"], record["width"])
        evaluator.process([inputs], [{"instances": inst}])
        ious += prompt_ious(record, inst.pred_masks)
    return {**evaluator.evaluate(), "prompted": _mean_iou(ious)}


class EllipsesInDetections(torch.nn.Module):
    """A detector's outputs with each mask replaced by the ellipse inscribed in its box (the box
    prior on detector boxes); its score threshold is the detector's, so ``Trainer.test`` applies
    the same per-test-set score thresholds."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def set_score_threshold(self, value: float) -> float:
        return self.model.set_score_threshold(value)

    def forward(self, batched_inputs):
        outputs = self.model(batched_inputs)
        for out in outputs:
            inst = out["instances"].to("cpu")
            h, w = inst.image_size
            boxes = inst.pred_boxes.tensor.numpy()
            out["instances"] = ellipse_instances(boxes, inst.scores.numpy(), h, w)
        return outputs


def _quiet_console(logger_names: Sequence[str]) -> None:
    """Keep Detectron2's full model printout (``Model:\\n...``) out of the console; log.txt
    still has it."""

    def no_model_dump(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Model:")

    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(no_model_dump)


def run_demo(
    config_file: str = "configs/dessam_demo.yaml",
    opts: Sequence[str] = (),
    progress: Progress = _silent,
) -> DemoResult:
    """Generate the data (once), train DES-SAM and the reference, evaluate every row of the
    table on both held-out sets, predict the held-out images; ``progress`` gets one line per
    step. Writes OUTPUT_DIR/demo_results.json (the tables, the seed, the threads, the token)."""
    ensure_synthetic_data(progress=progress)
    cfg = load_config(config_file, list(opts))
    apply_epoch_schedule(cfg, num_training_images(cfg))
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR, name="detectron2")
    setup_logger(cfg.OUTPUT_DIR, name="dessam_d2")
    _quiet_console(["detectron2"])
    test_sets = [cfg.DATASETS.TEST[0], "dessam_synthetic_shifted_test"]

    progress(f"[demo] evaluating the untrained model on {', '.join(test_sets)}")
    torch.manual_seed(cfg.SEED)
    untrained = Trainer.build_model(cfg)
    rows: Dict[str, Dict] = {}
    for name in test_sets:
        folder = os.path.join(cfg.OUTPUT_DIR, "inference_untrained", name)
        evaluator = Trainer.build_evaluator(cfg, name, output_folder=folder)
        rows[name] = {"untrained": _test_on(cfg, untrained, name, evaluator)}
    del untrained

    progress(f"[demo] training for {cfg.SOLVER.MAX_ITER} iterations on the CPU (progress every 20)")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model

    ref_cfg = reference_config(cfg)
    progress(
        f"[demo] training the fully supervised reference (Mask R-CNN mask head on the true "
        f"masks) for {ref_cfg.SOLVER.MAX_ITER} iterations"
    )
    os.makedirs(ref_cfg.OUTPUT_DIR, exist_ok=True)
    torch.manual_seed(cfg.SEED)
    ref_trainer = ReferenceTrainer(ref_cfg)
    ref_trainer.resume_or_load(resume=False)
    ref_trainer.train()

    for name in test_sets:
        progress(f"[demo] evaluating on {name}")
        table = rows[name]
        out = os.path.join(cfg.OUTPUT_DIR, "inference_ablation", name)
        table[BOX_PRIOR_GT] = evaluate_box_prior_gt(cfg, name, os.path.join(out, "ellipse_gt"))
        table["SAM + ground-truth boxes"] = evaluate_with_gt_boxes(
            cfg, model, name, os.path.join(out, "gt_boxes")
        )
        ev = Trainer.build_evaluator(cfg, name, os.path.join(out, "ellipse_detector"))
        table[BOX_PRIOR_DET] = _test_on(cfg, EllipsesInDetections(model), name, ev)
        with without_learnable_tokens(model):
            ev = Trainer.build_evaluator(cfg, name, os.path.join(out, "detector_boxes"))
            table["SAM + detector boxes"] = _test_on(cfg, model, name, ev)
        ev = Trainer.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference", name))
        table["DES-SAM"] = _test_on(cfg, model, name, ev)
        ev = Trainer.build_evaluator(cfg, name, os.path.join(ref_cfg.OUTPUT_DIR, "inference", name))
        table[REFERENCE] = _test_on(ref_cfg, ref_trainer.model, name, ev)

    picture = comparison_picture(
        cfg, model, test_sets[0], os.path.join(cfg.OUTPUT_DIR, "comparison.png")
    )
    prediction_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    images = [d["file_name"] for d in DatasetCatalog.get(test_sets[0])]
    progress(f"[demo] predicting {len(images)} held-out images into {prediction_dir}")
    predict_images(Predictor(model), images, prediction_dir, overwrite=True)

    token = model.token_stats()
    change, norm = token["change"], token["norm"]
    summary = {"seed": cfg.SEED, "threads": torch.get_num_threads(), "tables": rows}
    summary["token"] = {"norm": norm, "change": change}
    with atomic_open(os.path.join(cfg.OUTPUT_DIR, "demo_results.json")) as f:
        f.write(json.dumps(summary, indent=1, default=float).encode())
    return DemoResult(
        tables=rows,
        token_norm=norm,
        token_change=change,
        picture=picture,
        prediction_dir=prediction_dir,
        output_dir=cfg.OUTPUT_DIR,
        data_set=MetadataCatalog.get(test_sets[0]).json_file,
    )


def demo_report(
    result: DemoResult, count_images: Optional[Callable[[str], int]] = None
) -> Iterator[str]:
    """The console text of a demo run, one block per ``print``: each test set's title and table,
    then the token and where the files are. ``count_images(test set)``: its number of images
    (default: loaded from the catalogue when its title is made, as the demo always did: the
    loader's log line stands before that title on the console)."""
    count = count_images or (lambda name: len(DatasetCatalog.get(name)))
    for name, table in result.tables.items():
        yield f"\nDES-SAM demo on {name} ({count(name)} held-out images, metrics in %):\n"
        yield results_table(table)
    out = result.output_dir
    yield (
        f"\nLearnable token: norm {result.token_norm:.3f}, moved {result.token_change:.3f} "
        f"from its initial value (token/* in metrics.json)\n"
        f"Pictures: {result.prediction_dir}/*_overlay.png (labels, CSV, GeoJSON beside them); "
        f"ground truth | teacher | DES-SAM: {result.picture}\n"
        f"Model: {os.path.join(out, 'model_final.pth')}\n"
        f"Per-image metrics: {out}/inference/<test set>/nuclei_metrics_<test set>.csv\n"
        f"Data set: {result.data_set}"
    )
