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

import hashlib
import json
import logging
import math
import os
import re
from collections import OrderedDict
from typing import List
from unittest import mock

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.common import DatasetFromList
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import DatasetEvaluator
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from .checkpointing import DESSAMCheckpointer, NonFiniteError
from .cli import hide_user_error_tracebacks
from .config import add_dessam_config
from .data import DESSAMDatasetMapper, EmptyDatasetError
from .data.samplers import ResumableTrainingSampler, SeededMapDataset, derived_seed
from .evaluation import build_nuclei_evaluators

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A config file or override that cannot be used."""


def load_config(config_file: str, opts: List[str] = ()) -> CfgNode:
    """Detectron2 config + DES-SAM keys + the file + overrides, with one-line errors."""
    cfg = get_cfg()
    add_dessam_config(cfg)
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file {config_file} does not exist: see configs/ for the models")
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except KeyError as e:
        key = str(e.args[0]) if e.args else str(e)
        raise ConfigError(f"{config_file}: {key}; see dessam_d2/config.py for the keys") from None
    except (ValueError, AssertionError) as e:
        raise ConfigError(f"{config_file}: {e}") from None
    return cfg


def num_training_images(cfg: CfgNode) -> int:
    return sum(len(DatasetCatalog.get(name)) for name in cfg.DATASETS.TRAIN)


def apply_epoch_schedule(cfg: CfgNode, num_images: int) -> None:
    """SOLVER.EPOCHS (the paper's unit) -> MAX_ITER, STEPS, checkpoint and eval periods."""
    if cfg.SOLVER.EPOCHS <= 0:
        return
    iters_per_epoch = max(1, math.ceil(num_images / cfg.SOLVER.IMS_PER_BATCH))
    cfg.SOLVER.MAX_ITER = cfg.SOLVER.EPOCHS * iters_per_epoch
    cfg.SOLVER.STEPS = tuple(
        e * iters_per_epoch for e in cfg.SOLVER.STEP_EPOCHS if e < cfg.SOLVER.EPOCHS
    )
    cfg.SOLVER.CHECKPOINT_PERIOD = max(1, cfg.SOLVER.CHECKPOINT_EPOCHS) * iters_per_epoch
    cfg.TEST.EVAL_PERIOD = cfg.TEST.EVAL_EPOCHS * iters_per_epoch
    cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.MAX_ITER)


def check_dataset_names(cfg: CfgNode, eval_only: bool = False) -> None:
    """Every name of DATASETS.TRAIN/TEST is registered (else Detectron2 raises a KeyError)."""
    if not cfg.DATASETS.TRAIN and not eval_only:
        raise ConfigError("DATASETS.TRAIN is empty: name at least one registered data set")
    for key in ("TRAIN", "TEST"):
        for name in cfg.DATASETS[key]:
            if name not in DatasetCatalog:
                raise ConfigError(
                    f"DATASETS.{key}: '{name}' is not a registered data set; see "
                    "dessam_d2/data/datasets.py (BUILTIN_DATASETS) or register your own COCO file"
                )
    score_thresholds_per_test_set(cfg)


def score_thresholds_per_test_set(cfg: CfgNode) -> List[float]:
    """The box score threshold of each DATASETS.TEST entry: DATASETS.TEST_SCORE_THRESH (one per
    test set, same order) or, when it is empty, MODEL.ROI_HEADS.SCORE_THRESH_TEST for all."""
    names = list(cfg.DATASETS.TEST)
    values = list(cfg.DATASETS.get("TEST_SCORE_THRESH", ()))
    if not values:
        return [float(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST)] * len(names)
    if len(values) != len(names):
        raise ConfigError(
            f"DATASETS.TEST_SCORE_THRESH has {len(values)} values for {len(names)} DATASETS.TEST "
            "entries: give one per test set, in the same order, or () to use "
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST for all"
        )
    if not all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in values):
        raise ConfigError(f"DATASETS.TEST_SCORE_THRESH {tuple(values)}: scores lie in [0, 1]")
    return [float(v) for v in values]


def set_deterministic(cfg: CfgNode) -> None:
    """Same seed, same machine and thread count -> bit-identical losses (also after a resume)."""
    if cfg.SEED < 0:
        raise ConfigError("--deterministic needs a fixed SEED (>= 0), e.g. append SEED 1")
    # cuBLAS needs this before its first call to be deterministic (ignored on the CPU).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def setup(args) -> CfgNode:
    """Config from the command line (``default_argument_parser``), frozen, with logging set up.

    ``args.deterministic`` (``--deterministic`` of tools/train_net.py) turns on deterministic
    algorithms: a little slower, and what exact resumes and repeatable runs need.
    """
    cfg = load_config(args.config_file, args.opts)
    check_dataset_names(cfg, eval_only=args.eval_only)
    if cfg.SOLVER.EPOCHS > 0 and not args.eval_only:
        apply_epoch_schedule(cfg, num_training_images(cfg))
    cfg.freeze()
    default_setup(cfg, args)
    # Detectron2 sets up its own loggers; ours (parameter counts, fingerprints, caches) too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dessam_d2")
    # A user error ends in one line on the console; log.txt keeps its traceback.
    hide_user_error_tracebacks(["detectron2", "fvcore", "dessam_d2"])
    if getattr(args, "deterministic", False):
        set_deterministic(cfg)
    return cfg


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter: equal on all ranks iff they hold the same model."""
    h = hashlib.sha1()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ModelFingerprintHook(HookBase):
    """Logs each rank's parameter fingerprint after training (to compare data-parallel ranks)."""

    def after_train(self):
        model = self.trainer.model
        model = getattr(model, "module", model)
        logger.info(f"rank {comm.get_rank()} final model fingerprint {model_fingerprint(model)}")


def _cpu_aware_ddp(model, **kwargs):
    # Detectron2 passes device_ids=[local_rank], which DistributedDataParallel rejects for a
    # CPU module; on the CPU (gloo) it must be None.
    if next(model.parameters()).device.type == "cpu":
        kwargs["device_ids"] = None
    # A trainable SAM decoder (demo only) has parameters whose gradient is skipped on purpose
    # (e.g. key biases that softmax cancels), so DDP must look for unused ones.
    kwargs["find_unused_parameters"] = not model.roi_heads.mask_head.freeze_decoder
    return _create_ddp_model(model, **kwargs)


_create_ddp_model = d2_defaults.create_ddp_model


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
        head = getattr(model, "module", model).roi_heads.mask_head
        tokens = head.learnable_tokens.detach()
        grad = head.learnable_tokens.grad
        self.trainer.storage.put_scalars(
            **{
                "token/norm": float(tokens.norm()),
                "token/change": float((tokens - head.learnable_tokens_init).norm()),
                "token/grad_norm": float(grad.norm()) if grad is not None else 0.0,
            },
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


def _non_finite_terms(message: str) -> List[str]:
    # Detectron2's message: "Loss became infinite or NaN at iteration=7!\nloss_dict = {'loss_cls':
    # np.float64(nan), ...}" (the losses averaged over ranks).
    return re.findall(r"'(\w+)': (?:np\.float64\()?-?(?:nan|inf)\b", message)


class Trainer(DefaultTrainer):
    """DefaultTrainer with DES-SAM's data mapper and the nuclei + COCO evaluators, atomic strict
    checkpoints and exact resumes (see the module doc)."""

    def __init__(self, cfg: CfgNode):
        with (
            mock.patch.object(d2_defaults, "create_ddp_model", _cpu_aware_ddp),
            mock.patch.object(d2_defaults, "DetectionCheckpointer", DESSAMCheckpointer),
        ):
            super().__init__(cfg)
        sampler = getattr(getattr(self.data_loader, "dataset", None), "sampler", None)
        if not isinstance(sampler, ResumableTrainingSampler):
            raise TypeError("build_train_loader must use a ResumableTrainingSampler")
        self.train_sampler = sampler

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
        if cfg.SOLVER.OPTIMIZER.upper() == "SGD":
            return super().build_optimizer(cfg, model)
        if cfg.SOLVER.OPTIMIZER.upper() != "ADAMW":
            raise ConfigError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r}: use 'SGD' or 'ADAMW'")
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        adamw = maybe_add_gradient_clipping(cfg, torch.optim.AdamW)
        return adamw(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)

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
        mapper = DESSAMDatasetMapper(cfg, is_train=True)
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
        (DATASETS.TEST_SCORE_THRESH, see ``score_thresholds_per_test_set``); the box predictor's
        threshold is restored afterwards. Periodic, final and ``--eval-only`` evaluations all
        come here."""
        thresholds = score_thresholds_per_test_set(cfg)
        names = list(cfg.DATASETS.TEST)
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} DATASETS.TEST entries")
        predictor = getattr(model, "module", model).roi_heads.box_predictor
        default = predictor.test_score_thresh
        results = OrderedDict()
        try:
            for i, (name, threshold) in enumerate(zip(names, thresholds)):
                one = cfg.clone()
                one.defrost()
                one.DATASETS.TEST = (name,)
                one.DATASETS.TEST_SCORE_THRESH = ()
                one.freeze()
                predictor.test_score_thresh = threshold
                logger.info(f"Evaluating {name} with box score threshold {threshold:g}")
                results[name] = super().test(
                    one, model, None if evaluators is None else [evaluators[i]]
                )
        finally:
            predictor.test_score_thresh = default
        return next(iter(results.values())) if len(results) == 1 else results

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        max_dets = max(cfg.TEST.DETECTIONS_PER_IMAGE, 100)
        return build_nuclei_evaluators(dataset_name, output_folder, max_dets_per_image=max_dets)

    def build_hooks(self):
        hooks = [ReseedHook(), TokenStatsHook()] + super().build_hooks()
        return hooks + [ModelFingerprintHook(), LossLogHook(self.cfg.OUTPUT_DIR)]
