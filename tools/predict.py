#!/usr/bin/env python
"""Segment nuclei in your own images with a trained DES-SAM.

    python tools/predict.py --config-file configs/dessam_clusterseg.yaml \
        --weights output/clusterseg/model_final.pth --input slides/*.png --output predictions/

Writes per image a 16-bit label image, an overlay, a per-nucleus CSV and a QuPath GeoJSON, and
one COCO results JSON for all images (see dessam_d2/predict.py). Images larger than
--tile-size are tiled with --tile-overlap and merged without duplicate or cut nuclei.
"""

import argparse
import logging
import sys

from dessam_d2.cli import run_cli, tune_malloc
from dessam_d2.engine import load_config
from dessam_d2.predict import Predictor, collect_images, load_model_for_inference, predict_images


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--weights", default="", help="trained model (default: MODEL.WEIGHTS)")
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
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)  # fmt: skip


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    cfg = load_config(args.config_file, args.opts)
    images = collect_images(args.input)
    model = load_model_for_inference(cfg, args.weights or cfg.MODEL.WEIGHTS)
    predictor = Predictor(model, args.tile_size, args.tile_overlap)
    summary = predict_images(predictor, images, args.output, overwrite=args.overwrite)
    print(summary.table())
    for path, message in summary.failed.items():
        print(f"failed: {message}")
    print(f"outputs in {args.output}")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    args = parse_args()
    tune_malloc()
    sys.exit(run_cli(main, args))
