#!/usr/bin/env python
"""Convert CNSeg (labelme polygons + jpg) to COCO JSON; see datasets/README.md.

python tools/convert_cnseg.py --input /data/CNSeg --output datasets/cnseg [--link]
"""

import argparse
import logging
import sys

from dessam_d2.cli import report_conversion, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="CNSeg root (any folder above the subsets)")
    parser.add_argument("--output", required=True, help="output folder, e.g. datasets/cnseg")
    parser.add_argument("--link", action="store_true", help="hard-link images instead of copying")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return run_cli(convert, args)


def convert(args) -> int:
    from dessam_d2.data.converters.cnseg import convert_cnseg  # after parsing: --help is instant

    report = convert_cnseg(args.input, args.output, link=args.link, progress=not args.no_progress)
    return report_conversion(report, args.input)


if __name__ == "__main__":
    sys.exit(main())
