"""Whole-slide images (anything OpenSlide reads): tiles read, predicted and written one at a time.

A slide is cut into the same overlapping tiles as a large image (``predictor.tile_starts``), at a
chosen pyramid level or resolution, in the "work" pixels the model sees; each tile keeps only the
nuclei whose box centre lies in its own core (``predictor.tile_core``), so a nucleus at a seam comes
out once and whole. Tiles without tissue on an Otsu-thresholded thumbnail are skipped. Per slide
``<stem>`` the output folder gets

    <stem>.geojson      every nucleus as a QuPath detection, outline along its pixels' edges, with
                        its measurements as properties, in level-0 slide coordinates
    <stem>_nuclei.csv   one row per nucleus: the image CSV's columns in level-0 slide pixels
                        (box, area, perimeter); written last, its presence marks the slide done
    <stem>_labels.tif   with ``label_tiff``: tiled pyramidal uint32 label image of level 0, pixel
                        = nucleus id (``write_label_tiff``)

Nothing is held for the whole slide but counters: after each tile its features and rows are
appended to files in ``.<stem>.partial/`` and a small state (tiles done, next id, the two files'
lengths) is written atomically. A killed run resumes after the last finished tile (it cuts the
files back to the recorded lengths), so its outputs equal an uninterrupted run's. The finished
files are assembled by streaming copies and renamed into place. Ids are Python integers: no wrap.

Several processes (``predict_slides_distributed``) share out a slide's tissue tiles, write each
tile's nuclei to ``.<stem>.tiles/``, and process 0 runs ``predict_slide`` on those: the same
numbering and the same files as one process.
"""

import csv
import io
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from tabulate import tabulate
from tqdm import tqdm

from ...errors import SlideError
from ...evaluation.metrics import masks_to_label_map
from ...utils.io import atomic_open, atomic_write_json
from ..outlines import nucleus_feature
from ..predictor import (
    CSV_FIELDS,
    IMAGE_EXTENSIONS,
    Predictor,
    label_polygons,
    nucleus_features,
)
from ..tiling import tile_core, tile_starts
from .label_tiff import LABEL_TIFF_TILE, label_tiff_downsamples, write_label_tiff  # noqa: F401
from .reader import (  # noqa: F401
    SlideGrid,
    level0_mpp,
    open_slide,
    parse_roi,
    read_work_tile,
    slide_grid,
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
        # --label-tiff: the label image, and each tile's labels until it is written
        "label_tiff": os.path.join(output_dir, stem + "_labels.tif"),
        "label_chunks": os.path.join(work, "labels"),
        # several processes: each tile's nuclei as its process found them, for process 0
        "tiles": os.path.join(output_dir, f".{stem}.tiles"),
    }


def _tile_nuclei(
    predictor: Predictor, image: np.ndarray, tile: Tile, starts: Tuple[List[int], List[int]], grid
) -> Tuple[List[Dict], Dict[int, list], Optional[np.ndarray]]:
    """The nuclei this tile owns: (CSV rows with tile-local ids, polygons in work pixels, the
    tile's label image of them with those ids, None when there are none)."""
    instances = predictor(image)
    if not len(instances):
        return [], {}, None
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
    return rows, label_polygons(labels, offset=(tile.x, tile.y)), labels


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


def _save_label_chunk(
    folder: str, tile: Tile, rows: List[Dict], labels: Optional[np.ndarray], first_id: int
) -> None:
    """The tile's own nuclei as a label image numbered 1..len(rows) in the order of ``rows``
    (slide id = ``first_id`` - 1 + that number), with their scores; no file without nuclei."""
    path = os.path.join(folder, f"{tile.index}.npz")
    if not rows:
        if os.path.exists(path):  # from an interrupted run that got further
            os.remove(path)
        return
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[[r["id"] for r in rows]] = np.arange(1, len(rows) + 1, dtype=np.uint32)
    local = lut[labels]
    local = local.astype(np.uint16) if len(rows) < 65536 else local
    scores = np.array([-1.0] + [r["score"] for r in rows], np.float64)
    os.makedirs(folder, exist_ok=True)
    with atomic_open(path) as f:
        np.savez_compressed(
            f, labels=local, scores=scores, first_id=np.int64(first_id), origin=(tile.x, tile.y)
        )


def _load_label_chunk(folder: str, index: int):
    """(labels numbered 1..n, scores indexed by those numbers, first id) or None."""
    path = os.path.join(folder, f"{index}.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return z["labels"], z["scores"], int(z["first_id"])


def _slide_plan(
    predictor: Predictor,
    path: str,
    level: Optional[int],
    mpp: Optional[float],
    slide_mpp: Optional[float],
    roi: Optional[Tuple[int, int, int, int]],
    detect_tissue: bool,
    label_tiff: bool = False,
):
    """(slide, grid, tiles, tile starts (ys, xs), settings): what a run on ``path`` will do;
    ``settings`` is what an interrupted run must have had for its work to be reused."""
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
    if label_tiff:  # its tiles' labels are kept too: a run without them cannot be continued
        settings["label_tiff"] = True
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as read back from disk
    return slide, grid, tiles, starts, settings


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
    label_tiff: bool = False,
    tile_results: Optional[Callable[[Tile], Tuple]] = None,
) -> Tuple[int, int, int]:
    """Predict one slide; returns (tiles predicted, background tiles skipped, nuclei).

    ``label_tiff``: also write ``<stem>_labels.tif`` (``write_label_tiff``). ``tile_results``:
    where a tissue tile's ``_tile_nuclei`` come from instead of reading and predicting it (the
    tiles other processes predicted, ``predict_slides_distributed``)."""
    paths = slide_output_paths(output_dir, path)
    slide, grid, tiles, starts, settings = _slide_plan(
        predictor, path, level, mpp, slide_mpp, roi, detect_tissue, label_tiff
    )
    if tile_results is None and not overwrite:
        tile_results = _shared_tile_results(paths, settings, predictor, slide, grid, starts)
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
            if tile_results is None:
                image = read_work_tile(slide, grid, tile.x, tile.y, tile.w, tile.h)
                rows, polygons, labels = _tile_nuclei(predictor, image, tile, starts, grid)
            else:
                rows, polygons, labels = tile_results(tile)
            if label_tiff:
                _save_label_chunk(paths["label_chunks"], tile, rows, labels, state.next_id)
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
    if label_tiff:
        chunks = paths["label_chunks"]
        write_label_tiff(
            paths["label_tiff"],
            slide.dimensions,
            grid,
            starts,
            predictor.tile_size,
            lambda index: _load_label_chunk(chunks, index),
            mpp=slide_mpp or level0_mpp(slide),
            progress=progress,
        )
    with atomic_open(paths["csv"]) as out, open(paths["rows"], "rb") as part:
        out.write((",".join(CSV_FIELDS) + "\r\n").encode())
        shutil.copyfileobj(part, out)
    shutil.rmtree(paths["work"], ignore_errors=True)
    shutil.rmtree(paths["tiles"], ignore_errors=True)  # tiles of an interrupted shared run
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


def _save_tile_result(folder: str, tile: Tile, result: Tuple, label_tiff: bool) -> None:
    """One tile's ``_tile_nuclei`` for process 0 (rows and polygons as JSON, which gives back
    the same Python values), written atomically: it marks the tile done."""
    rows, polygons, labels = result
    arrays = {
        "rows": np.array(json.dumps(rows)),
        "polygons": np.array(json.dumps(list(polygons.items()))),
    }
    if label_tiff and labels is not None:
        arrays["labels"] = labels
    with atomic_open(os.path.join(folder, f"{tile.index}.npz")) as f:
        np.savez_compressed(f, **arrays)


def _load_tile_result(folder: str, tile: Tile) -> Optional[Tuple]:
    path = os.path.join(folder, f"{tile.index}.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        rows = json.loads(str(z["rows"]))
        polygons = {int(k): v for k, v in json.loads(str(z["polygons"]))}
        labels = z["labels"] if "labels" in z.files else None
    return rows, polygons, labels


def _assembled_tiles(paths: Dict[str, str], settings: Dict) -> int:
    """Tiles an interrupted run (of any number of processes) already put into the outputs."""
    try:
        with open(paths["state"]) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return 0
    return saved.get("tiles_done", 0) if saved.get("settings") == settings else 0


def _shared_tile_results(paths, settings, predictor, slide, grid, starts) -> Optional[Callable]:
    """After an interrupted run of several processes, one process reuses the tiles they
    finished (same settings): a loader that predicts the tiles without a file; else None."""
    try:
        with open(os.path.join(paths["tiles"], "settings.json")) as f:
            if json.load(f) != settings:
                return None
    except (OSError, ValueError):
        return None

    def results(tile: Tile) -> Tuple:
        found = _load_tile_result(paths["tiles"], tile)
        if found is None:
            image = read_work_tile(slide, grid, tile.x, tile.y, tile.w, tile.h)
            found = _tile_nuclei(predictor, image, tile, starts, grid)
        return found

    return results


def predict_slide_distributed(
    predictor: Predictor,
    path: str,
    output_dir: str,
    rank: int,
    world_size: int,
    overwrite: bool = False,
    progress: bool = True,
    level: Optional[int] = None,
    mpp: Optional[float] = None,
    slide_mpp: Optional[float] = None,
    roi: Optional[Tuple[int, int, int, int]] = None,
    detect_tissue: bool = True,
    label_tiff: bool = False,
) -> Tuple[int, int, int]:
    """One slide by ``world_size`` processes (call it in every one, ``torch.distributed`` set
    up); returns (tiles this process predicted, background tiles, nuclei (process 0 only)).

    The tissue tiles are dealt out in turn (process r predicts every ``world_size``-th, from
    the r-th). Each process writes each of its tiles' nuclei to ``.<stem>.tiles/<index>.npz``
    in the output folder (shared by all machines); after a barrier process 0 runs
    ``predict_slide`` on those results, which numbers the nuclei and writes every output in
    tile order exactly as one process does: the files are byte-identical to a one-process
    run's. Resuming: a tile whose file exists is not predicted again, nor are tiles an
    interrupted run already assembled; the files are kept until the slide is done."""
    from detectron2.utils import comm

    paths = slide_output_paths(output_dir, path)
    slide, grid, tiles, starts, settings = _slide_plan(
        predictor, path, level, mpp, slide_mpp, roi, detect_tissue, label_tiff
    )
    folder = paths["tiles"]
    settings_file = os.path.join(folder, "settings.json")
    if rank == 0:
        try:
            with open(settings_file) as f:
                reusable = json.load(f) == settings and not overwrite
        except (OSError, ValueError):
            reusable = False
        if not reusable:
            shutil.rmtree(folder, ignore_errors=True)
            os.makedirs(folder)
            atomic_write_json(settings_file, settings)
    comm.synchronize()

    assembled = 0 if overwrite else _assembled_tiles(paths, settings)
    todo = [t for t in tiles if t.tissue and t.index >= assembled]
    mine = todo[rank::world_size]
    stem = os.path.basename(paths["csv"])[: -len("_nuclei.csv")]
    bar = tqdm(total=len(mine), desc=f"{stem} (process {rank})", unit="tile", disable=not progress)
    predicted = 0
    for tile in mine:
        if not os.path.exists(os.path.join(folder, f"{tile.index}.npz")):
            image = read_work_tile(slide, grid, tile.x, tile.y, tile.w, tile.h)
            result = _tile_nuclei(predictor, image, tile, starts, grid)
            _save_tile_result(folder, tile, result, label_tiff)
            predicted += 1
        bar.update(1)
    bar.close()
    comm.synchronize()

    nuclei = 0
    if rank == 0:
        # tiles without a file (the outputs of an interrupted run were damaged) are predicted
        results = _shared_tile_results(paths, settings, predictor, slide, grid, starts)
        _, _, nuclei = predict_slide(
            predictor,
            path,
            output_dir,
            level=level,
            mpp=mpp,
            slide_mpp=slide_mpp,
            roi=roi,
            detect_tissue=detect_tissue,
            overwrite=overwrite,
            progress=progress,
            label_tiff=label_tiff,
            tile_results=results,
        )
    return predicted, sum(not t.tissue for t in tiles), nuclei


def predict_slides_distributed(
    predictor: Predictor,
    slides: Sequence[str],
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> SlideSummary:
    """``predict_slides`` by every process of a ``torch.distributed`` job (Detectron2's
    ``launch``), each slide's tiles shared out (``predict_slide_distributed``); every process
    gets the summary of all."""
    from detectron2.utils import comm

    rank, world_size = comm.get_rank(), comm.get_world_size()
    os.makedirs(output_dir, exist_ok=True)
    summary = SlideSummary()
    for path in slides:
        # decided by every process before the slide's first barrier, which process 0 must pass
        # before it can write the CSV: all see the same
        if os.path.exists(slide_output_paths(output_dir, path)["csv"]) and not overwrite:
            summary.skipped += 1
            continue
        try:
            tiles, background, nuclei = predict_slide_distributed(
                predictor, path, output_dir, rank, world_size, overwrite, progress, **options
            )
        except (SlideError, FileNotFoundError) as e:  # before any barrier, in every process
            if len(slides) == 1:
                raise
            summary.failed[path] = str(e)
            if rank == 0:
                logger.warning(str(e))
            continue
        summary.done += 1
        summary.tiles += tiles
        summary.tiles_background += background
        summary.nuclei += nuclei
    every = comm.all_gather(summary)
    return SlideSummary(
        done=summary.done,
        skipped=summary.skipped,
        tiles=sum(s.tiles for s in every),
        tiles_background=summary.tiles_background,
        nuclei=sum(s.nuclei for s in every),
        failed=summary.failed,
    )


def run_slides(predictor: Predictor, slides: Sequence[str], args, distributed: bool = False) -> int:
    """tools/predict.py on slides: predict, print the summary; the exit status. ``distributed``:
    this is one process of several (``predict_slides_distributed``); process 0 prints."""
    run = predict_slides_distributed if distributed else predict_slides
    rank = 0
    if distributed:
        from detectron2.utils import comm

        rank = comm.get_rank()
    summary = run(
        predictor,
        slides,
        args.output,
        overwrite=args.overwrite,
        progress=rank == 0,
        level=args.level,
        mpp=args.mpp,
        slide_mpp=args.slide_mpp,
        roi=parse_roi(args.roi),
        detect_tissue=not args.all_tiles,
        label_tiff=getattr(args, "label_tiff", False),
    )
    if rank:
        return 1 if summary.failed else 0
    print(summary.table())
    for message in summary.failed.values():
        print(f"failed: {message}")
    print(f"outputs in {args.output}")
    return 1 if summary.failed else 0
