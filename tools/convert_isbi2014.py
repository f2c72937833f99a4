#!/usr/bin/env python
"""Convert the ISBI 2014 cervical cytology .mat files to PNG + COCO JSON; see datasets/README.md.

python tools/convert_isbi2014.py --input /data/isbi2014 --output datasets/isbi2014
"""

import argparse
import logging
import sys

from dessam_d2.cli import EXIT_USER_ERROR, exit_status, run_cli


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
    return print_report(report, args.input)


def print_report(report, source: str) -> int:
    """Print the table and the files written; return the exit status: 0 every image converted,
    1 some images skipped (nuclei dropped by a documented rule, e.g. zero area, are counted but
    are no skips), 2 no image converted."""
    print(report.summary())
    if report.images:
        return exit_status(report.images, report.skipped_images)
    print(
        f"error: no image of {source} could be converted (reasons in the table above): "
        "the data sets are empty",
        file=sys.stderr,
    )
    return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
