#!/usr/bin/env python
"""Train or evaluate DES-SAM with Detectron2 (single process, multi-GPU or multi-machine).

python tools/train_net.py --config-file configs/dessam_clusterseg.yaml
python tools/train_net.py --config-file configs/dessam_clusterseg.yaml --num-gpus 2
python tools/train_net.py --config-file ... --resume          # after an interruption
python tools/train_net.py --config-file ... --deterministic SEED 1   # repeatable losses
python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
# your own COCO box files (CVAT, Label Studio, tools/import_qupath.py), by name:
python tools/train_net.py --config-file configs/dessam_clusterseg.yaml \
    --dataset my_train=boxes.json:images/ --dataset my_test=test.json:images/ \
    DATASETS.TRAIN '("my_train",)' DATASETS.TEST '("my_test",)'
"""

import argparse
import sys

from dessam_d2.cli import add_launch_arguments, launch_cli


def main(args):
    # Imported here, after parsing: --help and usage errors need no torch.
    from dessam_d2.config import user_dataset_options
    from dessam_d2.data.converters.user_datasets import register_user_datasets, require_outlines
    from dessam_d2.engine import Trainer, setup
    from dessam_d2.modeling.checkpointer import DESSAMCheckpointer

    # here, not before launch: every worker process registers the names for itself
    user_datasets = register_user_datasets(args.dataset)
    if args.dataset:  # a lab's own boxes: anchors and score threshold fitted to them
        args.opts = user_dataset_options(args.opts)
    cfg = setup(args)
    require_outlines(cfg.DATASETS.TEST, user_datasets)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DESSAMCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", default="", metavar="FILE", help="path to config file")
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT_DIR/last_checkpoint"
    )
    parser.add_argument("--eval-only", action="store_true", help="evaluate MODEL.WEIGHTS only")
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms (needs SEED >= 0): repeatable losses, exact resumes",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON[:IMAGE_ROOT]",
        help="register a COCO file (boxes; CVAT, Label Studio or tools/import_qupath.py) under "
        "NAME for DATASETS.TRAIN / DATASETS.TEST; images are relative to IMAGE_ROOT (default: "
        "the JSON's folder); repeatable",
    )
    add_launch_arguments(parser)
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...", default=None
    )
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(launch_cli(main, parse_args()))
