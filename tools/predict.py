#!/usr/bin/env python
"""Segment nuclei in your own images with a trained DES-SAM.

    python tools/predict.py --config-file configs/dessam_clusterseg.yaml \
        --weights output/clusterseg/model_final.pth --input slides/*.png --output predictions/

Writes per image a 16-bit label image, an overlay, a per-nucleus CSV and a QuPath GeoJSON, and
one COCO results JSON for all images (see dessam_d2/predict.py). Images larger than
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
from typing import Optional

import torch
from detectron2.engine import launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from dessam_d2.cli import EXIT_USER_ERROR, exit_status, run_cli, tune_malloc
from dessam_d2.engine import load_config
from dessam_d2.predict import (
    Predictor,
    collect_images,
    load_model_for_inference,
    predict_images,
    predict_images_distributed,
    resolve_weights,
)
from dessam_d2.slides import add_slide_arguments, run_slides, split_slides


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
    add_slide_arguments(p)  # whole-slide images: dessam_d2/slides.py
    add_launch_arguments(p)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)  # fmt: skip


def add_launch_arguments(parser) -> None:
    """Detectron2's launcher options (default_argument_parser's names and meanings)."""
    group = parser.add_argument_group(
        "several processes or machines (Detectron2's launch; outputs as one process writes)"
    )
    group.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes per machine: one per GPU, or CPU processes when there is no GPU "
        "(then set OMP_NUM_THREADS to cores / processes)",
    )
    group.add_argument("--num-machines", type=int, default=1, help="total number of machines")
    group.add_argument(
        "--machine-rank", type=int, default=0, help="the rank of this machine (0 ... M-1)"
    )
    group.add_argument(
        "--dist-url",
        default="auto",
        help="machine 0's tcp://host:port, the same on every machine (one machine: a free port)",
    )


# Process 0 alone assembles a slide and writes its label TIFF while the others wait at the next
# barrier: Detectron2's 30 minutes could be too short for a large slide.
LAUNCH_TIMEOUT = timedelta(hours=12)


def run_distributed(predictor: Predictor, slides, images, args) -> int:
    """main() in one process of several: the same work shared out, process 0 prints."""
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
    cfg = load_config(args.config_file, args.opts)
    slides, inputs = split_slides(args.input)  # whole-slide images: dessam_d2/slides.py
    # nothing found at all: collect_images names the inputs given in its error
    images = collect_images(inputs or args.input) if inputs or not slides else []
    flag = "--weights output/<run>/model_final.pth"
    weights = resolve_weights(cfg, args.weights, args.random_weights, args.config_file, flag)
    if not weights:  # random weights: the same model in every process and every run
        torch.manual_seed(max(cfg.SEED, 0))
    model = load_model_for_inference(cfg, weights)
    predictor = Predictor(model, args.tile_size, args.tile_overlap, cfg.INPUT.FORMAT)
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


def launch_error(args) -> Optional[str]:
    """What is wrong with the launcher options, if anything."""
    if args.num_gpus < 1 or args.num_machines < 1:
        return "--num-gpus and --num-machines are at least 1"
    if not 0 <= args.machine_rank < args.num_machines:
        return f"--machine-rank {args.machine_rank} is not one of 0 ... {args.num_machines - 1}"
    if args.num_machines > 1 and args.dist_url == "auto":
        return "--num-machines > 1 needs --dist-url tcp://<machine 0's address>:<free port>"
    return None


def worker(args) -> None:
    """One of several processes: its exit status, once every process is done."""
    status = run_cli(main, args)
    comm.synchronize()  # a non-zero exit ends the others: only once all have finished
    sys.stdout.flush()
    if status:
        sys.exit(status)


if __name__ == "__main__":
    args = parse_args()
    error = launch_error(args)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    tune_malloc()
    if args.num_gpus * args.num_machines == 1:
        sys.exit(run_cli(main, args))
    try:
        launch(
            worker,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
            timeout=LAUNCH_TIMEOUT,
        )
    except ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code > 0:
            sys.exit(e.exit_code)  # every process printed its status or its one-line error
        print(f"error: {e}", file=sys.stderr)  # e.g. a process killed by a signal
        sys.exit(1)
