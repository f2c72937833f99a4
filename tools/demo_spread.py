#!/usr/bin/env python
"""Run the demo for several seeds and thread counts; report mean, std and the worst run.

Float sums differ between CPUs, and between thread counts on one CPU: a demo result that holds
for one seed on one machine is not a result. Each run is `tools/demo.py` in its own process and
output folder (output/demo_spread/seed<S>_threads<T>/); finished runs are reused.

    python tools/demo_spread.py [--seeds 1 2 3 4 5] [--threads 1 2] [--parallel 2]
"""

import argparse
import os
import subprocess
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
    from dessam_d2.recipes.demo import ensure_synthetic_data, spread_report

    ensure_synthetic_data()  # once, before runs start in parallel
    runs, pending = [], []
    for seed in args.seeds:
        for threads in args.threads:
            out = os.path.join(args.output, f"seed{seed}_threads{threads}")
            runs.append(out)
            if not os.path.isfile(os.path.join(out, "demo_results.json")):
                env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
                cmd = [sys.executable, "tools/demo.py", "SEED", str(seed), "OUTPUT_DIR", out]
                pending.append((cmd + list(args.opts), env, out))
    active = []
    while pending or active:
        while pending and len(active) < args.parallel:
            cmd, env, out = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "demo_console.txt"), "w")
            print(f"[spread] {' '.join(cmd[1:])} (OMP_NUM_THREADS={env['OMP_NUM_THREADS']})")
            active.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), out))
        proc, out = active.pop(0)
        if proc.wait() != 0:
            print(f"[spread] run failed: see {out}/demo_console.txt", file=sys.stderr)
    report = spread_report(runs)
    with open(os.path.join(args.output, "spread.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
