"""DES-SAM checkpoints (``model_*.pth``): atomic saves, strict loads, one-line errors.

``DESSAMCheckpointer`` is Detectron2's ``DetectionCheckpointer`` with five changes:
    * ``save`` writes to a temporary name in the same folder and renames it, and so does the
      ``last_checkpoint`` tag: a kill leaves either the old file or the complete new one, never a
      truncated file that ``--resume`` would load;
    * ``save`` refuses a model with a non-finite parameter (``NonFiniteError``): a diverged model
      is never written over the last good checkpoint;
    * ``load`` fails in one line (``CheckpointError``) on a missing, truncated or foreign file;
    * ``save`` also keeps the detector's state outside the state dict (``detector_state``: the
      fitted box score threshold and the anchors, which may have been fitted to the training
      boxes) and ``load`` restores it;
    * ``load`` is strict: a parameter missing from the file or of another shape (a model of
      another SAM variant or config) is an error, not Detectron2's warning and random weights.
A truncated ``model_*.pth`` named in ``last_checkpoint`` (possible only when copied or written
by something else) is an error naming both files, not a silent fall-back to an older checkpoint.

``load_model`` builds the model of a config and loads trained weights into it for predicting.
"""

import glob
import logging
import os
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer

from ..errors import CheckpointError, InputNotFoundError, NonFiniteError, first_few
from ..utils.io import TEMP_SUFFIX, atomic_open, atomic_write_text, remove_stale_temp_files

__all__ = ["DESSAMCheckpointer", "load_model"]

logger = logging.getLogger(__name__)


def _first(items: List[str], n: int = 3) -> str:
    return first_few(items, n)


def non_finite_parameters(model: torch.nn.Module) -> List[str]:
    return [
        name
        for name, value in model.state_dict().items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


class DESSAMCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` with atomic saves and strict, one-line-error loads."""

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        bad = non_finite_parameters(self.model)
        if bad:
            raise NonFiniteError(
                f"not saving {path}: the model has non-finite parameters ({_first(bad)}); "
                f"training diverged, the last good checkpoint is {self._last_or_none()}"
            )
        data = {"model": self.model.state_dict()}
        if hasattr(self.model, "detector_state"):
            data["detector"] = self.model.detector_state()
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        self.logger.info(f"Saving checkpoint to {path}")
        with atomic_open(path) as f:
            torch.save(data, f)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    def remove_stale_temp_files(self) -> List[str]:
        """Delete what a kill during ``save`` left behind (hidden, never loaded, but large)."""
        pattern = os.path.join(glob.escape(self.save_dir), f".*.pth.*{TEMP_SUFFIX}")
        stale = remove_stale_temp_files(pattern)
        for path in stale:
            logger.info(f"removed {path}, left by an interrupted checkpoint save")
        return stale

    def _last_or_none(self) -> str:
        return self.get_checkpoint_file() if self.has_checkpoint() else "none"

    def _where(self, path: str) -> str:
        tag = os.path.join(self.save_dir, "last_checkpoint")
        if self.save_dir and self.has_checkpoint() and path == self.get_checkpoint_file():
            return f"checkpoint {path} (named in {tag})"
        return f"checkpoint {path}"

    def load(self, path: str, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(path):
            raise CheckpointError(
                f"{self._where(path)} does not exist: pass a model_*.pth written by "
                "tools/train_net.py"
            )
        self._loading = path
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str):
        try:
            checkpoint = super()._load_file(filename)
        except Exception as e:  # a truncated zip, a pickle of something else, ...
            reason = str(e).splitlines()[0] if str(e) else ""
            raise CheckpointError(
                f"{self._where(self._loading)} cannot be read ({type(e).__name__}: {reason}): "
                "the file is truncated or not a PyTorch checkpoint; use an earlier model_*.pth "
                "(edit last_checkpoint to name it) or train again"
            ) from None
        if not isinstance(checkpoint.get("model"), dict):
            raise CheckpointError(f"{self._where(self._loading)} holds no model state dict")
        return checkpoint

    def _load_model(self, checkpoint):
        where = self._where(self._loading)
        state = checkpoint["model"]
        if any(k.startswith("image_encoder.") for k in state):
            raise CheckpointError(
                f"{where} is an official SAM checkpoint, not a trained DES-SAM: set "
                "MODEL.SAM.CHECKPOINT to it instead"
            )
        detector = checkpoint.pop("detector", None)
        incompatible = super()._load_model(checkpoint)
        if detector is not None and hasattr(self.model, "load_detector_state"):
            why = self.model.load_detector_state(detector)
            if why:
                raise CheckpointError(
                    f"{where} does not fit the model of this config ({why}): use the config "
                    "(MODEL.ANCHOR_GENERATOR and sizes) it was trained with"
                )
            if detector.get("score_threshold") is not None:
                logger.info(
                    f"box score threshold {detector['score_threshold']:.3f}, fitted on the "
                    f"training boxes, from {self._loading}"
                )
        problems = []
        wrong_shape = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = sorted(set(incompatible.missing_keys) - wrong_shape)
        if missing:
            problems.append(f"missing keys: {_first(missing)}")
        if incompatible.incorrect_shapes:
            shapes = [f"{k} {tuple(a)} vs {tuple(b)}" for k, a, b in incompatible.incorrect_shapes]
            problems.append(f"shape mismatch (file vs model): {_first(shapes)}")
        if problems:
            raise CheckpointError(
                f"{where} does not fit the model of this config ({'; '.join(problems)}): use the "
                "config (MODEL.SAM.VARIANT and sizes) it was trained with"
            )
        return incompatible


def load_model(cfg, weights: Optional[str]) -> torch.nn.Module:
    """Build the model of ``cfg`` and load ``weights`` (a trained DES-SAM checkpoint), strictly:
    a missing, truncated or other-config file is a one-line ``CheckpointError``. No ``weights``
    (``None`` or ``""``) keeps the built model's weights. The model is returned in eval mode."""
    from detectron2.modeling import build_model

    model = build_model(cfg)
    if weights:
        if not os.path.isfile(weights):
            raise InputNotFoundError(f"weights {weights} do not exist: pass a trained model_*.pth")
        DESSAMCheckpointer(model).load(weights)
    return model.eval()
