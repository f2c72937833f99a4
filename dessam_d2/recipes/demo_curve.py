"""How the demo's schedule was picked: DES-SAM trained for several lengths, each with its own
step decay, and evaluated on both held-out sets (box AP, box precision / recall, AJI).

A run of length L warms up for min(WARMUP_ITERS, L / 4) iterations and divides the learning
rate by 10 at 75 % and 90 % of L (the paper's 30 / 36 of 50 epochs, rounded: 60 % and 72 %,
leave too long a tail at toy scale); everything else is the demo config's. Each finished length
is written to ``<output>/demo_curve.json`` at once, so an interrupted curve resumes where it
stopped; ``curve_picture`` draws it (``tools/demo_curve.py`` parses, calls, prints).
"""

import json
import os
from typing import Callable, Dict, List, Sequence

import torch

from ..config import load_config
from ..engine import Trainer
from ..engine.anchors import fit_anchors_to_training_boxes
from ..utils.io import atomic_write_text
from .demo import ensure_synthetic_data, without_test_sets
from .demo_rows import test_on

__all__ = ["schedule_of", "run_curve", "curve_picture", "curve_table"]

TEST_SETS = ("dessam_synthetic_test", "dessam_synthetic_shifted_test")
METRICS = (("bbox", "AP"), ("boxes", "precision"), ("boxes", "recall"), ("nuclei", "AJI"))


def schedule_of(length: int, warmup: int) -> List[str]:
    """Config overrides of a run of ``length`` iterations (see the module doc)."""
    steps = sorted({max(1, round(0.75 * length)), max(1, round(0.9 * length))})
    return [
        "SOLVER.EPOCHS", 0,
        "SOLVER.MAX_ITER", length,
        "SOLVER.STEPS", tuple(s for s in steps if s < length),
        "SOLVER.WARMUP_ITERS", min(warmup, max(1, length // 4)),
        "SOLVER.CHECKPOINT_PERIOD", length,
    ]  # fmt: skip


def _one_length(cfg_file: str, opts: Sequence, length: int, output: str) -> Dict:
    cfg = load_config(cfg_file, list(opts))
    cfg.merge_from_list(schedule_of(length, cfg.SOLVER.WARMUP_ITERS))
    cfg.OUTPUT_DIR = os.path.join(output, f"iterations_{length}")
    if cfg.MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES:
        fit_anchors_to_training_boxes(cfg)
    cfg.freeze()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    torch.manual_seed(cfg.SEED)
    trainer = Trainer(without_test_sets(cfg))  # evaluated below, once
    trainer.resume_or_load(resume=False)
    trainer.train()
    fit = trainer.score_threshold_hook.fit
    out = {"iterations": length, "threshold": fit.threshold if fit else None, "sets": {}}
    for name in TEST_SETS:
        ev = Trainer.build_evaluator(cfg, name, os.path.join(cfg.OUTPUT_DIR, "inference", name))
        res = test_on(cfg, trainer.model, name, ev)
        out["sets"][name] = {f"{t} {k}": res.get(t, {}).get(k) for t, k in METRICS}
    return out


def run_curve(
    lengths: Sequence[int],
    output: str,
    config_file: str = "configs/dessam_demo.yaml",
    opts: Sequence = (),
    progress: Callable[[str], None] = lambda m: None,
) -> List[Dict]:
    """Train and evaluate each length not already in ``<output>/demo_curve.json``; returns all
    points, sorted by length."""
    ensure_synthetic_data(progress=progress)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "demo_curve.json")
    points = json.load(open(path)) if os.path.isfile(path) else []
    done = {p["iterations"] for p in points}
    for length in lengths:
        if length in done:
            continue
        progress(f"[curve] training DES-SAM for {length} iterations")
        points.append(_one_length(config_file, opts, length, output))
        points.sort(key=lambda p: p["iterations"])
        atomic_write_text(path, json.dumps(points, indent=1) + "\n")
        progress(curve_table(points))
    return points


def curve_table(points: Sequence[Dict]) -> str:
    """Markdown: one row per length, box AP / P / R and AJI of both sets."""
    from tabulate import tabulate

    heads = ["iterations", "threshold"]
    heads += [
        f"{short} {m}" for short in ("in-domain", "shifted") for m in ("box AP", "P", "R", "AJI")
    ]
    body = []
    for p in points:
        row = [p["iterations"], "" if p["threshold"] is None else round(p["threshold"], 3)]
        for name in TEST_SETS:
            row += [round(p["sets"][name][f"{t} {k}"] or 0.0, 1) for t, k in METRICS]
        body.append(row)
    return tabulate(body, headers=heads, tablefmt="github")


def curve_picture(points: Sequence[Dict], path: str) -> str:
    """Box AP and AJI against iterations, in-domain and shifted (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p["iterations"] for p in points]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (task, key, title) in zip(axes, (("bbox", "AP", "box AP"), ("nuclei", "AJI", "AJI"))):
        for name, label in zip(TEST_SETS, ("held-out, same stain", "held-out, shifted stain")):
            ax.plot(x, [p["sets"][name][f"{task} {key}"] for p in points], "o-", label=label)
        ax.set_xlabel("training iterations (2 images each)")
        ax.set_ylabel(f"{title} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("DES-SAM demo: schedule length (lr / 10 at 75 % and 90 %)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
