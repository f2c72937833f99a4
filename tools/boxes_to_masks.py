#!/usr/bin/env python
"""Turn a COCO file with boxes only into one with a mask for every box.

    # SAM prompted with the boxes as DES-SAM's teacher (needs only the official SAM checkpoint):
    python tools/boxes_to_masks.py --config-file configs/dessam_clusterseg.yaml \
        --annotations boxes.json --image-root images/ --output boxes_with_masks.json
    # or with a trained DES-SAM student:
    python tools/boxes_to_masks.py ... --weights output/clusterseg/model_final.pth --student
"""

import argparse
import logging
import sys

from dessam_d2.cli import add_precision_argument, exit_status, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default="", help="trained DES-SAM (default: MODEL.WEIGHTS)")
    p.add_argument("--annotations", required=True, help="COCO json with boxes")
    p.add_argument("--image-root", required=True, help="folder the file_names are relative to")
    p.add_argument("--output", required=True, help="COCO json to write")
    p.add_argument("--student", action="store_true", help="use the trained student")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="allow running without trained or SAM weights (an untrained model: tests)",
    )
    p.add_argument("--overwrite", action="store_true", help="ignore an interrupted run's progress")
    add_precision_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # Imported here, after parsing: --help and usage errors need no torch.
    from dessam_d2.config import load_config, precision_opts
    from dessam_d2.inference.annotate import boxes_to_masks
    from dessam_d2.inference.predictor import Predictor
    from dessam_d2.inference.weights import resolve_weights
    from dessam_d2.modeling.checkpointer import load_model

    cfg = load_config(args.config_file, precision_opts(args.dtype) + list(args.opts))
    # The teacher needs only SAM's weights; the student needs a trained DES-SAM.
    has_sam = bool(cfg.MODEL.SAM.CHECKPOINT) and not args.student
    flag = "--weights output/<run>/model_final.pth"
    if not args.student:
        flag += " or MODEL.SAM.CHECKPOINT weights/sam_vit_b_01ec64.pth"
    weights = resolve_weights(
        cfg, args.weights, args.random_weights or has_sam, args.config_file, flag
    )
    model = load_model(cfg, weights)
    summary = boxes_to_masks(
        Predictor(model, image_format=cfg.INPUT.FORMAT),
        args.annotations,
        args.image_root,
        args.output,
        student=args.student,
        overwrite=args.overwrite,
    )
    print(summary.table())
    for message in summary.failed.values():
        print(f"failed: {message}")
    print(f"wrote {args.output}")
    return exit_status(summary.done + summary.skipped, len(summary.failed))


if __name__ == "__main__":
    args = parse_args()
    sys.exit(run_cli(main, args))
