#!/usr/bin/env python
"""Train or evaluate DES-SAM with Detectron2 (single process, multi-GPU or multi-machine).

python tools/train_net.py --config-file configs/dessam_clusterseg.yaml
python tools/train_net.py --config-file configs/dessam_clusterseg.yaml --num-gpus 2
python tools/train_net.py --config-file ... --eval-only MODEL.WEIGHTS output/model_final.pth
"""

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, launch

from dessam_d2.cli import run_cli
from dessam_d2.engine import Trainer, setup


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return Trainer.test(cfg, model)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli_main(args):
    run_cli(main, args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    launch(
        cli_main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
