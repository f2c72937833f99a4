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

import sys

from detectron2.engine import default_argument_parser, launch
from torch.multiprocessing import ProcessExitedException

from dessam_d2.checkpointing import DESSAMCheckpointer
from dessam_d2.cli import run_cli, tune_malloc
from dessam_d2.data.user_datasets import register_user_datasets, require_outlines
from dessam_d2.engine import Trainer, setup


def main(args):
    # here, not before launch: every worker process registers the names for itself
    user_datasets = register_user_datasets(args.dataset)
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


def cli_main(args):
    run_cli(main, args)


def parse_args(argv=None):
    parser = default_argument_parser()
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
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    tune_malloc()
    try:
        launch(
            cli_main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args,),
        )
    except ProcessExitedException as e:
        if e.exit_code is not None and e.exit_code > 0:
            sys.exit(e.exit_code)  # the rank printed its one-line error before exiting
        print(f"error: {e}", file=sys.stderr)  # e.g. a rank killed by a signal
        sys.exit(1)
