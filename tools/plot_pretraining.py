#!/usr/bin/env python
"""Plot tiny-SAM pretraining curves (training Dice loss, held-out mask IoU) from the console logs
of tools/pretrain_tiny_sam.py, one line per run.

    python tools/plot_pretraining.py --output weights/pretraining_curves.png \
        "phase 4=weights/tiny_sam_shapes_phase4.log@3100" \
        "probe=weights/pretraining_runs/probe_pe_scale3.log@4100"
"""

import argparse
import json
import re


def read_log(path):
    """(iterations, Dice losses), (iterations, held-out IoUs) of one console log; a resumed run
    repeats iterations, the last line of an iteration counts."""
    losses, ious = {}, {}
    last = 0
    with open(path) as f:
        for line in f:
            summary = re.search(r"held-out mask IoU (before|after) pretraining: ([0-9.]+)", line)
            if summary:
                ious[0 if summary.group(1) == "before" else last] = float(summary.group(2))
            m = re.search(r"(\{.*\})\s*$", line)
            if not m:
                continue
            entry = json.loads(m.group(1))
            last = max(last, entry.get("iter", 0))
            if "dice" in entry:
                losses[entry["iter"]] = entry["dice"]
            if "iou" in entry:
                ious[entry["iter"]] = entry["iou"]
    return sorted(losses.items()), sorted(ious.items())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=LOG (an iteration offset: LABEL=LOG@OFFSET)")
    p.add_argument("--output", required=True, help="PNG to write")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        label, _, path = run.partition("=")
        path, _, offset = path.partition("@")
        losses, ious = read_log(path)
        shift = int(offset or 0)
        if losses:
            ax1.plot([i + shift for i, _ in losses], [d for _, d in losses], label=label, lw=0.8)
        if ious:
            ax2.plot([i + shift for i, _ in ious], [v for _, v in ious], "o-", label=label)
    ax1.set(xlabel="iteration", ylabel="training Dice loss", title="loss (every 25 iterations)")
    ax2.set(xlabel="iteration", ylabel="mean mask IoU", title="held-out scenes, exact boxes")
    ax2.axhline(0.85, color="grey", ls="--", lw=0.8)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.output, dpi=90)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
