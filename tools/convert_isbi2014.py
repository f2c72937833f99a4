#!/usr/bin/env python
"""Convert the ISBI 2014 cervical cytology .mat files to PNG + COCO JSON; see datasets/README.md.

python tools/convert_isbi2014.py --input /data/isbi2014 --output datasets/isbi2014
"""

import argparse
import logging
import sys

from dessam_d2.cli import report_conversion, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="folder of .mat files")
    parser.add_argument("--output", required=True, help="output folder, e.g. datasets/isbi2014")
    parser.add_argument(
        "--images-var",
        action="append",
        default=[],
        help="test image variable, VAR or FILE.mat:VAR (repeat to concatenate, in order)",
    )
    parser.add_argument(
        "--nuclei-var",
        action="append",
        default=[],
        help="test nuclei mask variable, VAR or FILE.mat:VAR (repeat, same order as images)",
    )
    parser.add_argument("--min-area", type=int, default=1, help="smallest nucleus kept (pixels)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    return run_cli(convert, args)


def convert(args) -> int:
    from dessam_d2.data.converters.isbi2014 import convert_isbi2014  # after parsing

    report = convert_isbi2014(
        args.input,
        args.output,
        images_vars=args.images_var,
        nuclei_vars=args.nuclei_var,
        min_area=args.min_area,
        progress=not args.no_progress,
    )
    return report_conversion(report, args.input)


if __name__ == "__main__":
    sys.exit(main())
