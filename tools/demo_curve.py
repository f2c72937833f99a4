#!/usr/bin/env python
"""Pick the demo's schedule by a curve: DES-SAM trained for several lengths (each with its own
step decay), box AP / precision / recall and AJI on both held-out sets; a table, a JSON and a
picture. Finished lengths are reused (an interrupted curve resumes).

    python tools/demo_curve.py [--iterations 100 200 300 400 600] [--output output/demo_curve]
        [--picture docs/demo_curve.png] [KEY VALUE ...]
"""

import argparse


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iterations", type=int, nargs="+", default=[100, 200, 300, 400, 600])
    p.add_argument("--config-file", default="configs/dessam_demo.yaml")
    p.add_argument("--output", default="output/demo_curve")
    p.add_argument("--picture", default="", help="PNG (default: <output>/demo_curve.png)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()

    import dessam_d2.cli  # noqa: F401  (first: silences fvcore's torch.jit warning)
    from dessam_d2.recipes.demo_curve import curve_picture, curve_table, run_curve

    points = run_curve(args.iterations, args.output, args.config_file, args.opts, print)
    print(curve_table(points))
    print(curve_picture(points, args.picture or f"{args.output}/demo_curve.png"))


if __name__ == "__main__":
    main()
