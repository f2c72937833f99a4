"""Command-line options of the inference tools that the package defines (argparse only: the tools
parse before importing torch)."""

__all__ = ["add_slide_arguments"]


def add_slide_arguments(parser) -> None:
    """tools/predict.py's options for whole-slide images."""
    group = parser.add_argument_group("whole-slide images (svs, ndpi, mrxs, pyramidal tif, ...)")
    group.add_argument("--level", type=int, default=None, help="pyramid level to predict at")
    group.add_argument(
        "--mpp", type=float, default=None, help="resolution to predict at, µm per pixel"
    )
    group.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="the slide's level-0 µm per pixel, for slides that do not say it",
    )
    group.add_argument("--roi", default=None, help="x,y,w,h in level-0 pixels: predict only there")
    group.add_argument(
        "--all-tiles", action="store_true", help="predict background tiles too (no tissue mask)"
    )
    group.add_argument(
        "--label-tiff",
        action="store_true",
        help="also write <slide>_labels.ome.tif: pyramidal uint32 OME-TIFF label image of level "
        "0, pixel = nucleus id of the GeoJSON and CSV (QuPath/Fiji via Bio-Formats, napari)",
    )
