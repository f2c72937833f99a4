"""Training and evaluation: Detectron2's DefaultTrainer with DES-SAM's mapper and evaluators.

Reliability (what a long run on a shared machine needs):
    * resume: ``--resume`` continues from ``last_checkpoint`` at the next iteration with the same
      images, augmentations and random draws as an uninterrupted run (``ResumableTrainingSampler``,
      RNGs reseeded from (seed, rank, iteration) before every step, the seed kept in the
      checkpoint); with ``--deterministic`` on the CPU its losses are bit-identical;
    * checkpoints are written atomically and never of a model with NaN/inf parameters
      (``DESSAMCheckpointer``); a NaN/inf loss stops training with one line naming the iteration
      and the loss terms, before the optimizer step, so the last checkpoint stays good;
    * an unreadable training image stops training with one line naming the file (also from a
      DataLoader worker): a data set must be fixed, not silently changed, and a run resumed after
      the fix continues exactly (the converters already skip and count bad files);
    * ``losses.jsonl`` in OUTPUT_DIR logs every iteration's raw losses and lr (metrics.json holds
      medians every 20 iterations), appended on resume (the last line of an iteration counts).
"""

import logging
import os
import re
from collections import OrderedDict
from types import SimpleNamespace
from typing import List, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import (
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.common import DatasetFromList
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import DatasetEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import (
    apply_epoch_schedule,
    check_dataset_names,
    load_config,
    num_training_images,
    score_thresholds_per_test_set,
)
from ..data import datasets  # noqa: F401  (registers the built-in data sets)
from ..data.mapper import DESSAMDatasetMapper
from ..data.samplers import ResumableTrainingSampler, SeededMapDataset
from ..errors import ConfigError, EmptyDatasetError, NonFiniteError
from ..evaluation import build_nuclei_evaluators
from ..modeling.checkpointer import DESSAMCheckpointer
from ..utils.console import hide_user_error_tracebacks
from .anchors import fit_anchors_to_training_boxes
from .hooks import (
    LossLogHook,
    ModelFingerprintHook,
    ReseedHook,
    ScoreThresholdHook,
    TokenStatsHook,
)

__all__ = ["Trainer", "setup", "setup_run", "set_deterministic"]

logger = logging.getLogger(__name__)


def set_deterministic(cfg: CfgNode) -> None:
    """Same seed, same machine and thread count -> bit-identical losses (also after a resume)."""
    if cfg.SEED < 0:
        raise ConfigError("--deterministic needs a fixed SEED (>= 0), e.g. append SEED 1")
    # cuBLAS needs this before its first call to be deterministic (ignored on the CPU).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def setup_run(config_file: str, opts: Sequence[str] = (), eval_only: bool = False) -> CfgNode:
    """``setup`` for a run started from Python, not a command line (the napari plugin's Train):
    the same config, anchor fit, schedule and logging."""
    return setup(SimpleNamespace(config_file=config_file, opts=list(opts), eval_only=eval_only))


def setup(args) -> CfgNode:
    """Config from the command line (``default_argument_parser``), frozen, with logging set up.

    ``args.deterministic`` (``--deterministic`` of tools/train_net.py) turns on deterministic
    algorithms: a little slower, and what exact resumes and repeatable runs need.
    """
    cfg = load_config(args.config_file, args.opts)
    check_dataset_names(cfg, eval_only=args.eval_only)
    fitted = ""
    if not args.eval_only:
        if cfg.SOLVER.EPOCHS > 0:
            apply_epoch_schedule(cfg, num_training_images(cfg))
        if cfg.MODEL.ANCHOR_GENERATOR.FIT_TO_BOXES:
            fitted = fit_anchors_to_training_boxes(cfg)
    cfg.freeze()
    default_setup(cfg, args)  # writes OUTPUT_DIR/config.yaml: the fitted anchors are in it
    # Detectron2 sets up its own loggers; ours (parameter counts, fingerprints, caches) too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dessam_d2")
    if fitted:
        logger.info(fitted)
    # A user error ends in one line on the console; log.txt keeps its traceback.
    hide_user_error_tracebacks(["detectron2", "fvcore", "dessam_d2"])
    if getattr(args, "deterministic", False):
        set_deterministic(cfg)
    return cfg


def _cpu_aware_ddp(model, **kwargs):
    # Detectron2 passes device_ids=[local_rank], which DistributedDataParallel rejects for a
    # CPU module; on the CPU (gloo) it must be None.
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    # A trainable SAM decoder (demo only) has parameters whose gradient is skipped on purpose
    # (e.g. key biases that softmax cancels), so DDP must look for unused ones.
    # DES-SAM's decoder, when trained, skips its unused multimask outputs; other heads use all
    kwargs["find_unused_parameters"] = bool(getattr(model, "trainable_decoder", False))
    return _create_ddp_model(model, **kwargs)


_create_ddp_model = d2_defaults.create_ddp_model


def _non_finite_terms(message: str) -> List[str]:
    # Detectron2's message: "Loss became infinite or NaN at iteration=7!\nloss_dict = {'loss_cls':
    # np.float64(nan), ...}" (the losses averaged over ranks).
    return re.findall(r"'(\w+)': (?:np\.float64\()?-?(?:nan|inf)\b", message)


class Trainer(DefaultTrainer):
    """DefaultTrainer with DES-SAM's data mapper and the nuclei + COCO evaluators, atomic strict
    checkpoints and exact resumes (see the module doc)."""

    def __init__(self, cfg: CfgNode):
        # Detectron2 passes device_ids=[local_rank] to DistributedDataParallel, which rejects it
        # for a CPU model: DefaultTrainer.__init__ calls this module-level function directly, so
        # it is swapped for the duration of the call (world size 1 never reaches it).
        d2_defaults.create_ddp_model = _cpu_aware_ddp
        try:
            super().__init__(cfg)
        finally:
            d2_defaults.create_ddp_model = _create_ddp_model
        sampler = getattr(getattr(self.data_loader, "dataset", None), "sampler", None)
        if not isinstance(sampler, ResumableTrainingSampler):
            raise TypeError("build_train_loader must use a ResumableTrainingSampler")
        self.train_sampler = sampler
        model = getattr(self.model, "module", self.model)
        if hasattr(model, "train_dtype"):
            dtype = str(model.train_dtype()).replace("torch.", "")
            setting = cfg.MODEL.DESSAM.TRAIN_DTYPE
            logger.info(f"DESSAM trains in {dtype} (MODEL.DESSAM.TRAIN_DTYPE {setting})")

    @property
    def seed(self) -> int:
        """The seed of the data stream and of every step: SEED, or drawn once and checkpointed."""
        return self.train_sampler.seed

    def state_dict(self):
        return {**super().state_dict(), "seed": self.seed}

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "seed" in state_dict:
            self.train_sampler.seed = state_dict["seed"]

    def resume_or_load(self, resume: bool = True):
        if comm.is_main_process():
            self.checkpointer.remove_stale_temp_files()
        super().resume_or_load(resume=resume)
        # The data loader's iterator (and its workers) is created at the first step, after this.
        self.train_sampler.start_iter = self.start_iter

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            if isinstance(e, NonFiniteError):
                raise
            terms = _non_finite_terms(str(e)) or ["total_loss"]
            last = (
                self.checkpointer.get_checkpoint_file()
                if self.checkpointer.has_checkpoint()
                else "none"
            )
            raise NonFiniteError(
                f"training stopped at iteration {self.iter}: non-finite {', '.join(terms)} "
                f"(nothing saved for this iteration; last checkpoint: {last}); lower "
                "SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS, then --resume"
            ) from None

    @classmethod
    def build_model(cls, cfg: CfgNode):
        model = super().build_model(cfg)
        if comm.get_world_size() > 1:
            # Ranks are seeded differently and DDP syncs parameters, not buffers: without a
            # checkpoint, SAM's random positional-encoding buffer would differ between ranks.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        return model

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module):
        """Detectron2's SGD (its parameter groups, momentum, clipping) or AdamW; trainable SAM
        parts get BASE_LR x SOLVER.SAM_LR_FACTOR."""
        kind = cfg.SOLVER.OPTIMIZER.upper()
        if kind not in ("SGD", "ADAMW"):
            raise ConfigError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use 'SGD' or 'ADAMW'")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        factor = cfg.SOLVER.SAM_LR_FACTOR
        parts = getattr(model, "module", model)
        if factor != 1.0 and hasattr(parts, "sam_parts"):
            sam = {id(p) for part in parts.sam_parts().values() for p in part.parameters()}
            split = []  # Detectron2 merges parameters of equal settings into one group
            for group in params:
                mine = [p for p in group["params"] if id(p) in sam]
                rest = [p for p in group["params"] if id(p) not in sam]
                if rest:
                    split.append({**group, "params": rest})
                if mine:
                    lr = group.get("lr", cfg.SOLVER.BASE_LR) * factor
                    split.append({**group, "params": mine, "lr": lr})
            params = split
        if kind == "SGD":
            sgd = maybe_add_gradient_clipping(cfg, torch.optim.SGD)
            return sgd(
                params,
                lr=cfg.SOLVER.BASE_LR,
                momentum=cfg.SOLVER.MOMENTUM,
                nesterov=cfg.SOLVER.NESTEROV,
                weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                foreach=True,  # as Detectron2's build_optimizer
            )
        adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return adamw(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

    @classmethod
    def build_train_mapper(cls, cfg: CfgNode):
        """Dataset dict -> training input: boxes only (DES-SAM never reads a mask in training)."""
        return DESSAMDatasetMapper(cfg, is_train=True)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        """Detectron2's train loader over a ``ResumableTrainingSampler`` (see data/samplers.py)."""
        if cfg.DATALOADER.SAMPLER_TRAIN != "TrainingSampler":
            raise ConfigError(
                f"DATALOADER.SAMPLER_TRAIN={cfg.DATALOADER.SAMPLER_TRAIN!r}: DES-SAM trains with "
                "'TrainingSampler' (a stream that --resume continues exactly)"
            )
        try:
            dicts = get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
        except AssertionError as e:  # e.g. every image filtered out as having no annotation
            raise EmptyDatasetError(f"DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)}: {e}") from None
        mapper = cls.build_train_mapper(cfg)
        dataset = SeededMapDataset(DatasetFromList(dicts, copy=False), mapper)
        world_size = comm.get_world_size()
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        sampler = ResumableTrainingSampler(
            len(dataset), cfg.SOLVER.IMS_PER_BATCH // world_size, seed=seed
        )
        return build_detection_train_loader(
            dataset=dataset,
            mapper=None,
            sampler=sampler,
            total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
            aspect_ratio_grouping=False,
            num_workers=cfg.DATALOADER.NUM_WORKERS,
            seed=seed,
        )

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = DESSAMDatasetMapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None):
        """DefaultTrainer.test one test set at a time, each with its own box score threshold
        (DATASETS.TEST_SCORE_THRESH, see ``score_thresholds_per_test_set``; without it, the
        threshold fitted after training when the model has one), set through the
        model's ``set_score_threshold`` and restored afterwards. Periodic, final and
        ``--eval-only`` evaluations all come here."""
        detector = getattr(model, "module", model)  # DistributedDataParallel's model
        thresholds = score_thresholds_per_test_set(cfg)
        fitted = getattr(detector, "fitted_score_threshold", None)
        if fitted is not None and not cfg.DATASETS.TEST_SCORE_THRESH:
            thresholds = [fitted] * len(thresholds)  # the one saved with the model
        names = list(cfg.DATASETS.TEST)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(names):
            raise ConfigError(
                f"{len(evaluators)} evaluators for {len(names)} DATASETS.TEST entries"
            )
        results = OrderedDict()
        for i, (name, threshold) in enumerate(zip(names, thresholds)):
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            one.DATASETS.TEST_SCORE_THRESH = ()
            one.freeze()
            default = detector.set_score_threshold(threshold)
            try:
                logger.info(f"Evaluating {name} with box score threshold {threshold:g}")
                results[name] = super().test(
                    one, model, None if evaluators is None else [evaluators[i]]
                )
            finally:
                detector.set_score_threshold(default)
        return next(iter(results.values())) if len(results) == 1 else results

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        max_dets = max(cfg.TEST.DETECTIONS_PER_IMAGE, 100)
        return build_nuclei_evaluators(dataset_name, output_folder, max_dets_per_image=max_dets)

    def model_hooks(self):
        """Hooks that read the DES-SAM model: the prompt tokens' statistics."""
        return [TokenStatsHook()]

    def build_hooks(self):
        # DefaultTrainer.__init__ builds a DetectionCheckpointer, then calls build_hooks (whose
        # PeriodicCheckpointer saves through it): swap in the atomic, strict one first.
        d2 = self.checkpointer
        self.checkpointer = DESSAMCheckpointer(
            d2.model, d2.save_dir, save_to_disk=d2.save_to_disk, **d2.checkpointables
        )
        self.score_threshold_hook = ScoreThresholdHook(self.cfg)
        # The threshold is fitted at the last step, before the final evaluation and checkpoint.
        hooks = [ReseedHook()] + self.model_hooks() + [self.score_threshold_hook]
        hooks += super().build_hooks()
        return hooks + [ModelFingerprintHook(), LossLogHook(self.cfg.OUTPUT_DIR)]
