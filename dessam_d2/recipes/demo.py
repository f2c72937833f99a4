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
* DES-SAM, stain augmentation: the same, trained with HED stain jitter (INPUT.STAIN_AUGMENT),
  to read on the shifted stain;
* box-supervised, whole network trained: the same model with SAM's encoder and mask decoder
  trained too, L_edge + BoxInst's projection term as the mask loss and no teacher (the paper's
  Fig. 1b paradigm: BoxInst, BoxSnake; ``dessam_d2/recipes/whole_network.py``);
* fully supervised reference: the same detector with Detectron2's Mask R-CNN mask head trained
  on the ground-truth masks for the same schedule (``dessam_d2/recipes/reference.py``; the only
  row that reads masks).

Every trained model's box score threshold is fitted on its training boxes (TEST.SCORE_THRESH_AUTO;
the paper's configs keep the fixed 0.55), and the frozen encoder's embeddings are computed once
per image and shared by the training iterations and every row (MODEL.DESSAM.EMBEDDING_CACHE_DIR
under OUTPUT_DIR, unless set).
"""

import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from ..config import apply_epoch_schedule, load_config, num_training_images
from ..data.datasets import default_dataset_root
from ..data.synthetic.cytology import make_synthetic_cytology
from ..engine import Trainer
from ..engine.anchors import fit_anchors_to_training_boxes
from ..inference.images import predict_images
from ..inference.predictor import Predictor
from ..utils.io import atomic_open
from .demo_picture import comparison_picture
from .demo_rows import (  # noqa: F401  (the tests import the first and last from here)
    EllipsesInDetections,
    evaluate_box_prior_gt,
    evaluate_with_gt_boxes,
    test_on,
    without_learnable_tokens,
)
from .reference import ReferenceTrainer, reference_config
from .whole_network import whole_network_config

logger = logging.getLogger(__name__)

COLUMNS = [("nuclei", "Dice"), ("nuclei", "AJI"), ("nuclei", "AJI+"), ("nuclei", "PQ")]
COLUMNS += [("bbox", "AP"), ("boxes", "precision"), ("boxes", "recall"), ("segm", "AP")]
COLUMNS += [("prompted", "mean IoU")]
# "box P" / "box R": detections matched one-to-one to true boxes at IoU 0.5, at the row's score
# threshold. "IoU/box": mean IoU of the mask each true box prompts with that nucleus (rows given
# the true boxes only)
_NAMES = {("boxes", "precision"): "box P", ("boxes", "recall"): "box R"}
HEADERS = [
    _NAMES.get((t, k)) or {"nuclei": k, "prompted": "IoU/box"}.get(t, f"{t} {k}")
    for t, k in COLUMNS
]
SPLITS = ("train", "test", "test_shifted")
BOX_PRIOR_GT = "box prior, ground-truth boxes"
BOX_PRIOR_DET = "box prior, detector boxes"
REFERENCE = "fully supervised reference"
STAIN = "DES-SAM, stain augmentation"
WHOLE = "box-supervised, whole network trained"


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
    thresholds: Dict[str, Dict] = None  # trained row -> its score-threshold fit (training boxes)
    anchors: str = ""  # the fitted anchors' line ("" when the config's were used)


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


def _row(name: str, results: Dict) -> List:
    values = [results.get(task, {}).get(k) for task, k in COLUMNS]
    return [name] + ["" if v is None else round(v, 2) for v in values]


def results_table(rows: Dict[str, Dict]) -> str:
    headers = ["model"] + HEADERS
    return tabulate([_row(n, r) for n, r in rows.items()], headers=headers, tablefmt="github")


def _quiet_console(logger_names: Sequence[str]) -> None:
    """Keep Detectron2's full model printout (``Model:\\n...``) out of the console; log.txt
    still has it."""

    def no_model_dump(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Model:")

    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(no_model_dump)


def _train(trainer_class, cfg, progress: Progress, what: str):
    """Train one of the demo's models from the same seed; returns (model, its threshold fit)."""
    progress(f"[demo] training {what} for {cfg.SOLVER.MAX_ITER} iterations on the CPU")
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    torch.manual_seed(cfg.SEED)
    trainer = trainer_class(without_test_sets(cfg))  # the rows are evaluated afterwards, once
    trainer.resume_or_load(resume=False)
    trainer.train()
    fit = trainer.score_threshold_hook.fit
    return trainer.model, (asdict(fit) if fit is not None else None)


def run_demo(
    config_file: str = "configs/dessam_demo.yaml",
    opts: Sequence[str] = (),
    progress: Progress = _silent,
) -> DemoResult:
    """Generate the data (once), train DES-SAM, its stain-augmented and whole-network variants
    and the reference, evaluate every row of the table on both held-out sets, predict the
    held-out images; ``progress`` gets one line per step. Writes OUTPUT_DIR/demo_results.json
    (the tables, the thresholds, the seed, the threads, the token)."""
    ensure_synthetic_data(progress=progress)
    cfg = load_config(config_file, list(opts))
    apply_epoch_schedule(cfg, num_training_images(cfg))
    anchors = ""
    if cfg.MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES:
        anchors = fit_anchors_to_training_boxes(cfg)
        progress(f"[demo] {anchors}")
    if not cfg.MODEL.DESSAM.EMBEDDING_CACHE_DIR:
        cfg.MODEL.DESSAM.EMBEDDING_CACHE_DIR = os.path.join(cfg.OUTPUT_DIR, "embedding_cache")
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
        rows[name] = {"untrained": test_on(cfg, untrained, name, evaluator)}
    del untrained

    thresholds = {}
    model, thresholds["DES-SAM"] = _train(Trainer, cfg, progress, "DES-SAM")
    # The jitter changes the image every epoch: no embedding cache for this row.
    stain_opts = ["INPUT.STAIN_AUGMENT", True, "MODEL.DESSAM.EMBEDDING_CACHE_DIR", ""]
    stain_cfg = _variant(cfg, "stain_augment", stain_opts)
    stain, thresholds[STAIN] = _train(Trainer, stain_cfg, progress, "DES-SAM with stain jitter")
    whole_cfg = whole_network_config(cfg)
    whole, thresholds[WHOLE] = _train(
        Trainer, whole_cfg, progress, "the whole network (encoder + decoder) on L_edge, no teacher"
    )
    ref_cfg = reference_config(cfg)
    reference, thresholds[REFERENCE] = _train(
        ReferenceTrainer, ref_cfg, progress, "the fully supervised reference (true masks)"
    )

    for name in test_sets:
        progress(f"[demo] evaluating on {name}")
        table = rows[name]
        out = os.path.join(cfg.OUTPUT_DIR, "inference_ablation", name)
        table[BOX_PRIOR_GT] = evaluate_box_prior_gt(cfg, name, os.path.join(out, "ellipse_gt"))
        table["SAM + ground-truth boxes"] = evaluate_with_gt_boxes(
            cfg, model, name, os.path.join(out, "gt_boxes")
        )
        ev = Trainer.build_evaluator(cfg, name, os.path.join(out, "ellipse_detector"))
        table[BOX_PRIOR_DET] = test_on(cfg, EllipsesInDetections(model), name, ev)
        with without_learnable_tokens(model):
            ev = Trainer.build_evaluator(cfg, name, os.path.join(out, "detector_boxes"))
            table["SAM + detector boxes"] = test_on(cfg, model, name, ev)
        for row, row_cfg, row_model in (
            ("DES-SAM", cfg, model),
            (STAIN, stain_cfg, stain),
            (WHOLE, whole_cfg, whole),
            (REFERENCE, ref_cfg, reference),
        ):
            ev = Trainer.build_evaluator(
                row_cfg, name, os.path.join(row_cfg.OUTPUT_DIR, "inference", name)
            )
            table[row] = test_on(row_cfg, row_model, name, ev)

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
    summary["thresholds"] = thresholds
    summary["anchors"] = anchors
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
        thresholds=thresholds,
        anchors=anchors,
    )


def without_test_sets(cfg):
    """``cfg`` with no DATASETS.TEST: training ends without Detectron2's final evaluation."""
    out = cfg.clone()
    out.defrost()
    out.DATASETS.TEST = ()
    out.DATASETS.TEST_SCORE_THRESH = ()
    out.freeze()
    return out


def _variant(cfg, folder: str, opts: List):
    """``cfg`` with ``opts`` (KEY, value, ...) and its outputs under OUTPUT_DIR/``folder``."""
    out = cfg.clone()
    out.defrost()
    out.merge_from_list(list(opts) + ["OUTPUT_DIR", os.path.join(cfg.OUTPUT_DIR, folder)])
    out.freeze()
    return out


def threshold_report(thresholds: Dict[str, Dict]) -> str:
    """One line per trained row: its fitted score threshold and box P / R on its training boxes
    there and at the paper configs' fixed threshold."""
    lines = [
        "Box score thresholds, fitted on each model's training boxes (best box F1 at IoU 0.5):"
    ]
    for row, fit in (thresholds or {}).items():
        if not fit:
            continue
        lines.append(
            f"  {row}: {fit['threshold']:.3f} (training boxes: precision "
            f"{100 * fit['precision']:.1f}%, recall {100 * fit['recall']:.1f}%); at the paper "
            f"configs' fixed {fit['fixed_threshold']:g}: precision "
            f"{100 * fit['fixed_precision']:.1f}%, recall {100 * fit['fixed_recall']:.1f}%"
        )
    return "\n".join(lines)


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
    if result.thresholds:
        yield "\n" + threshold_report(result.thresholds)
    yield (
        f"\nLearnable token: norm {result.token_norm:.3f}, moved {result.token_change:.3f} "
        f"from its initial value (token/* in metrics.json)\n"
        f"Pictures: {result.prediction_dir}/*_overlay.png (labels, CSV, GeoJSON beside them); "
        f"ground truth | teacher | DES-SAM: {result.picture}\n"
        f"Model: {os.path.join(out, 'model_final.pth')}\n"
        f"Per-image metrics: {out}/inference/<test set>/nuclei_metrics_<test set>.csv\n"
        f"Data set: {result.data_set}"
    )
