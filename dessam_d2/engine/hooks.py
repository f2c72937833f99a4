"""Training hooks: reseeding every step, prompt-token statistics, the per-iteration loss log, the
model fingerprint of each rank, and the box score threshold fitted at the end of training."""

import json
import logging
import os

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng

from ..data.samplers import derived_seed
from ..utils.hashing import module_fingerprint

__all__ = [
    "ReseedHook",
    "TokenStatsHook",
    "LossLogHook",
    "ModelFingerprintHook",
    "ScoreThresholdHook",
]

logger = logging.getLogger(__name__)


class ModelFingerprintHook(HookBase):
    """Logs each rank's parameter fingerprint after training (to compare data-parallel ranks)."""

    def after_train(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        logger.info(f"rank {comm.get_rank()} final model fingerprint {module_fingerprint(model)}")


class ReseedHook(HookBase):
    """Seeds python/numpy/torch from (seed, rank, iteration) before every step: a step's random
    draws (RPN and RoI sampling, ...) do not depend on what ran before it, e.g. an evaluation or
    the steps a resumed run skipped."""

    def before_step(self):
        seed = derived_seed(self.trainer.seed, comm.get_rank(), self.trainer.iter)
        seed_all_rng(seed)


class TokenStatsHook(HookBase):
    """Puts how the learnable prompt tokens T~ evolve into the event storage (metrics.json,
    TensorBoard) every iteration: ``token/norm`` (||T~||), ``token/change`` (||T~ - T~_0||, T~_0
    its initial value) and ``token/grad_norm`` (the last backward pass's gradient; it stays in
    ``.grad`` until the next step zeroes it)."""

    def after_step(self):
        model = self.trainer.model
        stats = getattr(model, "module", model).token_stats()  # the DDP-wrapped model's own
        self.trainer.storage.put_scalars(
            **{f"token/{k}": stats[k] for k in ("norm", "change", "grad_norm")},
            smoothing_hint=False,
        )


class LossLogHook(HookBase):
    """Appends {"iteration", "lr", "total_loss", "loss_*"} of every iteration, unsmoothed, to
    ``losses.jsonl`` (main process)."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, "losses.jsonl")
        self._file = None

    def before_train(self):
        if comm.is_main_process():
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._file = open(self.path, "a")
            if self._file.tell() > 0:
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a line cut by a kill: end it
                        self._file.write("\n")

    def after_step(self):
        if self._file is None:
            return
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        entry = {"iteration": it}
        for name, (value, at) in sorted(latest.items()):
            if at == it and (name.startswith("loss") or name in ("total_loss", "lr")):
                entry[name] = value
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def after_train(self):
        if self._file is not None:
            self._file.close()
            self._file = None


class ScoreThresholdHook(HookBase):
    """After the last step, before the final checkpoint and evaluation: the detector's box
    precision and recall on the training boxes (``score_threshold.fit_score_threshold``),
    logged with a warning when the recall is low; with TEST.SCORE_THRESH_AUTO the threshold of
    best F1 becomes the model's (saved in model_final.pth, used by every later evaluation and
    prediction). Every rank computes the same fit on the same images (the weights are equal)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.fit = None

    def after_step(self):
        if self.trainer.iter != self.trainer.max_iter - 1:
            return
        from .score_threshold import fit_score_threshold, report_fit, training_records

        model = getattr(self.trainer.model, "module", self.trainer.model)
        self.fit = fit_score_threshold(self.cfg, model, training_records(self.cfg))
        auto = bool(self.cfg.TEST.SCORE_THRESH_AUTO)
        if auto:
            model.set_fitted_score_threshold(self.fit.threshold)
        report_fit(self.fit, auto, self.cfg.OUTPUT_DIR if comm.is_main_process() else "")
