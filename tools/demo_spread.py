#!/usr/bin/env python
"""Run the demo for several seeds and thread counts; report mean, std and the worst run.

Float sums differ between CPUs, and between thread counts on one CPU: a demo result that holds
for one seed on one machine is not a result. Each run is `tools/demo.py` in its own process and
output folder (output/demo_spread/seed<S>_threads<T>/); finished runs are reused.

    python tools/demo_spread.py [--seeds 1 2 3 4 5] [--threads 1 2] [--parallel 2]
"""

import argparse
import sys


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--parallel", type=int, default=1, help="runs at once")
    p.add_argument("--output", default="output/demo_spread")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args()

    import dessam_d2.cli  # noqa: F401  (first: silences fvcore's torch.jit warning)
    from dessam_d2.recipes.demo_spread import run_spread

    result = run_spread(
        args.seeds, args.threads, args.output, args.opts, parallel=args.parallel, progress=print
    )
    for out in result.failed:
        print(f"[spread] run failed: see {out}/demo_console.txt", file=sys.stderr)
    print(result.report)


if __name__ == "__main__":
    main()
