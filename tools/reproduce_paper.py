#!/usr/bin/env python
"""Reproduce the paper's Tables 1-2: convert CNSeg and ISBI 2014, train PatchSeg and ClusterSeg
once per seed, evaluate (float32 inference; scored as we score and as the authors' release
does), write the tables (Markdown and CSV). Re-running resumes. --bf16 adds bfloat16 rows.

python tools/reproduce_paper.py --sam-checkpoint weights/sam_vit_b_01ec64.pth \\
    --cnseg /data/CNSeg --isbi /data/isbi2014 [--output output/reproduce] [--seeds 1 2 3] \\
    [--bf16] [--num-gpus 4] [--num-machines 2 --machine-rank 0 --dist-url tcp://host:port] \\
    [KEY VALUE ...]
"""

import argparse
import sys
from typing import Optional, Sequence

from dessam_d2.cli import add_launch_arguments, launch_error, launch_flags, run_cli
from dessam_d2.recipes.reproduce import ReproduceOptions, reproduce_paper


def parse_args(argv: Optional[Sequence[str]] = None) -> ReproduceOptions:
    parser = argparse.ArgumentParser(
        prog="reproduce_paper.py",
        description="Convert CNSeg and ISBI 2014, train PatchSeg and ClusterSeg for each seed, "
        "evaluate, and write the paper's Tables 1-2 (Markdown and CSV). Re-running the same "
        "command resumes where it stopped.",
    )
    parser.add_argument(
        "--sam-checkpoint", required=True, help="official SAM ViT-B file sam_vit_b_01ec64.pth"
    )
    parser.add_argument("--cnseg", required=True, help="CNSeg root (PatchSeg, ClusterSeg, ...)")
    parser.add_argument("--isbi", required=True, help="folder of the ISBI 2014 .mat files")
    parser.add_argument("--output", default="output/reproduce", help="runs and tables go here")
    parser.add_argument(
        "--datasets",
        default=None,
        help="data root the converted sets go to (default: $DETECTRON2_DATASETS or datasets)",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run per seed (paper: 3)"
    )
    parser.add_argument(
        "--targetb-list",
        default=None,
        help="file of the image names of the release's 60-image TargetB test, one a line "
        "(copied to <data root>/cnseg/domainseg/targetb60.txt)",
    )
    parser.add_argument(
        "--bf16",
        action="store_true",
        help="also evaluate every run with bfloat16 inference (MODEL.DESSAM.INFERENCE_DTYPE "
        "bfloat16: a GPU or a CPU with native bfloat16) and show it next to float32",
    )
    parser.add_argument("--isbi-images-var", action="append", default=[], help="see convert_isbi")
    parser.add_argument("--isbi-nuclei-var", action="append", default=[], help="see convert_isbi")
    add_launch_arguments(parser, gpus_help="processes per machine of each train_net.py run")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config overrides for every run, KEY VALUE pairs (e.g. MODEL.DEVICE cuda)",
    )
    args = parser.parse_args(argv)
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated")
    error = launch_error(args)
    if error:
        parser.error(error)
    return ReproduceOptions(
        sam_checkpoint=args.sam_checkpoint,
        cnseg=args.cnseg,
        isbi=args.isbi,
        output=args.output,
        datasets=args.datasets,
        seeds=tuple(args.seeds),
        targetb_list=args.targetb_list,
        bf16=args.bf16,
        isbi_images_var=tuple(args.isbi_images_var),
        isbi_nuclei_var=tuple(args.isbi_nuclei_var),
        launch_flags=tuple(launch_flags(args)),
        machine_rank=args.machine_rank,
        opts=tuple(args.opts),
    )


def main(argv: Optional[Sequence[str]] = None) -> str:
    """Everything the command does; returns the Markdown tables (machine 0)."""
    options = parse_args(argv)
    result = reproduce_paper(options, progress=lambda message: print(message, flush=True))
    if result.tables:
        print("\n" + result.tables)
        print(f"written: {', '.join(result.files)}")
    return result.tables


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
