"""Training and evaluation: Detectron2's DefaultTrainer with DES-SAM's mapper and evaluators."""

import hashlib
import logging
import math
import os
from typing import List
from unittest import mock

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    DatasetCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
)
from detectron2.engine import DefaultTrainer, HookBase, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import add_dessam_config
from .data import DESSAMDatasetMapper
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


def setup(args) -> CfgNode:
    """Config from the command line (``default_argument_parser``), frozen, with logging set up."""
    cfg = load_config(args.config_file, args.opts)
    if cfg.SOLVER.EPOCHS > 0 and not args.eval_only:
        apply_epoch_schedule(cfg, num_training_images(cfg))
    cfg.freeze()
    default_setup(cfg, args)
    # Detectron2 sets up its own loggers; ours (parameter counts, fingerprints, caches) too.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="dessam_d2")
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


class Trainer(DefaultTrainer):
    """DefaultTrainer with DES-SAM's data mapper and the nuclei + COCO evaluators."""

    def __init__(self, cfg: CfgNode):
        with mock.patch.object(d2_defaults, "create_ddp_model", _cpu_aware_ddp):
            super().__init__(cfg)

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
        return build_detection_train_loader(cfg, mapper=DESSAMDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = DESSAMDatasetMapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        max_dets = max(cfg.TEST.DETECTIONS_PER_IMAGE, 100)
        return build_nuclei_evaluators(dataset_name, output_folder, max_dets_per_image=max_dets)

    def build_hooks(self):
        return super().build_hooks() + [ModelFingerprintHook()]
