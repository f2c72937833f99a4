#!/usr/bin/env python
"""Write the synthetic cervical cytology train/test splits (the demo's default data).

python tools/make_synthetic.py --output datasets/synthetic_cytology --num-train 48 --num-test 12
"""

import argparse
import os
import sys

from dessam_d2.cli import run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--output",
        default=None,
        help="folder for train/ and test/ (default: $DETECTRON2_DATASETS/synthetic_cytology)",
    )
    parser.add_argument("--num-train", type=int, default=48)
    parser.add_argument("--num-test", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0, help="the test split uses seed + 1")
    parser.add_argument("--image-size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"))
    parser.add_argument("--nuclei", type=int, nargs=2, default=(5, 20), metavar=("MIN", "MAX"))
    parser.add_argument("--radius", type=float, nargs=2, default=(6, 16), metavar=("MIN", "MAX"))
    args = parser.parse_args(argv)
    return run_cli(make, args)


def make(args) -> int:
    from dessam_d2.data.datasets import default_dataset_root  # after parsing: --help is instant
    from dessam_d2.data.synthetic.cytology import make_synthetic_cytology

    output = args.output or os.path.join(default_dataset_root(), "synthetic_cytology")
    written = make_synthetic_cytology(
        output,
        num_train=args.num_train,
        num_test=args.num_test,
        seed=args.seed,
        image_size=tuple(args.image_size),
        nuclei_per_image=tuple(args.nuclei),
        nucleus_radius=tuple(args.radius),
    )
    for split, path in written.items():
        print(f"{split}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
