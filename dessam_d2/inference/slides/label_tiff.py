"""The slide's label TIFF: a tiled, pyramidal OME-TIFF of uint32 labels of level 0 (pixel =
nucleus id), written tile by tile from the prediction tiles' labels (``write_label_tiff``)."""

import os
import uuid
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from ...utils.io import atomic_open
from .reader import SlideGrid

LABEL_TIFF_TILE = 512
LABEL_CHUNK_CACHE = 16  # prediction tiles' labels kept loaded while the label TIFF is written


def label_tiff_downsamples(size: Tuple[int, int], tile: int = LABEL_TIFF_TILE) -> List[int]:
    """Level 0 and reduced levels, each half the one before, until a level fits in one tile."""
    downsamples = [1]
    while max(-(-s // downsamples[-1]) for s in size) > tile:
        downsamples.append(downsamples[-1] * 2)
    return downsamples


def _work_index(coords: np.ndarray, origin: float, scale: float, length: int) -> np.ndarray:
    """The work pixel holding the centre of each level-0 pixel ``coords``; -1 before the work
    area and ``length`` after it (so the result stays sorted when ``coords`` is)."""
    index = np.floor((coords + 0.5 - origin) / scale).astype(np.int64)
    return np.clip(index, -1, length)


def _label_tiff_tiles(
    size: Tuple[int, int],
    down: int,
    grid: SlideGrid,
    starts: Tuple[List[int], List[int]],
    tile_size: int,
    load: Callable,
    tile: int,
) -> Iterator[np.ndarray]:
    """The tiles of the level ``down`` times smaller than level 0, row by row: level-0 pixel
    (``down`` * i, ``down`` * j) for pixel (i, j), i.e. nearest-neighbour downsampling of the
    level below, taken from the prediction tiles' labels (where two tiles' nuclei overlap, the
    higher score owns the pixel, as in one tile)."""
    width, height = size
    ys, xs = starts
    y_ends = [min(y + tile_size, grid.size[1]) for y in ys]
    x_ends = [min(x + tile_size, grid.size[0]) for x in xs]

    cache: "OrderedDict[int, object]" = OrderedDict()

    def chunk(index):
        if index in cache:
            cache.move_to_end(index)
        else:
            cache[index] = load(index)
            if len(cache) > LABEL_CHUNK_CACHE:
                cache.popitem(last=False)
        return cache[index]

    level_h, level_w = -(-height // down), -(-width // down)
    for ty in range(0, level_h, tile):
        rows0 = (ty + np.arange(tile)) * down  # level-0 rows of this tile row
        wy = _work_index(rows0, grid.origin[1], grid.scale, grid.size[1])
        wy[rows0 >= height] = grid.size[1]
        for tx in range(0, level_w, tile):
            cols0 = (tx + np.arange(tile)) * down
            wx = _work_index(cols0, grid.origin[0], grid.scale, grid.size[0])
            wx[cols0 >= width] = grid.size[0]
            out = np.zeros((tile, tile), np.uint32)
            best = np.full((tile, tile), -np.inf)
            lo_y, hi_y = max(int(wy[0]), 0), int(wy[-1])
            lo_x, hi_x = max(int(wx[0]), 0), int(wx[-1])
            # prediction tiles overlapping work rows [lo_y, hi_y] and columns [lo_x, hi_x]
            for iy in range(bisect_right(y_ends, lo_y), bisect_left(ys, hi_y + 1)):
                i0, i1 = np.searchsorted(wy, [ys[iy], y_ends[iy]])
                if i0 == i1:
                    continue
                for ix in range(bisect_right(x_ends, lo_x), bisect_left(xs, hi_x + 1)):
                    j0, j1 = np.searchsorted(wx, [xs[ix], x_ends[ix]])
                    found = chunk(iy * len(xs) + ix) if j0 < j1 else None
                    if found is None:
                        continue
                    labels, scores, first_id = found
                    local = labels[np.ix_(wy[i0:i1] - ys[iy], wx[j0:j1] - xs[ix])]
                    score = scores[local]
                    win = (local > 0) & (score > best[i0:i1, j0:j1])
                    out[i0:i1, j0:j1][win] = local[win].astype(np.uint32) + (first_id - 1)
                    best[i0:i1, j0:j1][win] = score[win]
            yield out


def write_label_tiff(
    path: str,
    size: Tuple[int, int],
    grid: SlideGrid,
    starts: Tuple[List[int], List[int]],
    tile_size: int,
    load: Callable,
    mpp: Optional[float] = None,
    tile: int = LABEL_TIFF_TILE,
    progress: bool = False,
) -> None:
    """A tiled, pyramidal uint32 label image of the slide's level 0 (``size`` = (w, h)): 0 =
    background, else the nucleus' id in the GeoJSON and CSV. Level 0 is the slide's level 0
    (whatever level or resolution was predicted: each pixel takes the work pixel holding its
    centre, as the GeoJSON outlines do); every further level is half the one before, nearest
    neighbour, down to one tile. The file is a pyramidal OME-TIFF (BigTIFF): level 0 is the only
    page of the main IFD chain, the reduced levels are its SubIFDs (``subfiletype=1``), and the
    first page's ImageDescription holds the OME-XML (uint32, size, ``PhysicalSizeX/Y`` in µm
    when ``mpp`` is known), as Bio-Formats (QuPath, Fiji) and tifffile/napari read pyramids;
    zlib-compressed, resolution tags in pixels per centimetre when ``mpp`` is known. Written
    tile by tile from the prediction tiles' labels (``load(tile index)`` -> (labels 1..n,
    scores, first id) or None, at most ``LABEL_CHUNK_CACHE`` held), under a temporary name,
    then renamed. The same inputs give the same bytes (the OME UUID is derived from the file's
    name and size), so a resumed run writes the file an uninterrupted one does."""
    downsamples = label_tiff_downsamples(size, tile)
    shapes = [(-(-size[1] // d), -(-size[0] // d)) for d in downsamples]
    total = sum(-(-h // tile) * -(-w // tile) for h, w in shapes)
    bar = tqdm(total=total, desc=os.path.basename(path), unit="tile", disable=not progress)
    with atomic_open(path) as f:  # tifffile writes to the open, seekable temporary file
        metadata = _ome_metadata(os.path.basename(path), size, mpp)
        _write_levels(f, metadata, size, grid, starts, tile_size, load, mpp, tile, downsamples, bar)
    bar.close()


def _ome_metadata(name: str, size: Tuple[int, int], mpp: Optional[float]) -> dict:
    """tifffile's OME-XML fields: one 2-D image named after the file, its µm per pixel when
    known, and a UUID fixed by the name and size (tifffile's default is random)."""
    metadata = {
        "axes": "YX",
        "Name": name,
        "UUID": str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"dessam-d2/label-tiff/{name}/{size[0]}x{size[1]}")
        ),
    }
    if mpp:
        metadata.update(
            PhysicalSizeX=mpp, PhysicalSizeXUnit="µm", PhysicalSizeY=mpp, PhysicalSizeYUnit="µm"
        )
    return metadata


def _write_levels(f, metadata, size, grid, starts, tile_size, load, mpp, tile, downsamples, bar):
    """Level 0 (with the OME-XML and room for the reduced levels as SubIFDs), then each
    reduced level into the next SubIFD; every level from a generator of tiles."""
    import tifffile

    def counted(tiles):
        for t in tiles:
            yield t
            bar.update(1)

    with tifffile.TiffWriter(f, bigtiff=True, ome=True) as tif:
        for level, down in enumerate(downsamples):
            extra = {}
            if mpp:
                extra = dict(resolution=(1e4 / (mpp * down),) * 2, resolutionunit="CENTIMETER")
            if level == 0:
                extra.update(subifds=len(downsamples) - 1, metadata=metadata)
            else:
                extra.update(subfiletype=1, metadata=None)
            tif.write(
                counted(_label_tiff_tiles(size, down, grid, starts, tile_size, load, tile)),
                shape=(-(-size[1] // down), -(-size[0] // down)),
                dtype=np.uint32,
                tile=(tile, tile),
                photometric="minisblack",
                compression="zlib",
                **extra,
            )
