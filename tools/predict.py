#!/usr/bin/env python
"""Segment nuclei in your own images with a trained DES-SAM.

    python tools/predict.py --config-file configs/dessam_clusterseg.yaml \
        --weights output/clusterseg/model_final.pth --input slides/*.png --output predictions/

Writes per image a 16-bit label image, an overlay, a per-nucleus CSV and a QuPath GeoJSON, and
one COCO results JSON for all images (see dessam_d2/inference/outputs.py). Images larger than
--tile-size are tiled with --tile-overlap and merged without duplicate or cut nuclei.

Several processes or machines (Detectron2's launch; without a GPU, CPU processes with gloo):

    python tools/predict.py ... --num-gpus 2
    python tools/predict.py ... --num-machines 2 --machine-rank R --dist-url tcp://host0:port

split the images (every N-th) and each slide's tiles between them; the outputs are the files
one process writes. Machines must share the --output folder. A process that fails stops the
others within a minute, with its error; what was finished stays for the next run.
"""

import argparse
import logging
import sys
from datetime import timedelta

from dessam_d2.cli import (
    EXIT_USER_ERROR,
    add_launch_arguments,
    add_precision_argument,
    exit_status,
    launch_cli,
)
from dessam_d2.inference.arguments import add_slide_arguments

# Process 0 alone assembles each slide and writes the COCO results while the others wait (at
# barriers that notice a failed process: dessam_d2/inference/peers.py); Detectron2's 30 minutes
# could be too short for a large slide.
LAUNCH_TIMEOUT = timedelta(hours=12)


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
    p.add_argument(
        "--clean-masks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="one outline per nucleus (default): fill holes and drop islands under --min-area "
        "px (the authors' release's clean-up), give overlaps to the higher score, keep each "
        "nucleus' largest piece; --no-clean-masks keeps the masks as the model predicts them",
    )
    p.add_argument(
        "--min-area",
        type=int,
        default=70,
        help="holes and islands under this many pixels go with --clean-masks (default: 70, "
        "the release's)",
    )
    add_slide_arguments(p)  # whole-slide images: dessam_d2/inference/slides/
    add_launch_arguments(p)
    add_precision_argument(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)  # fmt: skip


def report(summary, output: str) -> None:
    print(summary.table())
    for message in summary.failed.values():
        print(f"failed: {message}")
    if summary.empty_warning():
        print(summary.empty_warning(), file=sys.stderr)
    print(f"outputs in {output}")


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # Imported here, after parsing: --help and usage errors need no torch.
    import torch
    from detectron2.utils import comm

    from dessam_d2.config import load_config, precision_opts
    from dessam_d2.inference.images import predict_images
    from dessam_d2.inference.inputs import split_slides
    from dessam_d2.inference.predictor import Predictor
    from dessam_d2.inference.slides import parse_roi, predict_slides
    from dessam_d2.inference.weights import resolve_weights
    from dessam_d2.modeling.checkpointer import load_model

    cfg = load_config(args.config_file, precision_opts(args.dtype) + list(args.opts))
    slides, images = split_slides(args.input)  # whole-slide images: dessam_d2/inference/slides/
    flag = "--weights output/<run>/model_final.pth"
    weights = resolve_weights(cfg, args.weights, args.random_weights, args.config_file, flag)
    if not weights:  # random weights: the same model in every process and every run
        torch.manual_seed(max(cfg.SEED, 0))
    model = load_model(cfg, weights)
    predictor = Predictor(
        model, args.tile_size, args.tile_overlap, cfg.INPUT.FORMAT, args.clean_masks, args.min_area
    )
    rank, world_size = comm.get_rank(), comm.get_world_size()
    run = dict(overwrite=args.overwrite, progress=rank == 0, rank=rank, world_size=world_size)
    status = 0
    if slides:
        roi, tissue = parse_roi(args.roi), not args.all_tiles
        summary = predict_slides(
            predictor, slides, args.output, level=args.level, mpp=args.mpp,
            slide_mpp=args.slide_mpp, roi=roi, detect_tissue=tissue, label_tiff=args.label_tiff,
            **run,
        )  # fmt: skip
        status = 1 if summary.failed else 0
        if rank == 0:
            report(summary, args.output)
    if images:
        summary = predict_images(predictor, images, args.output, **run)
        status = max(status, exit_status(summary.done + summary.skipped, len(summary.failed)))
        if rank == 0:
            report(summary, args.output)
        if rank == 0 and status == EXIT_USER_ERROR:
            print(
                f"error: none of the {len(images)} image(s) could be read: see above",
                file=sys.stderr,
            )
    return status


if __name__ == "__main__":
    sys.exit(launch_cli(main, parse_args(), timeout=LAUNCH_TIMEOUT))
