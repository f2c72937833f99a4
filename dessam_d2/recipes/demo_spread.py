"""The demo over several seeds and thread counts: mean, std and the worst run.

Float sums differ between CPUs, and between thread counts on one CPU: a demo result that holds
for one seed on one machine is not a result. Each run is ``tools/demo.py`` in its own process and
output folder (``<output>/seed<S>_threads<T>/``, its console in ``demo_console.txt``); finished
runs (with ``demo_results.json``) are reused. ``tools/demo_spread.py`` parses, calls, prints.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, Tuple

import numpy as np
from tabulate import tabulate

from .demo import COLUMNS, HEADERS, ensure_synthetic_data

__all__ = ["SpreadResult", "run_spread", "spread_report"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO_TOOL = "tools/demo.py"


def _silent(message: str) -> None:
    pass


@dataclass(frozen=True)
class SpreadResult:
    report: str  # Markdown, also written to <output>/spread.md
    runs: Tuple[str, ...]  # every run's folder
    failed: Tuple[str, ...]  # the folders of runs that stopped with an error


def run_spread(
    seeds: Sequence[int],
    threads: Sequence[int],
    output: str = "output/demo_spread",
    opts: Sequence[str] = (),
    parallel: int = 1,
    progress: Callable[[str], None] = _silent,
) -> SpreadResult:
    """Run the demo once per seed and thread count (``parallel`` at once), then tabulate the
    spread of every finished run (``spread_report``); ``progress`` gets each run's command."""
    ensure_synthetic_data(progress=progress)  # once, before runs start in parallel
    runs, pending = [], []
    for seed in seeds:
        for n in threads:
            out = os.path.join(output, f"seed{seed}_threads{n}")
            runs.append(out)
            if not os.path.isfile(os.path.join(out, "demo_results.json")):
                env = {**os.environ, "OMP_NUM_THREADS": str(n)}
                args = ["SEED", str(seed), "OUTPUT_DIR", out] + list(opts)
                pending.append((args, env, out))
    active, failed = [], []
    while pending or active:
        while pending and len(active) < parallel:
            args, env, out = pending.pop(0)
            os.makedirs(out, exist_ok=True)
            log = open(os.path.join(out, "demo_console.txt"), "w")
            threads_env = env["OMP_NUM_THREADS"]
            progress(f"[spread] {' '.join([DEMO_TOOL] + args)} (OMP_NUM_THREADS={threads_env})")
            cmd = [sys.executable, os.path.join(REPO_ROOT, DEMO_TOOL)] + args
            active.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=log), log, out))
        proc, log, out = active.pop(0)
        if proc.wait() != 0:
            failed.append(out)
        log.close()
    report = spread_report(runs)
    with open(os.path.join(output, "spread.md"), "w") as f:
        f.write(report)
    return SpreadResult(report, tuple(runs), tuple(failed))


def spread_report(run_dirs: Sequence[str]) -> str:
    """Markdown: per test set and row, mean ± std over the runs' demo_results.json, the worst
    run's DES-SAM AJI and the list of runs."""

    results = []
    for d in run_dirs:
        path = os.path.join(d, "demo_results.json")
        if os.path.isfile(path):
            with open(path) as f:
                results.append(json.load(f))
    if not results:
        return "no finished run\n"
    lines = [
        f"{len(results)} runs: "
        + ", ".join(f"seed {r['seed']} x {r['threads']} thread(s)" for r in results)
    ]
    headers = ["model"] + HEADERS
    for name in results[0]["tables"]:
        body = []
        for row in results[0]["tables"][name]:
            vals = np.array(
                [
                    [r["tables"][name][row].get(t, {}).get(k, np.nan) for t, k in COLUMNS]
                    for r in results
                ]
            )
            body.append(
                [row]
                + [
                    f"{m:.2f} ± {s:.2f}" if np.isfinite(m) else ""
                    for m, s in zip(vals.mean(0), vals.std(0))
                ]
            )
        lines += ["", f"**{name}** (mean ± std over the runs)", ""]
        lines.append(tabulate(body, headers=headers, tablefmt="github"))
        if "DES-SAM" in results[0]["tables"][name]:
            aji = [r["tables"][name]["DES-SAM"]["nuclei"]["AJI"] for r in results]
            worst = results[int(np.argmin(aji))]
            lines.append(
                f"\nworst DES-SAM run: seed {worst['seed']} x {worst['threads']} thread(s), "
                + ", ".join(
                    f"{h} {worst['tables'][name]['DES-SAM'][t][k]:.2f}"
                    for (t, k), h in zip(COLUMNS, HEADERS)
                    if k in worst["tables"][name]["DES-SAM"].get(t, {})
                )
                + f"; mean AJI {np.mean(aji):.2f}, worst - mean {min(aji) - np.mean(aji):+.2f}"
            )
    return "\n".join(lines) + "\n"
