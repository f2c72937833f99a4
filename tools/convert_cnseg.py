#!/usr/bin/env python
"""Convert CNSeg (labelme polygons + jpg) to COCO JSON; see datasets/README.md.

python tools/convert_cnseg.py --input /data/CNSeg --output datasets/cnseg [--link]
"""

import argparse
import logging
import sys

from dessam_d2.cli import EXIT_USER_ERROR, exit_status, run_cli


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
