"""Whole-slide images (anything OpenSlide reads): tiles read, predicted and written one at a time.

A slide is cut into the same overlapping tiles as a large image (``predict.tile_starts``), at a
chosen pyramid level or resolution, in the "work" pixels the model sees; each tile keeps only the
nuclei whose box centre lies in its own core (``predict.tile_core``), so a nucleus at a seam comes
out once and whole. Tiles without tissue on an Otsu-thresholded thumbnail are skipped. Per slide
``<stem>`` the output folder gets

    <stem>.geojson      every nucleus as a QuPath detection, outline along its pixels' edges, with
                        its measurements as properties, in level-0 slide coordinates
    <stem>_nuclei.csv   one row per nucleus: the image CSV's columns in level-0 slide pixels
                        (box, area, perimeter); written last, its presence marks the slide done

Nothing is held for the whole slide but counters: after each tile its features and rows are
appended to files in ``.<stem>.partial/`` and a small state (tiles done, next id, the two files'
lengths) is written atomically. A killed run resumes after the last finished tile (it cuts the
files back to the recorded lengths), so its outputs equal an uninterrupted run's. The finished
files are assembled by streaming copies and renamed into place. Ids are Python integers: no wrap.
"""

import csv
import io
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from ..errors import InputNotFoundError, SlideError
from ..evaluation.metrics import masks_to_label_map
from ..utils.io import atomic_open, atomic_write_json
from .outlines import nucleus_feature
from .predictor import (
    CSV_FIELDS,
    IMAGE_EXTENSIONS,
    Predictor,
    label_polygons,
    nucleus_features,
    tile_core,
    tile_starts,
)

logger = logging.getLogger(__name__)

# Vendor formats OpenSlide reads; .tif/.tiff are slides when tiled (OpenSlide's generic-tiff).
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
THUMBNAIL_SIDE = 2048


def is_slide(path: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    if ext in SLIDE_EXTENSIONS:
        return True
    if ext in (".tif", ".tiff") and os.path.isfile(path):
        import openslide

        try:
            return openslide.OpenSlide.detect_format(path) is not None
        except openslide.OpenSlideError:
            return False
    return False


def split_slides(inputs: Sequence[str]) -> Tuple[List[str], List[str]]:
    """(slides, other inputs): folders and globs are expanded so that a pyramidal .tif found
    in a folder goes to the slide path, never to an image reader."""
    import glob

    slides, others = [], []
    for item in inputs:
        if os.path.isdir(item):
            files = [os.path.join(item, n) for n in sorted(os.listdir(item))]
        elif any(c in item for c in "*?["):
            files = sorted(glob.glob(item))
        else:
            (slides if is_slide(item) else others).append(item)
            continue
        for path in files:
            ext = os.path.splitext(path)[1].lower()
            if is_slide(path):
                slides.append(path)
            elif ext in IMAGE_EXTENSIONS:
                others.append(path)
    return list(dict.fromkeys(slides)), others


def open_slide(path: str):
    import openslide

    if not os.path.isfile(path):
        raise InputNotFoundError(f"slide {path} does not exist: check the path")
    try:
        return openslide.OpenSlide(path)
    except (openslide.OpenSlideError, OSError) as e:
        raise SlideError(
            f"slide {path} cannot be opened by OpenSlide ({e}): is it complete, and a format "
            "OpenSlide reads (svs, ndpi, mrxs, scn, tiled pyramidal tif, ...)?"
        ) from None


def parse_roi(text: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    if not text:
        return None
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise SlideError(f"--roi {text!r}: write x,y,w,h in level-0 pixels, e.g. 0,0,4096,4096")
    if w <= 0 or h <= 0 or x < 0 or y < 0:
        raise SlideError(f"--roi {text!r}: x and y must be >= 0, w and h > 0")
    return x, y, w, h


@dataclass
class SlideGrid:
    """Where the work pixels come from: level ``level`` of the slide, ``scale`` level-0 pixels per
    work pixel, the work space's level-0 ``origin`` and its ``size`` (w, h) in work pixels."""

    level: int
    scale: float
    origin: Tuple[int, int]
    size: Tuple[int, int]


def slide_grid(
    slide,
    path: str,
    level: Optional[int] = None,
    mpp: Optional[float] = None,
    slide_mpp: Optional[float] = None,
    roi: Optional[Tuple[int, int, int, int]] = None,
) -> SlideGrid:
    """The level and scale for ``--level`` or ``--mpp`` (default: level 0), cut to ``--roi``."""
    import openslide

    if level is not None and mpp is not None:
        raise SlideError("give --level or --mpp, not both")
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise SlideError(
                f"slide {path} has levels 0..{slide.level_count - 1}; --level {level} is not one"
            )
        scale = float(slide.level_downsamples[level])
    elif mpp is not None:
        base = slide_mpp or float(slide.properties.get(openslide.PROPERTY_NAME_MPP_X, 0) or 0)
        if base <= 0:
            raise SlideError(
                f"slide {path} does not say its resolution ({openslide.PROPERTY_NAME_MPP_X}): "
                "pass --slide-mpp <its µm per pixel> with --mpp, or choose --level instead"
            )
        if mpp <= 0:
            raise SlideError(f"--mpp {mpp}: a resolution in µm per pixel is > 0")
        scale = mpp / base
        level = slide.get_best_level_for_downsample(max(scale, 1.0))
    else:
        level, scale = 0, 1.0
    width, height = slide.dimensions
    x, y, w, h = roi or (0, 0, width, height)
    if x >= width or y >= height:
        raise SlideError(f"--roi starts outside slide {path} ({width} x {height} at level 0)")
    w, h = min(w, width - x), min(h, height - y)
    return SlideGrid(level, scale, (x, y), (max(1, int(w / scale)), max(1, int(h / scale))))


def read_work_tile(slide, grid: SlideGrid, x: int, y: int, w: int, h: int) -> np.ndarray:
    """The work pixels [y, y + h) x [x, x + w) as H x W x 3 uint8 RGB (transparent = white)."""
    down = float(slide.level_downsamples[grid.level])
    x0 = int(round(grid.origin[0] + x * grid.scale))
    y0 = int(round(grid.origin[1] + y * grid.scale))
    lw = max(1, int(round(w * grid.scale / down)))
    lh = max(1, int(round(h * grid.scale / down)))
    rgba = np.asarray(slide.read_region((x0, y0), grid.level, (lw, lh)))
    rgb = rgba[..., :3].copy()
    rgb[rgba[..., 3] == 0] = 255  # outside the scanned area
    if (lw, lh) != (w, h):
        shrink = lw > w
        rgb = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return rgb


def tissue_mask(slide) -> Tuple[np.ndarray, float]:
    """Tissue on a thumbnail (Otsu on grey: tissue is darker than glass) and the level-0 pixels
    per thumbnail pixel. A slide without bright glass is all tissue (Otsu would split it)."""
    thumb = np.asarray(slide.get_thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE)).convert("RGB"))
    grey = cv2.cvtColor(thumb, cv2.COLOR_RGB2GRAY)
    if np.percentile(grey, 99) < 200:
        return np.ones(grey.shape, bool), slide.dimensions[0] / grey.shape[1]
    threshold, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return grey < threshold, slide.dimensions[0] / grey.shape[1]


@dataclass
class Tile:
    index: int
    iy: int
    ix: int
    x: int
    y: int
    w: int
    h: int
    tissue: bool = True


def slide_tiles(
    grid: SlideGrid, tile: int, overlap: int, tissue: Optional[Tuple[np.ndarray, float]]
) -> List[Tile]:
    w, h = grid.size
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    tiles = []
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            t = Tile(len(tiles), iy, ix, x, y, min(tile, w - x), min(tile, h - y))
            if tissue is not None:
                mask, per_px = tissue
                fx0 = (grid.origin[0] + x * grid.scale) / per_px
                fy0 = (grid.origin[1] + y * grid.scale) / per_px
                fx1 = (grid.origin[0] + (x + t.w) * grid.scale) / per_px
                fy1 = (grid.origin[1] + (y + t.h) * grid.scale) / per_px
                window = mask[int(fy0) : math.ceil(fy1), int(fx0) : math.ceil(fx1)]
                t.tissue = bool(window.any())
            tiles.append(t)
    return tiles


@dataclass
class SlideState:
    settings: Dict
    tiles_done: int = 0
    next_id: int = 1
    features_bytes: int = 0
    rows_bytes: int = 0


@dataclass
class SlideSummary:
    done: int = 0
    skipped: int = 0
    tiles: int = 0
    tiles_background: int = 0
    nuclei: int = 0
    failed: Dict[str, str] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            ["slides predicted", self.done],
            ["slides skipped (already done)", self.skipped],
            ["slides failed", len(self.failed)],
            ["tiles predicted", self.tiles],
            ["tiles skipped (no tissue)", self.tiles_background],
            ["nuclei found", self.nuclei],
        ]
        return tabulate(rows, tablefmt="simple")


def slide_output_paths(output_dir: str, slide_path: str) -> Dict[str, str]:
    stem = os.path.splitext(os.path.basename(slide_path))[0]
    work = os.path.join(output_dir, f".{stem}.partial")
    return {
        "geojson": os.path.join(output_dir, stem + ".geojson"),
        "csv": os.path.join(output_dir, stem + "_nuclei.csv"),  # last: marks the slide done
        "work": work,
        "state": os.path.join(work, "state.json"),
        "features": os.path.join(work, "features.part"),
        "rows": os.path.join(work, "rows.part"),
    }


def _tile_nuclei(
    predictor: Predictor, image: np.ndarray, tile: Tile, starts: Tuple[List[int], List[int]], grid
) -> Tuple[List[Dict], Dict[int, list]]:
    """The nuclei this tile owns: (CSV rows with tile-local ids, polygons in work pixels)."""
    instances = predictor(image)
    if not len(instances):
        return [], {}
    boxes = instances.pred_boxes.tensor.numpy()
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + tile.y
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + tile.x
    t = predictor.tile_size
    y0, y1 = tile_core(starts[0], tile.iy, t, grid.size[1])
    x0, x1 = tile_core(starts[1], tile.ix, t, grid.size[0])
    keep = (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
    scores = instances.scores.numpy()
    # all of the tile's nuclei compete for pixels (higher score wins); only its own are written
    labels = masks_to_label_map(instances.pred_masks.numpy(), scores)
    owned = np.flatnonzero(keep) + 1
    labels[~np.isin(labels, owned)] = 0
    rows = nucleus_features(image, labels, {i + 1: float(s) for i, s in enumerate(scores)})
    return rows, label_polygons(labels, offset=(tile.x, tile.y))


def _to_slide(rows: List[Dict], polygons: Dict[int, list], grid: SlideGrid, first_id: int):
    """Tile-local rows and work-pixel polygons -> slide ids, level-0 coordinates and units."""
    s, (ox, oy) = grid.scale, grid.origin
    out_rows, features = [], []
    for new_id, row in enumerate(rows, start=first_id):
        row = dict(row)
        polys = [
            [[[ox + x * s, oy + y * s] for x, y in ring] for ring in poly]
            for poly in polygons[row["id"]]
        ]
        row["id"] = new_id
        for k, o in (("x0", ox), ("x1", ox), ("y0", oy), ("y1", oy)):
            row[k] = o + row[k] * s if s != 1 else o + row[k]
        row["area"] = row["area"] * s * s if s != 1 else row["area"]
        row["perimeter"] = round(row["perimeter"] * s, 2)
        measurements = {k: v for k, v in row.items() if k != "id"}
        features.append(nucleus_feature(polys, f"nucleus {new_id}", measurements))
        out_rows.append(row)
    return out_rows, features


def _truncate(path: str, size: int) -> None:
    with open(path, "ab") as f:
        f.truncate(size)


def predict_slide(
    predictor: Predictor,
    path: str,
    output_dir: str,
    level: Optional[int] = None,
    mpp: Optional[float] = None,
    slide_mpp: Optional[float] = None,
    roi: Optional[Tuple[int, int, int, int]] = None,
    detect_tissue: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Tuple[int, int, int]:
    """Predict one slide; returns (tiles predicted, background tiles skipped, nuclei)."""
    paths = slide_output_paths(output_dir, path)
    slide = open_slide(path)
    grid = slide_grid(slide, path, level, mpp, slide_mpp, roi)
    tissue = tissue_mask(slide) if detect_tissue else None
    tiles = slide_tiles(grid, predictor.tile_size, predictor.tile_overlap, tissue)
    starts = (
        tile_starts(grid.size[1], predictor.tile_size, predictor.tile_overlap),
        tile_starts(grid.size[0], predictor.tile_size, predictor.tile_overlap),
    )
    settings = {
        "slide": os.path.abspath(path),
        "grid": asdict(grid),
        "tile": predictor.tile_size,
        "overlap": predictor.tile_overlap,
        "tissue": detect_tissue,
    }
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from disk
    state = SlideState(settings)
    if os.path.exists(paths["state"]) and not overwrite:
        with open(paths["state"]) as f:
            saved = SlideState(**json.load(f))
        intact = all(
            os.path.exists(paths[k]) and os.path.getsize(paths[k]) >= n
            for k, n in (("features", saved.features_bytes), ("rows", saved.rows_bytes))
        )
        if saved.settings == settings and intact:
            state = saved
        else:
            logger.warning(
                f"{path}: settings or work files changed since the interrupted run; "
                "starting over"
            )
    if state.tiles_done == 0:
        shutil.rmtree(paths["work"], ignore_errors=True)
        os.makedirs(paths["work"])
        open(paths["features"], "wb").close()
        open(paths["rows"], "wb").close()
    _truncate(paths["features"], state.features_bytes)
    _truncate(paths["rows"], state.rows_bytes)

    stem = os.path.basename(paths["csv"])[: -len("_nuclei.csv")]
    bar = tqdm(
        total=len(tiles), initial=state.tiles_done, desc=stem, unit="tile", disable=not progress
    )
    bar.set_postfix(nuclei=state.next_id - 1)
    predicted = 0
    for tile in tiles[state.tiles_done :]:
        if tile.tissue:
            image = read_work_tile(slide, grid, tile.x, tile.y, tile.w, tile.h)
            rows, polygons = _tile_nuclei(predictor, image, tile, starts, grid)
            rows, features = _to_slide(rows, polygons, grid, state.next_id)
            predicted += 1
            if rows:
                text = io.StringIO()
                csv.DictWriter(text, fieldnames=CSV_FIELDS).writerows(rows)
                first = state.next_id == 1
                chunk = ",\n".join(json.dumps(f, separators=(",", ":")) for f in features)
                for name, data in (("rows", text.getvalue()), ("features", chunk)):
                    if name == "features" and not first:
                        data = ",\n" + data
                    with open(paths[name], "ab") as f:
                        f.write(data.encode())
                        f.flush()
                        os.fsync(f.fileno())
                state.next_id += len(rows)
        state.tiles_done = tile.index + 1
        state.features_bytes = os.path.getsize(paths["features"])
        state.rows_bytes = os.path.getsize(paths["rows"])
        atomic_write_json(paths["state"], asdict(state))
        bar.update(1)
        bar.set_postfix(nuclei=state.next_id - 1)
    bar.close()

    with atomic_open(paths["geojson"]) as out, open(paths["features"], "rb") as part:
        out.write(b'{"type":"FeatureCollection","features":[\n')
        shutil.copyfileobj(part, out)
        out.write(b"\n]}\n")
    with atomic_open(paths["csv"]) as out, open(paths["rows"], "rb") as part:
        out.write((",".join(CSV_FIELDS) + "\r\n").encode())
        shutil.copyfileobj(part, out)
    shutil.rmtree(paths["work"], ignore_errors=True)
    background = sum(not t.tissue for t in tiles)
    return predicted, background, state.next_id - 1


def predict_slides(
    predictor: Predictor,
    slides: Sequence[str],
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> SlideSummary:
    """Every slide in turn (``options``: level, mpp, slide_mpp, roi, detect_tissue). A slide that
    cannot be opened is reported and the rest go on; finished slides are skipped."""
    os.makedirs(output_dir, exist_ok=True)
    summary = SlideSummary()
    for path in slides:
        if os.path.exists(slide_output_paths(output_dir, path)["csv"]) and not overwrite:
            summary.skipped += 1
            continue
        try:
            tiles, background, nuclei = predict_slide(
                predictor, path, output_dir, overwrite=overwrite, progress=progress, **options
            )
        except (SlideError, FileNotFoundError) as e:
            if len(slides) == 1:
                raise
            summary.failed[path] = str(e)
            logger.warning(str(e))
            continue
        summary.done += 1
        summary.tiles += tiles
        summary.tiles_background += background
        summary.nuclei += nuclei
    return summary


def run_slides(predictor: Predictor, slides: Sequence[str], args) -> int:
    """tools/predict.py on slides: predict, print the summary; the exit status."""
    summary = predict_slides(
        predictor,
        slides,
        args.output,
        overwrite=args.overwrite,
        level=args.level,
        mpp=args.mpp,
        slide_mpp=args.slide_mpp,
        roi=parse_roi(args.roi),
        detect_tissue=not args.all_tiles,
    )
    print(summary.table())
    for message in summary.failed.values():
        print(f"failed: {message}")
    print(f"outputs in {args.output}")
    return 1 if summary.failed else 0
