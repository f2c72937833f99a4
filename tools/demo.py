#!/usr/bin/env python
"""The embedded demo (`make demo`): needs no data set and no weights.

Generates synthetic cervical cytology, trains a small randomly initialised DES-SAM on the CPU,
evaluates it against the untrained model, predicts on the held-out images and prints the table.

    python tools/demo.py [--config-file configs/dessam_demo.yaml] [KEY VALUE ...]
"""

import argparse

from dessam_d2.cli import run_cli


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/dessam_demo.yaml")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()
    from dessam_d2.recipes.demo import demo_report, run_demo  # after parsing: --help needs no torch

    result = run_cli(run_demo, args.config_file, args.opts, print)
    for block in demo_report(result):
        print(block)


if __name__ == "__main__":
    main()
