"""DES-SAM (MICCAI 2024) for Detectron2: box-supervised nucleus instance segmentation on SAM."""

from . import modeling  # noqa: F401  (registers DESSAM, its backbone, ROI heads and mask head)
from .config import add_dessam_config

__all__ = ["add_dessam_config"]
