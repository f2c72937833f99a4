"""Cutting a large image or a slide into overlapping tiles, and which tile owns which nucleus.

Tiles of side ``tile`` start at ``tile_starts`` along each axis; each tile owns its core
(``tile_core``: seams halfway through each overlap), and keeps only the nuclei whose box centre
lies in it (``owned``), so a nucleus at a seam comes out once and whole; ``merge`` puts a large
image's tiles' nuclei together."""

import math
from typing import List, Tuple

import torch
from detectron2.structures import Boxes, Instances


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` with at least ``overlap``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def tile_core(starts: List[int], index: int, tile: int, length: int) -> Tuple[int, int]:
    """The part of tile ``index`` it owns: seams halfway through each overlap, so the cores of
    all tiles partition [0, length) and every nucleus is kept by exactly one tile."""
    lo = 0 if index == 0 else (starts[index] + starts[index - 1] + tile) // 2
    hi = length if index == len(starts) - 1 else (starts[index + 1] + starts[index] + tile) // 2
    return lo, hi


def tile_cores(
    starts: Tuple[List[int], List[int]], iy: int, ix: int, tile: int, size: Tuple[int, int]
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((y0, y1), (x0, x1)): the core of tile (``iy``, ``ix``) of the tiles starting at
    ``starts`` = (ys, xs) over an image of ``size`` = (h, w)."""
    return tile_core(starts[0], iy, tile, size[0]), tile_core(starts[1], ix, tile, size[1])


def owned(boxes, x: int, y: int, core: Tuple[Tuple[int, int], Tuple[int, int]]):
    """Which of a tile's boxes (N x 4, x0 y0 x1 y1 in the pixels of the tile at (``x``, ``y``);
    NumPy or torch) have their centre in the tile's ``core`` (``tile_cores``)."""
    cy = (boxes[:, 1] + boxes[:, 3]) / 2 + y
    cx = (boxes[:, 0] + boxes[:, 2]) / 2 + x
    (y0, y1), (x0, x1) = core
    return (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)


def merge(parts: List[Tuple[Instances, int, int]], size: Tuple[int, int]) -> Instances:
    """One image's Instances (masks, boxes, scores, classes) from its tiles' (instances, y, x)."""
    h, w = size
    out = Instances(size)
    n = sum(len(p) for p, _, _ in parts)
    masks = torch.zeros(n, h, w, dtype=torch.bool)
    boxes, scores, i = [], [], 0
    for inst, y, x in parts:
        th, tw = inst.image_size
        masks[i : i + len(inst), y : y + th, x : x + tw] = inst.pred_masks
        boxes.append(inst.pred_boxes.tensor + torch.tensor([x, y, x, y], dtype=torch.float32))
        scores.append(inst.scores)
        i += len(inst)
    out.pred_masks = masks
    out.pred_boxes = Boxes(torch.cat(boxes) if boxes else torch.zeros(0, 4))
    out.scores = torch.cat(scores) if scores else torch.zeros(0)
    out.pred_classes = torch.zeros(n, dtype=torch.int64)
    return out
