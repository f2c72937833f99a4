"""A slide's work files: what a killed run leaves for the next one to go on from.

Nothing is held for the whole slide but counters: after each tile its features and rows are
appended to files in ``.<stem>.partial/`` (``append_tile``) and a small state (tiles done, next
id, the two files' lengths) is written atomically (``save_state``). A killed run resumes after
the last finished tile (``resume``: it cuts the files back to the recorded lengths), so its
outputs equal an uninterrupted run's. With a label TIFF, each tile's labels wait in
``.<stem>.partial/labels/`` (``save_label_chunk``). The finished files are assembled by
streaming copies and renamed into place (``write_geojson``, ``write_csv``).

Several processes write each tile's nuclei to ``.<stem>.tiles/<index>.npz`` (``save_tile_result``;
the file marks the tile done) under the settings that made them (``.<stem>.tiles/settings.json``).
"""

import csv
import io
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from ...utils.io import atomic_open, atomic_write_json
from ..features import CSV_FIELDS
from .tissue import Tile

logger = logging.getLogger(__name__)


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
        "label_tiff": os.path.join(output_dir, stem + "_labels.ome.tif"),
        "label_chunks": os.path.join(work, "labels"),
        # several processes: each tile's nuclei as its process found them, for process 0
        "tiles": os.path.join(output_dir, f".{stem}.tiles"),
    }


@dataclass
class SlideState:
    settings: Dict
    tiles_done: int = 0
    next_id: int = 1
    features_bytes: int = 0
    rows_bytes: int = 0


def _truncate(path: str, size: int) -> None:
    with open(path, "ab") as f:
        f.truncate(size)


def resume(paths: Dict[str, str], settings: Dict, overwrite: bool, name: str) -> SlideState:
    """The state to go on from: an interrupted run's, when it had the same ``settings`` and its
    work files are intact (and not ``overwrite``), else a fresh start (the work files emptied)."""
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
                f"{name}: settings or work files changed since the interrupted run; "
                "starting over"
            )
    if state.tiles_done == 0:
        shutil.rmtree(paths["work"], ignore_errors=True)
        os.makedirs(paths["work"])
        open(paths["features"], "wb").close()
        open(paths["rows"], "wb").close()
    _truncate(paths["features"], state.features_bytes)
    _truncate(paths["rows"], state.rows_bytes)
    return state


def append_tile(paths: Dict[str, str], state: SlideState, rows: List[Dict], features: List[Dict]):
    """A tile's CSV rows and GeoJSON features (slide ids from ``state.next_id``) appended to the
    work files, on disk before the state says so; ``state.next_id`` moves past them."""
    if not rows:
        return
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


def save_state(paths: Dict[str, str], state: SlideState, tiles_done: int) -> None:
    state.tiles_done = tiles_done
    state.features_bytes = os.path.getsize(paths["features"])
    state.rows_bytes = os.path.getsize(paths["rows"])
    atomic_write_json(paths["state"], asdict(state))


def write_geojson(paths: Dict[str, str]) -> None:
    with atomic_open(paths["geojson"]) as out, open(paths["features"], "rb") as part:
        out.write(b'{"type":"FeatureCollection","features":[\n')
        shutil.copyfileobj(part, out)
        out.write(b"\n]}\n")


def write_csv(paths: Dict[str, str]) -> None:
    """The CSV, last: it marks the slide done; then the work files go."""
    with atomic_open(paths["csv"]) as out, open(paths["rows"], "rb") as part:
        out.write((",".join(CSV_FIELDS) + "\r\n").encode())
        shutil.copyfileobj(part, out)
    shutil.rmtree(paths["work"], ignore_errors=True)
    shutil.rmtree(paths["tiles"], ignore_errors=True)  # tiles of an interrupted shared run


def save_label_chunk(
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


def load_label_chunk(folder: str, index: int):
    """(labels numbered 1..n, scores indexed by those numbers, first id) or None."""
    path = os.path.join(folder, f"{index}.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return z["labels"], z["scores"], int(z["first_id"])


def save_tile_result(folder: str, tile: Tile, result: Tuple, label_tiff: bool) -> None:
    """One tile's nuclei (rows, polygons, labels) for process 0 (rows and polygons as JSON,
    which gives back the same Python values), written atomically: it marks the tile done."""
    rows, polygons, labels = result
    arrays = {
        "rows": np.array(json.dumps(rows)),
        "polygons": np.array(json.dumps(list(polygons.items()))),
    }
    if label_tiff and labels is not None:
        arrays["labels"] = labels
    with atomic_open(os.path.join(folder, f"{tile.index}.npz")) as f:
        np.savez_compressed(f, **arrays)


def load_tile_result(folder: str, tile: Tile) -> Optional[Tuple]:
    path = os.path.join(folder, f"{tile.index}.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        rows = json.loads(str(z["rows"]))
        polygons = {int(k): v for k, v in json.loads(str(z["polygons"]))}
        labels = z["labels"] if "labels" in z.files else None
    return rows, polygons, labels


def tile_done(folder: str, tile: Tile) -> bool:
    return os.path.exists(os.path.join(folder, f"{tile.index}.npz"))


def shared_tiles_match(paths: Dict[str, str], settings: Dict) -> bool:
    """Whether the tiles of several processes in ``.<stem>.tiles/`` were made with ``settings``."""
    try:
        with open(os.path.join(paths["tiles"], "settings.json")) as f:
            return json.load(f) == settings
    except (OSError, ValueError):
        return False


def start_shared_tiles(paths: Dict[str, str], settings: Dict, overwrite: bool) -> None:
    """Process 0, before the others predict: ``.<stem>.tiles/`` kept when it holds tiles of
    the same settings (and not ``overwrite``), else emptied and marked with ``settings``."""
    if not overwrite and shared_tiles_match(paths, settings):
        return
    shutil.rmtree(paths["tiles"], ignore_errors=True)
    os.makedirs(paths["tiles"])
    atomic_write_json(os.path.join(paths["tiles"], "settings.json"), settings)


def assembled_tiles(paths: Dict[str, str], settings: Dict) -> int:
    """Tiles an interrupted run (of any number of processes) already put into the outputs."""
    try:
        with open(paths["state"]) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return 0
    return saved.get("tiles_done", 0) if saved.get("settings") == settings else 0
