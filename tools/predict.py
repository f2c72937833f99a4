#!/usr/bin/env python
"""Segment nuclei in your own images with a trained DES-SAM.

    python tools/predict.py --config-file configs/dessam_clusterseg.yaml \
        --weights output/clusterseg/model_final.pth --input slides/*.png --output predictions/

Writes per image a 16-bit label image, an overlay, a per-nucleus CSV and a QuPath GeoJSON, and
one COCO results JSON for all images (see dessam_d2/inference/predictor.py). Images larger than
--tile-size are tiled with --tile-overlap and merged without duplicate or cut nuclei.
"""

import argparse
import logging
import sys

from dessam_d2.cli import EXIT_USER_ERROR, exit_status, run_cli
from dessam_d2.inference.arguments import add_slide_arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default="", help="trained model (default: MODEL.WEIGHTS)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="allow running without trained weights (an untrained model: tests, benchmarks)",
    )
    p.add_argument("--input", nargs="+", required=True, help="image files, folders or globs")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--tile-size",
        type=int,
        default=0,
        help="tile side in pixels of the image "
        "(default: MODEL.SAM.IMAGE_SIZE); use your training images' size",
    )
    p.add_argument(
        "--tile-overlap",
        type=int,
        default=None,
        help="overlap of tiles, larger than the largest nucleus (default: 128, at most tile/4)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo images already predicted")
    add_slide_arguments(p)  # whole-slide images: dessam_d2/inference/slides.py
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)  # fmt: skip


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # Imported here, after parsing: --help and usage errors need no torch.
    from dessam_d2.config import load_config
    from dessam_d2.inference.predictor import (
        Predictor,
        collect_images,
        load_model_for_inference,
        predict_images,
        resolve_weights,
    )
    from dessam_d2.inference.slides import run_slides, split_slides

    cfg = load_config(args.config_file, args.opts)
    slides, inputs = split_slides(args.input)  # whole-slide images: dessam_d2/inference/slides.py
    # nothing found at all: collect_images names the inputs given in its error
    images = collect_images(inputs or args.input) if inputs or not slides else []
    flag = "--weights output/<run>/model_final.pth"
    weights = resolve_weights(cfg, args.weights, args.random_weights, args.config_file, flag)
    model = load_model_for_inference(cfg, weights)
    predictor = Predictor(model, args.tile_size, args.tile_overlap, cfg.INPUT.FORMAT)
    if slides:
        status = run_slides(predictor, slides, args)
        if not images:
            return status
    summary = predict_images(predictor, images, args.output, overwrite=args.overwrite)
    print(summary.table())
    for path, message in summary.failed.items():
        print(f"failed: {message}")
    print(f"outputs in {args.output}")
    status = exit_status(summary.done + summary.skipped, len(summary.failed))
    if status == EXIT_USER_ERROR:
        print(
            f"error: none of the {len(images)} image(s) could be read: see above", file=sys.stderr
        )
    return status


if __name__ == "__main__":
    args = parse_args()
    sys.exit(run_cli(main, args))
