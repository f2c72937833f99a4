"""Whole-slide images (anything OpenSlide reads): tiles read, predicted and written one at a time.

A slide is cut into the same overlapping tiles as a large image (``tiling``), at a chosen pyramid
level or resolution, in the "work" pixels the model sees (``reader``); each tile keeps only the
nuclei whose box centre lies in its own core, so a nucleus at a seam comes out once and whole.
Tiles without tissue on an Otsu-thresholded thumbnail are skipped (``tissue``). Per slide
``<stem>`` the output folder gets

    <stem>.geojson      every nucleus as a QuPath detection, outline along its pixels' edges, with
                        its measurements as properties, in level-0 slide coordinates
    <stem>_nuclei.csv   one row per nucleus: the image CSV's columns in level-0 slide pixels
                        (box, area, perimeter); written last, its presence marks the slide done
    <stem>_labels.ome.tif  with ``label_tiff``: pyramidal uint32 OME-TIFF label image of level 0,
                        pixel = nucleus id (``label_tiff.write_label_tiff``)

Nothing is held for the whole slide but counters; a killed run resumes after the last finished
tile (``journal``). Ids are Python integers: no wrap. One or several processes: ``run``.
"""

from .journal import slide_output_paths
from .reader import parse_roi
from .run import predict_slide, predict_slides

__all__ = ["parse_roi", "predict_slide", "predict_slides", "slide_output_paths"]
