"""A short DES-SAM training on exported box sets, in the calling process: the napari plugin's
Train (the human-in-the-loop round: correct boxes, retrain, predict again).

It is ``tools/train_net.py --config-file CONFIG --dataset set_1=<set>/annotations.json ...
DATASETS.TRAIN (set_1, ...) DATASETS.TEST ()`` (``data/export.py`` writes such sets): the same
registration, anchor fit and threshold fit of a user's own boxes, the same Trainer. Only boxes
are read. ``on_step(step, total)`` is called after every step, and ``should_stop()`` ends the
run after the current step (``TrainingStopped``; no final weights are written).
"""

import hashlib
import os
from typing import Callable, Sequence

from detectron2.engine import HookBase

from ..errors import UsageError, UserError

__all__ = ["DEMO_CONFIG", "TrainingStopped", "train_on_box_sets"]

DEMO_CONFIG = "configs/dessam_demo.yaml"


class TrainingStopped(UserError):
    """The user stopped a training before its last step."""


class _StepHook(HookBase):
    def __init__(self, on_step: Callable[[int, int], None], should_stop: Callable[[], bool]):
        self.on_step, self.should_stop = on_step, should_stop

    def after_step(self):
        step, total = self.trainer.iter + 1, self.trainer.max_iter
        self.on_step(step, total)
        if step < total and self.should_stop():
            raise TrainingStopped(f"training stopped at step {step} of {total}: nothing saved")


def set_names(json_files: Sequence[str]):
    """A data set name per exported set, the same for the same file (``--dataset`` specs)."""
    specs, names = [], []
    for path in json_files:
        path = os.path.abspath(path)
        name = "box_set_" + hashlib.sha1(path.encode()).hexdigest()[:10]
        specs.append(f"{name}={path}:{os.path.dirname(path)}")
        names.append(name)
    return specs, names


def train_on_box_sets(
    json_files: Sequence[str],
    output_dir: str,
    config_file: str = DEMO_CONFIG,
    opts: Sequence = (),
    on_step: Callable[[int, int], None] = lambda step, total: None,
    should_stop: Callable[[], bool] = lambda: False,
) -> str:
    """Train DES-SAM of ``config_file`` (the demo's config and schedule by default; ``opts``
    override) on the COCO box sets ``json_files`` into ``output_dir``; returns the path of
    ``model_final.pth`` (its config: ``output_dir/config.yaml``)."""
    from ..config import user_dataset_options
    from ..data.converters.user_datasets import register_user_datasets
    from ..engine import Trainer
    from ..engine.trainer import setup_run

    if not json_files:
        raise UsageError("no box set to train on: export at least one image with its boxes")
    specs, names = set_names(json_files)
    register_user_datasets(specs)
    opts = user_dataset_options(
        [str(o) for o in opts]
        + ["DATASETS.TRAIN", str(tuple(names)), "DATASETS.TEST", "()", "OUTPUT_DIR", output_dir]
        # the loader's worker processes would fork a GUI's process: load in this thread
        + ["DATALOADER.NUM_WORKERS", "0"]
    )
    cfg = setup_run(config_file, opts)
    trainer = Trainer(cfg)
    trainer.register_hooks([_StepHook(on_step, should_stop)])
    trainer.resume_or_load(resume=False)
    trainer.train()
    weights = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    if not os.path.isfile(weights):
        raise RuntimeError(f"training ended without {weights}")
    return weights
