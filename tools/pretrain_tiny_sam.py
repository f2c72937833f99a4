#!/usr/bin/env python
"""Pretrain the demo's tiny SAM on synthetic scenes (box prompts, full mask supervision).

Writes an official-format SAM checkpoint (the shipped one is weights/tiny_sam_shapes.pth) and a
JSON log beside it (losses, held-out mask IoU before/after, settings). Seeded: the same command
on the same machine and thread count gives the same file. Resumable: an interrupted run
continues from OUTPUT.state when the same command is run again.

    python tools/pretrain_tiny_sam.py [--output weights/tiny_sam_shapes.pth] [--iterations 1500]
"""

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/dessam_demo.yaml", help="SAM shapes")
    p.add_argument("--output", default="weights/tiny_sam_shapes.pth")
    p.add_argument("--iterations", type=int, default=1500)
    p.add_argument("--batch", type=int, default=2, help="scenes per iteration")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init", default="", help="continue from this checkpoint (a second phase)")
    p.add_argument("--first-scene", type=int, default=0, help="index of the first scene")
    p.add_argument("--objects", type=int, nargs=2, default=[4, 14], help="objects per scene")
    p.add_argument("--stop-after", type=int, default=0, help="stop after N iterations")
    p.add_argument("--max-boxes", type=int, default=8, help="prompts per scene")
    p.add_argument("--jitter", type=float, default=0.05, help="box noise, x the box side")
    p.add_argument("--warmup", type=int, default=200, help="warm-up iterations")
    p.add_argument("--alike", type=float, default=0.0, help="share of look-alike scenes")
    p.add_argument("--pe-scale", type=float, default=1.0, help="x SAM's position frequencies")
    p.add_argument("--eval-every", type=int, default=0, help="held-out IoU every N iterations")
    p.add_argument(
        "--no-tie-keys", action="store_true", help="random key projections in the decoder"
    )
    args = p.parse_args()

    import logging
    import sys

    import torch

    from dessam_d2.cli import run_cli
    from dessam_d2.config import load_config
    from dessam_d2.recipes.pretrain_tiny_sam import pretrain_tiny_sam, write_pretraining_log

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = run_cli(load_config, args.config_file, ["MODEL.SAM.CHECKPOINT", ""])
    log = run_cli(
        pretrain_tiny_sam,
        cfg,
        args.output,
        args.iterations,
        args.batch,
        args.lr,
        seed=args.seed,
        init=args.init,
        first_scene=args.first_scene,
        num_objects=tuple(args.objects),
        stop_after=args.stop_after,
        max_boxes=args.max_boxes,
        jitter=args.jitter,
        warmup=args.warmup,
        eval_every=args.eval_every,
        tie_keys=not args.no_tie_keys,
        alike=args.alike,
        pe_scale=args.pe_scale,
    )
    log.update(config=args.config_file, threads=args.threads, torch=torch.__version__)
    log["command"] = " ".join(sys.argv)
    write_pretraining_log(log, args.output)
    print(
        f"wrote {args.output}: held-out mask IoU {log['held_out_iou_before']:.3f} -> "
        f"{log['held_out_iou_after']:.3f}"
    )


if __name__ == "__main__":
    main()
