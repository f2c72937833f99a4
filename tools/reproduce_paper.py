#!/usr/bin/env python
"""Reproduce the paper's Tables 1-2: convert CNSeg and ISBI 2014, train PatchSeg and ClusterSeg
once per seed, evaluate (float32 inference; scored as we score and as the authors' release
does), write the tables (Markdown and CSV). Re-running resumes. --bf16 adds bfloat16 rows.

python tools/reproduce_paper.py --sam-checkpoint weights/sam_vit_b_01ec64.pth \\
    --cnseg /data/CNSeg --isbi /data/isbi2014 [--output output/reproduce] [--seeds 1 2 3] \\
    [--bf16] [--num-gpus 4] [--num-machines 2 --machine-rank 0 --dist-url tcp://host:port] \\
    [KEY VALUE ...]
"""

import sys

from dessam_d2.cli import run_cli
from dessam_d2.recipes.reproduce import main, parse_args

if __name__ == "__main__":
    args = parse_args(sys.argv[1:])  # before anything heavy: --help answers at once
    run_cli(main, sys.argv[1:])
