"""The model wrapper: an image of any size in, its nuclei out (``Predictor``: Detectron2
Instances), tiled through ``tiling`` when larger than a tile. What is written from them:
``outputs``; which files: ``inputs``; runs over many images or slides: ``images``, ``slides``."""

from typing import Callable, Optional

import numpy as np
import torch
from detectron2.structures import Instances

from ..data.transforms import sam_model_input
from ..errors import UsageError
from ..evaluation.release_protocol import RELEASE_MIN_AREA
from .outlines import one_piece_per_nucleus
from .tiling import merge, owned, tile_cores, tile_starts


class Predictor:
    """A DES-SAM model that segments whole images of any size (tiled when larger than a tile).

    ``clean_masks``: each tile's masks go through
    :func:`~dessam_d2.inference.outlines.one_piece_per_nucleus` (holes and islands under
    ``min_area`` px removed, overlaps to the higher score, the largest piece kept): one outline
    per nucleus. Off by default here (the model's masks as predicted); ``tools/predict.py`` turns
    it on."""

    def __init__(
        self,
        model: torch.nn.Module,
        tile_size: int = 0,
        tile_overlap: Optional[int] = None,
        image_format: str = "RGB",
        clean_masks: bool = False,
        min_area: int = RELEASE_MIN_AREA,
    ):
        self.model = model.eval()
        self.clean_masks = clean_masks
        self.min_area = min_area
        self.image_size = model.image_size
        self.image_format = image_format  # cfg.INPUT.FORMAT: what the model was trained on
        self.tile_size = tile_size or self.image_size
        if tile_overlap is None:  # default: 128 px, at most a quarter of the tile
            tile_overlap = min(128, self.tile_size // 4)
        if not 0 <= tile_overlap < self.tile_size:
            raise UsageError(
                f"tile overlap {tile_overlap} must be in [0, tile size {self.tile_size}): "
                "pass a smaller --tile-overlap or a larger --tile-size"
            )
        self.tile_overlap = tile_overlap

    def model_input(self, image: np.ndarray, boxes: Optional[np.ndarray] = None):
        """``sam_model_input`` (the mapper's): the input dict and ``boxes`` in its frame."""
        return sam_model_input(image, self.image_size, self.image_format, boxes=boxes)

    def num_tiles(self, height: int, width: int) -> int:
        """How many tiles an image of this size is predicted in."""
        t, o = self.tile_size, self.tile_overlap
        return len(tile_starts(height, t, o)) * len(tile_starts(width, t, o))

    @torch.no_grad()
    def __call__(
        self, image: np.ndarray, progress: Optional[Callable[[int, int], None]] = None
    ) -> Instances:
        """H x W x 3 uint8 RGB -> Instances at the image's size (pred_masks, boxes, scores).

        ``progress(done, total)`` is called after each tile (an interactive front end's
        progress bar; it may raise to stop)."""
        h, w = image.shape[:2]
        t = self.tile_size
        ys, xs = tile_starts(h, t, self.tile_overlap), tile_starts(w, t, self.tile_overlap)
        total = len(ys) * len(xs)
        if total == 1:
            inst = self._predict_tile(image)
            if progress:
                progress(1, 1)
            return inst
        parts = []
        for iy, y in enumerate(ys):
            for ix, x in enumerate(xs):
                inst = self._predict_tile(image[y : y + t, x : x + t])
                core = tile_cores((ys, xs), iy, ix, t, (h, w))
                parts.append((inst[owned(inst.pred_boxes.tensor, x, y, core)], y, x))
                if progress:
                    progress(len(parts), total)
        return merge(parts, (h, w))

    def _predict_tile(self, tile: np.ndarray) -> Instances:
        inst = self.model([self.model_input(tile)[0]])[0]["instances"].to("cpu")
        if self.clean_masks and len(inst):
            masks = one_piece_per_nucleus(
                inst.pred_masks.numpy(), inst.scores.numpy(), self.min_area
            )
            inst.pred_masks = torch.from_numpy(masks)
        return inst
