"""DES-SAM's model: importing this package registers its parts with Detectron2's registries."""

from .meta_arch import DESSAM
from .prompt_mask_head import SAMPromptMaskHead
from .roi_heads import DESSAMROIHeads
from .sam_backbone import SAMImageEncoder, build_sam_sfp_backbone
from .sam_weights import load_sam_checkpoint

__all__ = [
    "DESSAM",
    "DESSAMROIHeads",
    "SAMImageEncoder",
    "SAMPromptMaskHead",
    "build_sam_sfp_backbone",
    "load_sam_checkpoint",
]
