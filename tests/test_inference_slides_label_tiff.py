"""--label-tiff: the slide's label image, a tiled pyramidal OME-TIFF of uint32 nucleus ids
(tifffile reads its OME-XML, its SubIFD levels and the ids; OpenSlide its level 0 and mpp)."""

import csv
import json
import xml.etree.ElementTree as ET

import numpy as np
import openslide
import pytest
import tifffile
from shapely.geometry import shape
from test_inference_slides_run import predictor

from dessam_d2.inference.slides import predict_slide, slide_output_paths
from dessam_d2.inference.slides.label_tiff import label_tiff_downsamples, write_label_tiff
from dessam_d2.inference.slides.reader import SlideGrid
from dessam_d2.inference.tiling import tile_starts
from dessam_d2.plugin.io import read_path

OME = "{http://www.openmicroscopy.org/Schemas/OME/2016-06}"


def read_levels(path):
    """The levels (level 0, then its SubIFDs), each level's (dtype, subfiletype, tiled,
    XResolution), the OME-XML's Pixels attributes and the number of pages in the main chain."""
    with tifffile.TiffFile(path) as tif:
        assert tif.is_ome and tif.is_bigtiff and len(tif.series) == 1
        levels = tif.series[0].levels
        pages = [level.keyframe for level in levels]
        info = [(p.dtype, p.subfiletype, p.is_tiled, p.tags["XResolution"].value) for p in pages]
        assert len(pages[0].subifds or ()) == len(levels) - 1  # reduced levels are SubIFDs
        pixels = ET.fromstring(tif.ome_metadata).find(f"{OME}Image/{OME}Pixels").attrib
        return [level.asarray() for level in levels], info, pixels, len(tif.pages)


def test_label_tiff_holds_the_geojson_and_csv_ids(slide, tmp_path):
    predict_slide(predictor(), slide, str(tmp_path), progress=False, label_tiff=True)
    paths = slide_output_paths(str(tmp_path), slide)
    levels, info, pixels, pages = read_levels(paths["label_tiff"])
    # level 0 is the slide's level 0; 1024 px wide in 512-px tiles: one reduced level, a SubIFD
    assert [lv.shape for lv in levels] == [(768, 1024), (384, 512)] and pages == 1
    assert (pixels["SizeX"], pixels["SizeY"], pixels["Type"]) == ("1024", "768", "uint32")
    assert (pixels["SizeC"], pixels["SizeZ"], pixels["SizeT"]) == ("1", "1", "1")
    assert float(pixels["PhysicalSizeX"]) == float(pixels["PhysicalSizeY"]) == 0.25  # the slide's
    assert pixels["PhysicalSizeXUnit"] == pixels["PhysicalSizeYUnit"] == "µm"
    assert [i[0] for i in info] == [np.uint32, np.uint32] and all(i[2] for i in info)
    assert [int(i[1]) for i in info] == [0, 1]
    assert [i[3] for i in info] == [(40000, 1), (20000, 1)]  # 0.25 µm/px -> px per cm
    assert np.array_equal(levels[1], levels[0][::2, ::2])  # nearest neighbour

    rows = list(csv.DictReader(open(paths["csv"])))
    features = json.load(open(paths["geojson"]))["features"]
    label0 = levels[0]
    ids, counts = np.unique(label0[label0 > 0], return_counts=True)
    assert ids.tolist() == [int(r["id"]) for r in rows]
    assert counts.tolist() == [int(r["area"]) for r in rows]  # every pixel of every nucleus
    for row, feature in zip(rows, features):
        point = shape(feature["geometry"]).representative_point()
        assert label0[int(point.y), int(point.x)] == int(row["id"])
        assert feature["properties"]["name"] == f"nucleus {row['id']}"

    # OpenSlide's generic-tiff sees level 0 and the resolution, not the SubIFDs, and its
    # read_region (libtiff's RGBA interface) refuses 32-bit samples, as the README says
    s = openslide.OpenSlide(paths["label_tiff"])
    assert s.level_dimensions == ((1024, 768),)
    assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    with pytest.raises(openslide.OpenSlideError, match="32-bit"):
        s.read_region((0, 0), 0, (8, 8))


def square_chunk(h, w, squares):
    labels = np.zeros((h, w), np.uint16)
    for i, (y0, y1, x0, x1) in enumerate(squares, start=1):
        labels[y0:y1, x0:x1] = i
    return labels


def test_writer_keeps_ids_past_65535_overlaps_by_score_and_level_0_scale(tmp_path):
    """Two prediction tiles of a 2x work grid whose nuclei overlap; the higher score owns the
    shared pixels, ids above 65 535 survive, every level is the one below, every 2nd pixel."""
    size, tile, overlap = (300, 200), 128, 32  # work pixels (w, h)
    ys, xs = tile_starts(size[1], tile, overlap), tile_starts(size[0], tile, overlap)
    grid = SlideGrid(level=1, scale=2.0, origin=(10, 6), size=size)
    # tile 0 at (0, 0): nuclei 70000, 70001; tile 1 at (xs[1], 0): nucleus 99999 overlapping 70001
    chunks = {
        0: (square_chunk(128, 128, [(10, 30, 10, 40), (50, 80, 100, 128)]), [-1, 0.5, 0.6], 70000),
        1: (square_chunk(128, 128, [(60, 90, 100 - xs[1], 120 - xs[1])]), [-1, 0.9], 99999),
    }
    work = np.zeros((size[1], size[0]), np.uint32)  # what level 0 shows, in work pixels
    work[10:30, 10:40] = 70000
    work[50:80, 100:128] = 70001
    work[60:90, 100:120] = 99999  # the higher score wins where they overlap

    def load(index):
        if index not in chunks:
            return None
        labels, scores, first = chunks[index]
        return labels, np.array(scores), first

    level0_size = (2 * size[0] + 10, 2 * size[1] + 6)
    path = str(tmp_path / "slide_labels.ome.tif")
    write_label_tiff(path, level0_size, grid, (ys, xs), tile, load, mpp=0.5, tile=64)
    levels, info, pixels, pages = read_levels(path)
    assert len(levels) == len(label_tiff_downsamples(level0_size, 64)) == 5 and pages == 1
    # the napari plugin's reader opens it as a multiscale Labels layer, every level as written
    ((opened, kwargs, kind),) = read_path(path)
    assert kind == "labels" and kwargs["multiscale"] and len(opened) == 5
    assert all(np.array_equal(a, b) for a, b in zip(opened, levels))
    assert (pixels["SizeX"], pixels["SizeY"]) == tuple(map(str, level0_size))
    assert pixels["Type"] == "uint32" and float(pixels["PhysicalSizeX"]) == 0.5
    assert [i[3] for i in info] == [(20000 // 2**k, 1) for k in range(5)]  # 0.5 µm/px, per cm
    yy, xx = np.mgrid[: level0_size[1], : level0_size[0]]
    wy, wx = np.floor((yy + 0.5 - 6) / 2).astype(int), np.floor((xx + 0.5 - 10) / 2).astype(int)
    inside = (wy >= 0) & (wx >= 0) & (wy < size[1]) & (wx < size[0])
    expected = np.where(inside, work[wy.clip(0, size[1] - 1), wx.clip(0, size[0] - 1)], 0)
    assert levels[0].dtype == np.uint32 and np.array_equal(levels[0], expected)
    assert set(np.unique(levels[0])) == {0, 70000, 70001, 99999}
    for k, level in enumerate(levels):
        assert np.array_equal(level, levels[0][:: 2**k, :: 2**k]), k
    assert [int(i[1]) for i in info] == [0, 1, 1, 1, 1]
    assert not list(tmp_path.glob(".*tmp"))


def test_without_mpp_no_physical_size_and_the_same_bytes_twice(tmp_path):
    """A slide without µm/pixel: OME-XML without PhysicalSize; one level (fits a tile), no
    SubIFDs; writing twice gives the same bytes (the OME UUID is not random)."""
    grid = SlideGrid(level=0, scale=1.0, origin=(0, 0), size=(100, 60))
    labels = square_chunk(60, 100, [(5, 20, 5, 30)])

    def load(index):
        return (labels, np.array([-1, 0.5]), 7) if index == 0 else None

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        write_label_tiff(str(folder / "labels.tif"), (100, 60), grid, ([0], [0]), 128, load)
    levels, info, pixels, pages = read_levels(str(a / "labels.tif"))
    assert len(levels) == 1 and pages == 1 and "PhysicalSizeX" not in pixels
    assert set(np.unique(levels[0])) == {0, 7} and (levels[0] == 7).sum() == 15 * 25
    assert (a / "labels.tif").read_bytes() == (b / "labels.tif").read_bytes()


def test_a_killed_run_resumes_to_the_same_label_tiff(slide, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    predict_slide(predictor(), slide, str(whole), progress=False, label_tiff=True)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(predictor(fail_at=30), slide, str(resumed), progress=False, label_tiff=True)
    assert not (resumed / "cyto_labels.ome.tif").exists()
    predict_slide(predictor(), slide, str(resumed), progress=False, label_tiff=True)
    for name in ("cyto_labels.ome.tif", "cyto.geojson", "cyto_nuclei.csv"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name
