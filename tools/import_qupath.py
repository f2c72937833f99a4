#!/usr/bin/env python
"""QuPath GeoJSON exports (rectangles or polygons, one file per image) -> one COCO box file.

    python tools/import_qupath.py --geojson exports/*.geojson --image-root images/ \
        --output boxes.json [--classes Nucleus]
    python tools/train_net.py --config-file ... --dataset my_train=boxes.json:images/ \
        DATASETS.TRAIN '("my_train",)'

Each export is matched to the image of the same name under --image-root (a.geojson -> a.tif,
or a.tif.geojson -> a.tif). Rectangles become boxes; other polygons become boxes and keep their
outline (for evaluation). See dessam_d2/data/converters/qupath.py. Needs no model: no torch.
"""

import argparse
import sys

from dessam_d2.cli import EXIT_USER_ERROR, exit_status, run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--geojson", nargs="+", required=True, help="QuPath GeoJSON exports")
    p.add_argument("--image-root", required=True, help="folder holding the images (searched)")
    p.add_argument("--output", required=True, help="COCO JSON to write")
    p.add_argument(
        "--classes", nargs="+", default=None, help="keep only these QuPath classes (default: all)"
    )
    return p.parse_args(argv)


def main(args) -> int:
    from dessam_d2.data.converters.qupath import convert_qupath

    report = convert_qupath(args.geojson, args.image_root, args.output, args.classes)
    return print_report(report, ", ".join(args.geojson))


def print_report(report, source: str) -> int:
    """Print the table and the file written; return the exit status: 0 every image converted,
    1 some images skipped, 2 no image converted."""
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
    sys.exit(run_cli(main, parse_args()))
