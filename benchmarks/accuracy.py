"""How far each fast precision's outputs are from float32's (the ``accuracy`` phase of
``python -m benchmarks.run``):

- per-nucleus mask IoU against float32 of the same boxes (the student's masks of
  ``segment_boxes``: the encoder and the decoder at that precision, the prompts fixed), on the
  ViT-B of the timed phases (random weights: a measure of the arithmetic only) and on the
  demo's trained model (``make demo``'s ``output/demo/model_final.pth``) with the held-out
  images' true boxes, whose masks are nuclei;
- the demo's AJI on its two held-out sets at each precision, end to end (the detector's boxes
  too), against float32's.

The demo's part needs that model and ``datasets/synthetic_cytology`` (both written by
``make demo``); without them it is skipped with a line saying so.
"""

import os
import shutil
import tempfile
from typing import Dict, List, Sequence

DEMO_CONFIG = "configs/dessam_demo.yaml"
DEMO_WEIGHTS = "output/demo/model_final.pth"
DEMO_SETS = ("dessam_synthetic_test", "dessam_synthetic_shifted_test")


def mask_ious(a, b):
    """IoU of each pair of N x H x W bool masks (1 where both are empty)."""
    import torch

    inter = (a & b).flatten(1).sum(1).float()
    union = (a | b).flatten(1).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def ious_by_precision(model, inputs: List[Dict], boxes: List, dtypes: Sequence[str]) -> Dict:
    """{dtype: per-nucleus IoU tensor against float32} of the student's masks of ``boxes``."""
    import torch

    masks = {}
    for dtype in ("float32",) + tuple(dtypes):
        model.set_inference_dtype(dtype, decoder="auto")
        out = model.segment_boxes(inputs, boxes, student=True)
        masks[dtype] = torch.cat([o["instances"].pred_masks for o in out])
    model.set_inference_dtype("float32", decoder="auto")
    return {d: mask_ious(masks["float32"], masks[d]) for d in dtypes}


def vitb_ious(config_file: str, dtypes: Sequence[str], nuclei: int = 100) -> Dict[str, float]:
    """Median per-nucleus mask IoU against float32 on the timed phases' ViT-B (random weights)
    with ``nuclei`` random boxes."""
    from benchmarks.measure import build_cfg, build_model, random_boxes, synthetic_input

    model = build_model(build_cfg(config_file)).eval()
    inp = synthetic_input(50, model.image_size, with_gt=False)
    ious = ious_by_precision(model, [inp], [random_boxes(nuclei, model.image_size)], dtypes)
    return {d: float(v.median()) for d, v in ious.items()}


def demo_accuracy(dtypes: Sequence[str], weights: str = DEMO_WEIGHTS) -> Dict:
    """On the demo's trained model: the median per-nucleus IoU against float32 with the true
    boxes, and each held-out set's AJI at float32 and at each of ``dtypes``; {"skipped": why}
    without the model or the data."""
    import torch
    from detectron2.data import DatasetCatalog

    import dessam_d2.data.datasets  # noqa: F401  (registers the demo's sets)
    from dessam_d2.config import load_config
    from dessam_d2.data.mapper import DESSAMDatasetMapper
    from dessam_d2.engine.trainer import Trainer
    from dessam_d2.evaluation.boxes import true_boxes
    from dessam_d2.modeling.checkpointer import load_model
    from dessam_d2.recipes.demo_rows import test_on

    if not os.path.isfile(weights):
        return {"skipped": f"no {weights} (make demo writes it)"}
    cfg = load_config(DEMO_CONFIG, ["MODEL.DEVICE", "cpu", "DATASETS.TEST", str(DEMO_SETS)])
    try:
        records = {name: DatasetCatalog.get(name) for name in DEMO_SETS}
    except (OSError, ValueError) as e:  # the data sets' own one-line errors
        return {"skipped": f"no demo data: {e}"}
    model = load_model(cfg, weights).eval()
    mapper = DESSAMDatasetMapper(cfg, is_train=False)
    inputs, boxes = [], []
    for record in records[DEMO_SETS[0]]:
        x = mapper(record)
        inputs.append(x)
        boxes.append(true_boxes(record) * (x["image"].shape[-1] / record["width"]))
    ious = {d: [] for d in dtypes}
    for x, b in zip(inputs, boxes):  # an image at a time: the embedding cache is off here
        for d, v in ious_by_precision(model, [x], [b], dtypes).items():
            ious[d].append(v)
    out = {"mask_iou_median": {d: float(torch.cat(v).median()) for d, v in ious.items()}}
    out["mask_iou_min"] = {d: float(torch.cat(v).min()) for d, v in ious.items()}
    out["nuclei"] = int(sum(len(b) for b in boxes))
    aji, scratch = {}, tempfile.mkdtemp(prefix="dessam_bench_accuracy_")
    for dtype in ("float32",) + tuple(dtypes):
        model.set_inference_dtype(dtype, decoder="auto")
        for name in DEMO_SETS:
            folder = os.path.join(scratch, name)  # not the demo run's own inference/
            evaluator = Trainer.build_evaluator(cfg, name, output_folder=folder)
            aji[dtype, name] = test_on(cfg, model, name, evaluator)["nuclei"]["AJI"]
    model.set_inference_dtype("float32", decoder="auto")
    shutil.rmtree(scratch, ignore_errors=True)
    out["aji"] = {f"{d}/{n}": v for (d, n), v in aji.items()}
    out["aji_change"] = {
        f"{d}/{n}": aji[d, n] - aji["float32", n] for d in dtypes for n in DEMO_SETS
    }
    return out
