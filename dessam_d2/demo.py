"""The embedded demo: synthetic cytology -> train DES-SAM at toy scale on the CPU -> evaluate ->
predict.

Needs no data set and no downloaded weights: SAM is the tiny one shipped in
``weights/tiny_sam_shapes.pth`` (pretrained on other synthetic scenes by
``tools/pretrain_tiny_sam.py``). The table is the paper's ablation (its Tables 4-5) in miniature,
on the held-out images and on a held-out set in a shifted stain style:

* untrained: the detector before training (SAM pretrained, nothing else);
* SAM + ground-truth boxes: the frozen tiny SAM prompted with the true boxes, i.e. the teacher
  (an upper reference for the masks: it is given the boxes);
* SAM + detector boxes: the trained detector's boxes, SAM's own tokens (no learnable token);
* DES-SAM: the trained detector + the learnable token (distillation + edge-aware loss).
"""

import contextlib
import json
import logging
import os
from typing import Dict, List, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BoxMode
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from .config import apply_epoch_schedule, load_config, num_training_images
from .data import DESSAMDatasetMapper, default_dataset_root, make_synthetic_cytology
from .engine import Trainer
from .inference.predictor import Predictor, predict_images
from .utils.io import atomic_open

logger = logging.getLogger("dessam_d2.demo")

COLUMNS = [("nuclei", "Dice"), ("nuclei", "AJI"), ("nuclei", "AJI+"), ("nuclei", "PQ")]
COLUMNS += [("bbox", "AP"), ("segm", "AP")]
SPLITS = ("train", "test", "test_shifted")


def ensure_synthetic_data(num_train: int = 48, num_test: int = 12) -> str:
    root = os.path.join(default_dataset_root(), "synthetic_cytology")
    have = all(os.path.isfile(os.path.join(root, s, "annotations.json")) for s in SPLITS)
    if not have:
        print(
            f"[demo] generating synthetic cytology ({num_train} train, {num_test} test, "
            f"{num_test} test in a shifted stain) in {root}"
        )
        make_synthetic_cytology(root, num_train=num_train, num_test=num_test)
    return root


def _row(name: str, results: Dict) -> List:
    return [name] + [round(results.get(task, {}).get(k, float("nan")), 2) for task, k in COLUMNS]


def results_table(rows: Dict[str, Dict]) -> str:
    headers = ["model"] + [k if t == "nuclei" else f"{t} {k}" for t, k in COLUMNS]
    return tabulate([_row(n, r) for n, r in rows.items()], headers=headers, tablefmt="github")


@contextlib.contextmanager
def without_learnable_tokens(model):
    """Inference with SAM's own output tokens only (the paper's ablation without the prompt)."""
    head = model.roi_heads.mask_head
    head.tokens_at_inference = False
    try:
        yield model
    finally:
        head.tokens_at_inference = True


@torch.no_grad()
def evaluate_with_gt_boxes(cfg, model, dataset_name: str, output_folder: str) -> Dict:
    """The teacher's masks: SAM (no learnable token) prompted with every ground-truth box."""
    evaluator = Trainer.build_evaluator(cfg, dataset_name, output_folder=output_folder)
    evaluator.reset()
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    model.eval()
    for record in DatasetCatalog.get(dataset_name):
        inputs = mapper(record)
        scale = inputs["image"].shape[-1] / record["width"]
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
            for a in record.get("annotations", [])
        ]
        boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
        outputs = model.segment_boxes([inputs], [boxes], student=False)
        evaluator.process([inputs], outputs)
    return evaluator.evaluate()


def _quiet_console(logger_names: Sequence[str]) -> None:
    """Keep Detectron2's full model printout (``Model:\\n...``) out of the console; log.txt
    still has it."""

    def no_model_dump(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Model:")

    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.addFilter(no_model_dump)


def run_demo(config_file: str = "configs/dessam_demo.yaml", opts: Sequence[str] = ()) -> Dict:
    ensure_synthetic_data()
    cfg = load_config(config_file, list(opts))
    apply_epoch_schedule(cfg, num_training_images(cfg))
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR, name="detectron2")
    setup_logger(cfg.OUTPUT_DIR, name="dessam_d2")
    _quiet_console(["detectron2"])
    test_sets = [cfg.DATASETS.TEST[0], "dessam_synthetic_shifted_test"]

    print(f"[demo] evaluating the untrained model on {test_sets[0]}")
    torch.manual_seed(cfg.SEED)
    untrained = Trainer.build_model(cfg)
    folder = os.path.join(cfg.OUTPUT_DIR, "inference_untrained", test_sets[0])
    evaluator = Trainer.build_evaluator(cfg, test_sets[0], output_folder=folder)
    rows = {test_sets[0]: {"untrained": Trainer.test(cfg, untrained, evaluators=[evaluator])}}
    del untrained

    print(f"[demo] training for {cfg.SOLVER.MAX_ITER} iterations on the CPU (progress every 20)")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model

    for name in test_sets:
        print(f"[demo] evaluating on {name}")
        table = rows.setdefault(name, {})
        out = os.path.join(cfg.OUTPUT_DIR, "inference_ablation", name)
        table["SAM + ground-truth boxes"] = evaluate_with_gt_boxes(
            cfg, model, name, os.path.join(out, "gt_boxes")
        )
        with without_learnable_tokens(model):
            ev = Trainer.build_evaluator(cfg, name, os.path.join(out, "detector_boxes"))
            table["SAM + detector boxes"] = Trainer.test(cfg, model, evaluators=[ev])
        ev = Trainer.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference", name))
        table["DES-SAM"] = Trainer.test(cfg, model, evaluators=[ev])

    prediction_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    images = [d["file_name"] for d in DatasetCatalog.get(test_sets[0])]
    print(f"[demo] predicting {len(images)} held-out images into {prediction_dir}")
    predict_images(Predictor(model), images, prediction_dir, overwrite=True)

    head = model.roi_heads.mask_head
    change = float((head.learnable_tokens.detach() - head.learnable_tokens_init).norm())
    summary = {"seed": cfg.SEED, "threads": torch.get_num_threads(), "tables": rows}
    summary["token"] = {"norm": float(head.learnable_tokens.norm()), "change": change}
    with atomic_open(os.path.join(cfg.OUTPUT_DIR, "demo_results.json")) as f:
        f.write(json.dumps(summary, indent=1, default=float).encode())
    for name, table in rows.items():
        n = len(DatasetCatalog.get(name))
        print(f"\nDES-SAM demo on {name} ({n} held-out images, metrics in %):\n")
        print(results_table(table))
    print(
        f"\nLearnable token: norm {float(head.learnable_tokens.norm()):.3f}, moved {change:.3f} "
        f"from its initial value (token/* in metrics.json)\n"
        f"Pictures: {prediction_dir}/*_overlay.png (labels, CSV, GeoJSON beside them)\n"
        f"Model: {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}\n"
        f"Per-image metrics: {cfg.OUTPUT_DIR}/inference/<test set>/nuclei_metrics_<test set>.csv\n"
        f"Data set: {MetadataCatalog.get(test_sets[0]).json_file}"
    )
    return rows


def spread_report(run_dirs: Sequence[str]) -> str:
    """Markdown: per test set and row, mean ± std over the runs' demo_results.json, the worst
    run's DES-SAM AJI and the list of runs."""
    import numpy as np

    results = []
    for d in run_dirs:
        path = os.path.join(d, "demo_results.json")
        if os.path.isfile(path):
            with open(path) as f:
                results.append(json.load(f))
    if not results:
        return "no finished run\n"
    lines = [
        f"{len(results)} runs: "
        + ", ".join(f"seed {r['seed']} x {r['threads']} thread(s)" for r in results)
    ]
    headers = ["model"] + [k if t == "nuclei" else f"{t} {k}" for t, k in COLUMNS]
    for name in results[0]["tables"]:
        body = []
        for row in results[0]["tables"][name]:
            vals = np.array(
                [
                    [r["tables"][name][row].get(t, {}).get(k, np.nan) for t, k in COLUMNS]
                    for r in results
                ]
            )
            body.append([row] + [f"{m:.2f} ± {s:.2f}" for m, s in zip(vals.mean(0), vals.std(0))])
        lines += ["", f"**{name}** (mean ± std over the runs)", ""]
        lines.append(tabulate(body, headers=headers, tablefmt="github"))
        if "DES-SAM" in results[0]["tables"][name]:
            aji = [r["tables"][name]["DES-SAM"]["nuclei"]["AJI"] for r in results]
            worst = results[int(np.argmin(aji))]
            lines.append(
                f"\nworst DES-SAM run: seed {worst['seed']} x {worst['threads']} thread(s), "
                + ", ".join(
                    f"{k} {worst['tables'][name]['DES-SAM'].get(t, {}).get(k, 0):.2f}"
                    for t, k in COLUMNS
                )
            )
    return "\n".join(lines) + "\n"
