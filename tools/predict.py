#!/usr/bin/env python
"""Segment nuclei in your own images with a trained DES-SAM.

    python tools/predict.py --config-file configs/dessam_clusterseg.yaml \
        --weights output/clusterseg/model_final.pth --input slides/*.png --output predictions/

Writes per image a 16-bit label image, an overlay, a per-nucleus CSV and a QuPath GeoJSON, and
one COCO results JSON for all images (see dessam_d2/inference/predictor.py). Images larger than
--tile-size are tiled with --tile-overlap and merged without duplicate or cut nuclei.

Several processes or machines (Detectron2's launch; without a GPU, CPU processes with gloo):

    python tools/predict.py ... --num-gpus 2
    python tools/predict.py ... --num-machines 2 --machine-rank R --dist-url tcp://host0:port

split the images (every N-th) and each slide's tiles between them; the outputs are the files
one process writes. Machines must share the --output folder.
"""

import argparse
import logging
import sys
from datetime import timedelta

from dessam_d2.cli import EXIT_USER_ERROR, add_launch_arguments, exit_status, launch_cli
from dessam_d2.inference.arguments import add_slide_arguments

# Process 0 alone assembles a slide and writes its label TIFF while the others wait at the next
# barrier: Detectron2's 30 minutes could be too short for a large slide.
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
    add_slide_arguments(p)  # whole-slide images: dessam_d2/inference/slides.py
    add_launch_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)  # fmt: skip


def run_distributed(predictor, slides, images, args) -> int:
    """main() in one process of several: the same work shared out, process 0 prints."""
    from detectron2.utils import comm

    from dessam_d2.inference.predictor import predict_images_distributed
    from dessam_d2.inference.slides import run_slides

    status = run_slides(predictor, slides, args, distributed=True) if slides else 0
    if slides and not images:
        return status
    summary = predict_images_distributed(
        predictor, images, args.output, args.overwrite, progress=comm.get_rank() == 0
    )
    status = max(status, exit_status(summary.done + summary.skipped, len(summary.failed)))
    if comm.get_rank() == 0:
        print(summary.table())
        for message in summary.failed.values():
            print(f"failed: {message}")
        print(f"outputs in {args.output}")
        if summary.failed and not summary.done + summary.skipped:
            print(
                f"error: none of the {len(images)} image(s) could be read: see above",
                file=sys.stderr,
            )
    return status


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # Imported here, after parsing: --help and usage errors need no torch.
    import torch
    from detectron2.utils import comm

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
    if not weights:  # random weights: the same model in every process and every run
        torch.manual_seed(max(cfg.SEED, 0))
    model = load_model_for_inference(cfg, weights)
    predictor = Predictor(
        model,
        args.tile_size,
        args.tile_overlap,
        cfg.INPUT.FORMAT,
        clean_masks=args.clean_masks,
        min_area=args.min_area,
    )
    if comm.get_world_size() > 1:
        return run_distributed(predictor, slides, images, args)
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
    sys.exit(launch_cli(main, parse_args(), timeout=LAUNCH_TIMEOUT))
