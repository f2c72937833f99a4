"""One image in memory at a time: what an interactive front end (the napari plugin,
``dessam_d2.plugin``) calls. The same code as the tools, without their files:

- ``load_session``: a config and weights -> a ``Session`` (the model, its ``Predictor``, and what
  is loaded, for the front end to show);
- ``predict_image``: what ``tools/predict.py`` writes for one image (the label image with its
  ids, the detected boxes and scores, the per-nucleus table), through the same tiling and
  clean-up;
- ``segment_boxes``: what ``tools/boxes_to_masks.py`` computes for the boxes of one image, as a
  label image (box i -> label i + 1).
"""

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..data.export import check_boxes
from ..errors import ConfigError, InputNotFoundError, UsageError
from ..evaluation.metrics import masks_to_label_map
from ..evaluation.release_protocol import RELEASE_MIN_AREA
from .annotate import segment_image_boxes
from .outputs import labels_and_rows
from .predictor import Predictor

__all__ = ["Session", "Prediction", "load_session", "predict_image", "segment_boxes"]


@dataclass
class Session:
    """A loaded model: ``weights`` is "" when only SAM's checkpoint is loaded (the teacher:
    boxes -> masks works, detection needs trained weights)."""

    cfg: object
    model: object
    predictor: Predictor
    config_file: str
    weights: str

    @property
    def trained(self) -> bool:
        return bool(self.weights)

    def describe(self) -> Dict[str, str]:
        """What is loaded, in a user's words: variant, device, dtype, threshold, weights."""
        cfg, model = self.cfg, self.model
        fitted = getattr(model, "fitted_score_threshold", None)
        threshold = f"{model.score_threshold:.3f}"
        threshold += " (fitted on the training boxes)" if fitted is not None else " (config)"
        sam = cfg.MODEL.SAM
        return {
            "variant": f"SAM {sam.VARIANT}, {sam.IMAGE_SIZE} px input",
            "device": str(model.device),
            "dtype": str(model.inference_dtype()).replace("torch.", ""),
            "threshold": threshold if self.trained else "- (no detector trained)",
            "weights": self.weights or f"none: the SAM teacher of {sam.CHECKPOINT}",
        }


@dataclass
class Prediction:
    """One image's nuclei: ``labels`` (H x W int32, 0 = background), and per nucleus id
    1..N of ``rows`` (the CSV rows of ``tools/predict.py``) its detected box ``boxes[i]`` (XYXY
    image pixels) and ``scores[i]``."""

    labels: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    rows: List[Dict]


def load_session(
    config_file: str,
    weights: str = "",
    opts: Sequence[str] = (),
    tile_size: int = 0,
    tile_overlap: Optional[int] = None,
    clean_masks: bool = True,
    min_area: int = RELEASE_MIN_AREA,
    dtype: str = "auto",
) -> Session:
    """Build the model of ``config_file`` (with ``opts``) and load ``weights`` (a trained
    DES-SAM; default MODEL.WEIGHTS). Without either, the config's MODEL.SAM.CHECKPOINT alone is
    loaded: the teacher. Every wrong file is a one-line ``UserError``; the predictor cleans
    masks and computes in ``dtype`` (MODEL.DESSAM.INFERENCE_DTYPE; ``opts`` win) as
    ``tools/predict.py`` does by default."""
    from ..config import load_config, precision_opts
    from ..modeling.checkpointer import load_model

    if not config_file or not os.path.isfile(config_file):
        raise InputNotFoundError(
            f"config {config_file or '(none)'} does not exist: pick a .yaml of configs/ or a "
            "training run's config.yaml"
        )
    cfg = load_config(config_file, precision_opts(dtype) + list(opts))
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights and not cfg.MODEL.SAM.CHECKPOINT:
        raise ConfigError(
            f"{config_file}: no weights to load: pick a trained model_final.pth, or a config "
            "whose MODEL.SAM.CHECKPOINT names SAM's weights (the teacher of boxes -> masks)"
        )
    model = load_model(cfg, weights)
    predictor = Predictor(model, tile_size, tile_overlap, cfg.INPUT.FORMAT, clean_masks, min_area)
    return Session(cfg, model, predictor, config_file, weights)


def predict_image(
    session: Session,
    image: np.ndarray,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Prediction:
    """``tools/predict.py`` on one H x W x 3 uint8 RGB image, in memory (``progress(done,
    total)`` after each tile)."""
    if not session.trained:
        raise UsageError(
            "no trained DES-SAM is loaded (only SAM's teacher): load a model_final.pth to "
            "detect nuclei; boxes -> masks works with the teacher alone"
        )
    instances = session.predictor(image, progress=progress)
    labels, rows = labels_and_rows(image, instances)
    ids = np.array([r["id"] for r in rows], dtype=np.int64)
    boxes = instances.pred_boxes.tensor.numpy().reshape(-1, 4)[ids - 1]
    scores = instances.scores.numpy()[ids - 1]
    return Prediction(labels, boxes.astype(np.float64), scores.astype(np.float64), rows)


def segment_boxes(
    session: Session, image: np.ndarray, boxes: np.ndarray, student: bool = False
) -> np.ndarray:
    """SAM's mask for each box (N x 4 XYXY image pixels) of one image, as the teacher or the
    trained ``student`` (``tools/boxes_to_masks.py``'s masks): a label image where box i is
    label i + 1 (an overlap goes to the earlier box)."""
    if student and not session.trained:
        raise UsageError(
            "the student needs a trained DES-SAM: load a model_final.pth, or use the teacher"
        )
    boxes = check_boxes(boxes, *image.shape[:2])
    instances = segment_image_boxes(session.predictor, image, boxes, student=student)
    masks = instances.pred_masks.numpy()
    return masks_to_label_map(masks, np.ones(len(masks)))
