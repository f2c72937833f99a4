"""Official SAM checkpoints (``sam_vit_{b,l,h}_*.pth``) -> DES-SAM's SAM parts, strictly."""

import logging
import os
from typing import Dict

import torch
from torch import nn

from ..errors import SAMCheckpointError, first_few

__all__ = ["SAM_PARTS", "read_sam_state_dict", "load_sam_checkpoint"]

logger = logging.getLogger(__name__)

# Encoder width of each official variant, read off patch_embed.proj.weight (width x 3 x 16 x 16).
_WIDTH_TO_VARIANT = {768: "vit_b", 1024: "vit_l", 1280: "vit_h"}
SAM_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def _first(keys, n: int = 5) -> str:
    return first_few(sorted(keys), n)


def read_sam_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state dict of an official SAM checkpoint, with a clear error for a bad file."""
    if not os.path.isfile(path):
        raise SAMCheckpointError(
            f"SAM checkpoint {path} does not exist: download sam_vit_b_01ec64.pth (or the l/h "
            "file) and set MODEL.SAM.CHECKPOINT to its path"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of something else, ...
        raise SAMCheckpointError(
            f"SAM checkpoint {path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]}): "
            "the file is truncated or not a SAM checkpoint; download it again"
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SAMCheckpointError(f"SAM checkpoint {path} does not hold a state dict of tensors")
    return state


def checkpoint_variant(state: Dict[str, torch.Tensor]) -> str:
    w = state.get("image_encoder.patch_embed.proj.weight")
    return _WIDTH_TO_VARIANT.get(int(w.shape[0]), "custom") if w is not None else "unknown"


def load_sam_checkpoint(parts: Dict[str, nn.Module], path: str, variant: str = "") -> None:
    """Load ``path`` into ``parts`` = {"image_encoder": ..., "prompt_encoder": ..., "mask_decoder":
    ...} strictly: every tensor of the file placed, every parameter of the parts filled.

    Raises SAMCheckpointError naming the path and the first mismatched keys.
    """
    state = read_sam_state_dict(path)
    found = checkpoint_variant(state)
    if variant and variant != "custom" and found != variant:
        raise SAMCheckpointError(
            f"SAM checkpoint {path} is a {found} checkpoint but MODEL.SAM.VARIANT is {variant}: "
            "set the variant that matches the file"
        )
    expected = {
        f"{name}.{k}": v for name, module in parts.items() for k, v in module.state_dict().items()
    }
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_first(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch (file vs model): {_first(wrong_shape, 3)}")
    if problems:
        raise SAMCheckpointError(
            f"SAM checkpoint {path} does not fit the model ({found} file): " + "; ".join(problems)
        )
    for name, module in parts.items():
        prefix = name + "."
        sub = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(sub, strict=True)
    logger.info(f"Loaded SAM checkpoint {path} ({found}, {len(state)} tensors)")
