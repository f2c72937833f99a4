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

from dessam_d2.cli import report_conversion, run_cli


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
    return report_conversion(report, ", ".join(args.geojson))


if __name__ == "__main__":
    sys.exit(run_cli(main, parse_args()))
