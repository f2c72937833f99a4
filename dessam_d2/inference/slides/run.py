"""Predicting whole slides, by one process or by each of several (``torch.distributed``).

One process reads, predicts and writes the tissue tiles in order (``journal``: resumable).
Several processes share out a slide's tissue tiles (process r predicts every world-size-th, from
the r-th), write each tile's nuclei to ``.<stem>.tiles/``, and process 0 then assembles the
slide from those exactly as one process does: the same numbering and the same files.
"""

import json
import logging
import os
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from ...errors import SlideError
from ...evaluation.metrics import masks_to_label_map
from ..features import label_polygons, nucleus_features
from ..outlines import nucleus_feature
from ..outputs import NUCLEI, RunSummary
from ..peers import PeerWatch, watching
from ..predictor import Predictor
from ..tiling import owned, tile_cores, tile_starts
from . import journal
from .label_tiff import write_label_tiff
from .reader import SlideGrid, level0_mpp, open_slide, read_work_tile, slide_grid
from .tissue import Tile, slide_tiles, tissue_mask

logger = logging.getLogger(__name__)

TILES, BACKGROUND = "tiles predicted", "tiles skipped (no tissue)"  # RunSummary's counts


def _tile_nuclei(
    predictor: Predictor, image: np.ndarray, tile: Tile, starts: Tuple[List[int], List[int]], grid
) -> Tuple[List[Dict], Dict[int, list], Optional[np.ndarray]]:
    """The nuclei this tile owns: (CSV rows with tile-local ids, polygons in work pixels, the
    tile's label image of them with those ids, None when there are none)."""
    instances = predictor(image)
    if not len(instances):
        return [], {}, None
    size = (grid.size[1], grid.size[0])
    core = tile_cores(starts, tile.iy, tile.ix, predictor.tile_size, size)
    keep = owned(instances.pred_boxes.tensor.numpy(), tile.x, tile.y, core)
    scores = instances.scores.numpy()
    # all of the tile's nuclei compete for pixels (higher score wins); only its own are written
    labels = masks_to_label_map(instances.pred_masks.numpy(), scores)
    own = np.flatnonzero(keep) + 1
    labels[~np.isin(labels, own)] = 0
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


def _predict_share(
    predictor, plan, paths, rank, world_size, overwrite, progress, label_tiff, watch
):
    """This process's share of the tissue tiles, each written to ``.<stem>.tiles/``; the number
    predicted. A tile whose file exists is not predicted again, nor are tiles an interrupted run
    already assembled. ``watch``: the other processes (``PeerWatch``), checked between tiles."""
    from detectron2.utils import comm

    barrier = watch.barrier if watch else comm.synchronize
    slide, grid, tiles, starts, settings = plan
    if rank == 0:
        journal.start_shared_tiles(paths, settings, overwrite)
    barrier()

    assembled = 0 if overwrite else journal.assembled_tiles(paths, settings)
    todo = [t for t in tiles if t.tissue and t.index >= assembled]
    mine = todo[rank::world_size]
    stem = os.path.basename(paths["csv"])[: -len("_nuclei.csv")]
    bar = tqdm(total=len(mine), desc=f"{stem} (process {rank})", unit="tile", disable=not progress)
    predicted = 0
    for tile in mine:
        if watch:
            watch.check()
        if not journal.tile_done(paths["tiles"], tile):
            image = read_work_tile(slide, grid, tile.x, tile.y, tile.w, tile.h)
            result = _tile_nuclei(predictor, image, tile, starts, grid)
            journal.save_tile_result(paths["tiles"], tile, result, label_tiff)
            predicted += 1
        bar.update(1)
    bar.close()
    barrier()
    return predicted


def _shared_tile_results(paths, settings, predictor, slide, grid, starts) -> Optional[Callable]:
    """The tiles of several processes (same settings): a loader that predicts the tiles without
    a file; None when there are none."""
    if not journal.shared_tiles_match(paths, settings):
        return None

    def results(tile: Tile) -> Tuple:
        found = journal.load_tile_result(paths["tiles"], tile)
        if found is None:
            image = read_work_tile(slide, grid, tile.x, tile.y, tile.w, tile.h)
            found = _tile_nuclei(predictor, image, tile, starts, grid)
        return found

    return results


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
    rank: int = 0,
    world_size: int = 1,
    watch: Optional[PeerWatch] = None,
) -> Tuple[int, int, int]:
    """Predict one slide at level 0, ``level``, or the resolution ``mpp`` (µm per pixel; the
    slide's own is ``slide_mpp`` when it does not say), only in ``roi`` (x, y, w, h in level-0
    pixels) if given, only tiles with tissue if ``detect_tissue``; ``label_tiff``: also write
    ``<stem>_labels.ome.tif`` (``write_label_tiff``). Returns (tiles predicted by this process,
    background tiles skipped, nuclei (process 0 only)).

    Several processes: call it in each, ``torch.distributed`` set up, with its ``rank`` of
    ``world_size`` and one ``output_dir`` (shared by all machines); ``watch``: stop when another
    process fails (``predict_slides`` sets one up). The files are byte-identical to a
    one-process run's; the tiles' files are kept until the slide is done. A run of one process
    after an interrupted run of several reuses the tiles they finished."""
    paths = journal.slide_output_paths(output_dir, path)
    plan = _slide_plan(predictor, path, level, mpp, slide_mpp, roi, detect_tissue, label_tiff)
    slide, grid, tiles, starts, settings = plan
    background = sum(not t.tissue for t in tiles)
    shared = 0
    if world_size > 1:
        args = (rank, world_size, overwrite, progress, label_tiff, watch)
        shared = _predict_share(predictor, plan, paths, *args)
        if rank != 0:
            return shared, background, 0
    tile_results = None
    if world_size > 1 or not overwrite:
        # tiles without a file (the outputs of an interrupted run were damaged) are predicted
        tile_results = _shared_tile_results(paths, settings, predictor, slide, grid, starts)

    state = journal.resume(paths, settings, overwrite, path)
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
                journal.save_label_chunk(paths["label_chunks"], tile, rows, labels, state.next_id)
            rows, features = _to_slide(rows, polygons, grid, state.next_id)
            predicted += 1
            journal.append_tile(paths, state, rows, features)
        journal.save_state(paths, state, tile.index + 1)
        bar.update(1)
        bar.set_postfix(nuclei=state.next_id - 1)
    bar.close()

    journal.write_geojson(paths)
    if label_tiff:
        chunks = paths["label_chunks"]
        write_label_tiff(
            paths["label_tiff"],
            slide.dimensions,
            grid,
            starts,
            predictor.tile_size,
            lambda index: journal.load_label_chunk(chunks, index),
            mpp=slide_mpp or level0_mpp(slide),
            progress=progress,
        )
    journal.write_csv(paths)
    return (shared if world_size > 1 else predicted), background, state.next_id - 1


def predict_slides(
    predictor: Predictor,
    slides: Sequence[str],
    output_dir: str,
    overwrite: bool = False,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    **options,
) -> RunSummary:
    """Every slide in turn (``options``: ``predict_slide``'s level, mpp, slide_mpp, roi,
    detect_tissue, label_tiff). A slide that cannot be opened is counted as failed and the rest
    go on (one slide alone: its error is raised); finished slides are skipped.

    Several processes: call it in each with its ``rank`` of ``world_size``; each slide's tiles
    are shared out, and every process returns the summary of all. A process that fails stops
    the others within a minute, with its error (``PeerWatch``: ``RunFailedError``)."""
    os.makedirs(output_dir, exist_ok=True)
    with watching(rank, world_size) as watch:
        summary = _predict_slides(
            predictor, slides, output_dir, overwrite, progress, rank, world_size, watch, options
        )
    if world_size > 1:
        from detectron2.utils import comm

        summary = RunSummary.of_all(comm.all_gather(summary))
    return summary


def _predict_slides(
    predictor, slides, output_dir, overwrite, progress, rank, world_size, watch, options
):
    summary = RunSummary("slides", counts={TILES: 0, BACKGROUND: 0, NUCLEI: 0})
    start = time.perf_counter()
    first = rank == 0  # the slides' counts are process 0's, the tiles' every process's
    for path in slides:
        # decided by every process before the slide's first barrier, which process 0 must pass
        # before it can write the CSV: all see the same
        if os.path.exists(journal.slide_output_paths(output_dir, path)["csv"]) and not overwrite:
            summary.skipped += first
            continue
        try:
            tiles, background, nuclei = predict_slide(
                predictor,
                path,
                output_dir,
                overwrite=overwrite,
                progress=progress,
                rank=rank,
                world_size=world_size,
                watch=watch,
                **options,
            )
        except (SlideError, FileNotFoundError) as e:  # before any barrier, in every process
            if len(slides) == 1:
                raise
            if first:
                summary.failed[path] = str(e)
                logger.warning(str(e))
            continue
        summary.done += first
        summary.add(TILES, tiles)
        summary.add(BACKGROUND, background if first else 0)
        summary.add(NUCLEI, nuclei)
    summary.seconds = time.perf_counter() - start
    return summary
