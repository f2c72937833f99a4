from .checkpoint import SAMCheckpointError, load_sam_checkpoint
from .meta_arch import DESSAM
from .prompt_mask_head import DESSAMROIHeads, SAMPromptMaskHead
from .sam_backbone import SAMImageEncoder, build_sam_sfp_backbone

__all__ = [
    "DESSAM",
    "DESSAMROIHeads",
    "SAMCheckpointError",
    "SAMImageEncoder",
    "SAMPromptMaskHead",
    "build_sam_sfp_backbone",
    "load_sam_checkpoint",
]
