"""The embedded demo: synthetic cytology -> train a small DES-SAM on the CPU -> evaluate -> predict.

Needs no data set and no weights. The untrained model is evaluated first, so the table shows what
training from boxes bought.
"""

import logging
import os
from typing import Dict, List, Sequence

import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.logger import setup_logger
from tabulate import tabulate

from .data import default_dataset_root, make_synthetic_cytology
from .engine import Trainer, apply_epoch_schedule, load_config, num_training_images
from .predict import Predictor, predict_images

logger = logging.getLogger("dessam_d2.demo")

COLUMNS = [("nuclei", "Dice"), ("nuclei", "AJI"), ("nuclei", "AJI+"), ("nuclei", "PQ")]
COLUMNS += [("bbox", "AP"), ("segm", "AP")]


def ensure_synthetic_data(num_train: int = 48, num_test: int = 12) -> str:
    root = os.path.join(default_dataset_root(), "synthetic_cytology")
    have = all(
        os.path.isfile(os.path.join(root, split, "annotations.json")) for split in ("train", "test")
    )
    if not have:
        print(
            f"[demo] generating synthetic cytology ({num_train} train, {num_test} test) in {root}"
        )
        make_synthetic_cytology(root, num_train=num_train, num_test=num_test)
    return root


def _row(name: str, results: Dict) -> List:
    return [name] + [round(results.get(task, {}).get(k, float("nan")), 2) for task, k in COLUMNS]


def results_table(rows: Dict[str, Dict]) -> str:
    headers = ["model"] + [k if t == "nuclei" else f"{t} {k}" for t, k in COLUMNS]
    return tabulate([_row(n, r) for n, r in rows.items()], headers=headers, tablefmt="github")


def run_demo(config_file: str = "configs/dessam_demo.yaml", opts: Sequence[str] = ()) -> Dict:
    ensure_synthetic_data()
    cfg = load_config(config_file, list(opts))
    apply_epoch_schedule(cfg, num_training_images(cfg))
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    setup_logger(cfg.OUTPUT_DIR, name="detectron2")
    setup_logger(cfg.OUTPUT_DIR, name="dessam_d2")
    test_set = cfg.DATASETS.TEST[0]

    print(f"[demo] evaluating the untrained model on {test_set}")
    torch.manual_seed(cfg.SEED)
    untrained = Trainer.build_model(cfg)
    folder = os.path.join(cfg.OUTPUT_DIR, "inference_untrained", test_set)
    evaluator = Trainer.build_evaluator(cfg, test_set, output_folder=folder)
    before = Trainer.test(cfg, untrained, evaluators=[evaluator])
    del untrained

    print(f"[demo] training for {cfg.SOLVER.MAX_ITER} iterations on the CPU (progress every 20)")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    after = Trainer.test(cfg, trainer.model)

    prediction_dir = os.path.join(cfg.OUTPUT_DIR, "predictions")
    images = [d["file_name"] for d in DatasetCatalog.get(test_set)]
    print(f"[demo] predicting {len(images)} held-out images into {prediction_dir}")
    predict_images(Predictor(trainer.model), images, prediction_dir, overwrite=True)

    table = results_table({"untrained": before, "trained": after})
    print(f"\nDES-SAM demo on {test_set} ({len(images)} held-out images, metrics in %):\n")
    print(table)
    print(
        f"\nPictures: {prediction_dir}/*_overlay.png (labels, CSV, GeoJSON beside them)\n"
        f"Model: {os.path.join(cfg.OUTPUT_DIR, 'model_final.pth')}\n"
        f"Per-image metrics: {cfg.OUTPUT_DIR}/inference/{test_set}/"
        f"nuclei_metrics_{test_set}.csv\n"
        f"Data set: {MetadataCatalog.get(test_set).json_file}"
    )
    return {"untrained": before, "trained": after}
