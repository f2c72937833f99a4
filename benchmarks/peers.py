"""CPU cost of the tools users would pick instead of DES-SAM, on the same input, same threads,
from the repository root:

    bash scripts/setup_peers_env.sh      # once: the peers' own venv, .venv-peers (~7 GB)
    python -m benchmarks.peers --peers-venv .venv-peers --threads 2 --repeats 3
    python -m benchmarks.peers --only sam_predictor_100 cellpose_sam

Peers, all ViT-based, all with random weights (no checkpoint can be downloaded here; the cost of a
forward pass does not depend on the weights, that of the post-processing somewhat does):

- ``sam_predictor_100`` / ``_500``: segment-anything's ``SamPredictor`` (ViT-B): ``set_image``,
  then ``predict_torch`` on the nuclei's boxes in batches of 100, one mask each. Parts: encoder,
  decoder. ``sam_predictor_100_bf16``: the same 100 boxes with both steps under bfloat16
  autocast, DES-SAM's fast precision (its pair for the same-precision ratio).
- ``microsam_ais``: micro-sam's automatic instance segmentation (ViT-B SAM + UNETR decoder,
  ``segmentation_mode="ais"``). Parts: encoder, decoder (UNETR), postprocess (watershed).
- ``cellpose_sam``: Cellpose 4 (Cellpose-SAM, ViT-L) through ``CellposeModel`` (bfloat16 weights,
  its default) and ``model.eval(image)`` with defaults. Parts: network, masks (flow dynamics).
  ``cellpose_sam_fp32``: the same with ``use_bfloat16=False``. On a CPU without native bfloat16
  (no avx512_bf16/AMX) torch's bfloat16 matmul is ~50-200x slower than float32, so
  ``cellpose_sam`` then takes hours per image and only the float32 figure is usable.

Inputs come from ``benchmarks.measure.synthetic_input`` (1024^2, seed 0), the benchmark's own: the
image with 100 nuclei and their 100 boxes, and the image with 500 nuclei and their 500 boxes. The
automatic peers (no boxes) segment the 100-nuclei image, the one ``sam_predictor_100`` gets.

This driver runs in the main venv; each peer runs in a fresh process of the peers' venv
(benchmarks/peers_worker.py, which imports only numpy, torch and that peer), one warm-up run then
``--repeats`` timed runs; the figures are the median, min and max seconds per image and the
process's peak RSS (``ru_maxrss``, model building included). Workers get ``OMP_NUM_THREADS`` and
``torch.set_num_threads`` set to ``--threads`` and, unless ``--default-malloc``, the same glibc
malloc tuning as DES-SAM's tools. Prints a table and, as its last line, one JSON object (seconds
and GB per peer, null for a peer that failed, whose row says why; the exit code is then 1).
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import peers_worker
from benchmarks.peers_worker import NUCLEI, PARTS, PEERS

WORKER = os.path.abspath(peers_worker.__file__)
REFERENCE = "sam_predictor_100"
SETUP_HINT = "bash scripts/setup_peers_env.sh"
# Keeps every peer from reaching a model hub: a download attempt fails instead of hanging.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MPLBACKEND": "Agg",
    "QT_QPA_PLATFORM": "offscreen",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers-venv", default=".venv-peers", help="venv made by " + SETUP_HINT)
    p.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads per peer")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per peer (after a warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per peer before those")
    p.add_argument("--only", nargs="+", choices=PEERS, metavar="NAME", help="run these peers only")
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="glibc's default allocator in the workers (default: DES-SAM's malloc tuning)",
    )
    p.add_argument("--timeout", type=float, default=3600, help="seconds per peer before giving up")
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--threads and --repeats must be at least 1, --warmup at least 0")
    return args


def make_inputs(out_dir: str, size: int = 1024, seed: int = 0) -> dict:
    """Saves image_N.npy (uint8 HWC RGB) and boxes_N.npy (float32 XYXY pixels) for N in NUCLEI."""
    import numpy as np
    import torch

    from benchmarks.measure import synthetic_input

    paths = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # its many small ops: faster on one thread, and the same result
    try:
        inputs = [(n, synthetic_input(n, size=size, seed=seed)) for n in NUCLEI]
    finally:
        torch.set_num_threads(threads)
    for n, inp in inputs:
        # the mapper's CHW tensor in the config's INPUT.FORMAT, RGB
        image = inp["image"].permute(1, 2, 0).contiguous().numpy().astype(np.uint8)
        boxes = inp["instances"].gt_boxes.tensor.numpy().astype(np.float32)
        for kind, arr in (("image", image), ("boxes", boxes)):
            paths[f"{kind}_{n}"] = os.path.join(out_dir, f"{kind}_{n}.npy")
            np.save(paths[f"{kind}_{n}"], arr)
    return paths


def cpu_info() -> dict:
    model, flags = "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown":
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {
        "model": model,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": any(f.startswith("amx") for f in flags),
    }


def worker_env(threads: int, default_malloc: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OFFLINE_ENV)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        env[var] = str(threads)
    for var in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(var, None)
    if not default_malloc:
        from dessam_d2.utils.malloc import GLIBC_MALLOC_ENV

        env.update(GLIBC_MALLOC_ENV)
    return env


def one_line(text: str) -> str:
    """The last informative line of a worker's stderr: usually the exception."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if not ln.startswith(("warnings.warn", "WARNING", "UserWarning")):
            return ln[:300]
    return "no output"


def run_peer(name: str, python: str, inputs: str, args, env: dict) -> dict:
    cmd = [python, WORKER, name, "--inputs", inputs]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    cmd += ["--warmup", str(args.warmup)]
    log = os.path.join(inputs, f"{name}.log")
    with open(log, "w") as err:
        try:
            proc = subprocess.run(
                cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            why = f"no result within --timeout {args.timeout:g} s"
            cpu = cpu_info()
            if name == "cellpose_sam" and not (cpu["avx512_bf16"] or cpu["amx"]):
                why += " (bfloat16 weights on a CPU without avx512_bf16/AMX: see cellpose_sam_fp32)"
            return {"error": why}
    with open(log) as f:
        stderr = f.read()
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        hint = " (the kernel's OOM killer?)" if sig == "SIGKILL" else ""
        return {"error": f"killed by {sig}{hint}: {one_line(stderr)}"}
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {one_line(stderr)}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"no JSON result: {one_line(stderr + proc.stdout)}"}


def summarize(name: str, res: dict) -> dict:
    if "error" in res:
        return res
    times = res["times"]
    parts = {k: statistics.median(p.get(k, 0.0) for p in res["parts"]) for k in PARTS[name]}
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
        "parts": parts,
        "rss_gb": res["rss_gb"],
    }


def report(rows: dict, args, cpu: dict) -> dict:
    ref = rows.get(REFERENCE, {}).get("median")
    head = f"{'tool':<18} {'s/image med':>11} {'min':>7} {'max':>7} {'peak RSS GB':>11} "
    head += f"{'x ' + REFERENCE:>19}  parts (median s)"
    print(head)
    print("-" * len(head))
    summary = {}
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<18} failed: {row['error']}")
            summary[f"{name}_s"] = summary[f"{name}_rss_gb"] = None
            continue
        ratio = f"{row['median'] / ref:.2f}" if ref else "-"
        parts = ", ".join(f"{k} {v:.2f}" for k, v in row["parts"].items())
        print(
            f"{name:<18} {row['median']:>11.2f} {row['min']:>7.2f} {row['max']:>7.2f} "
            f"{row['rss_gb']:>11.2f} {ratio:>19}  {parts}"
        )
        summary[f"{name}_s"] = round(row["median"], 3)
        summary[f"{name}_rss_gb"] = round(row["rss_gb"], 3)
        summary[f"{name}_parts"] = {k: round(v, 3) for k, v in row["parts"].items()}
    malloc = "glibc default" if args.default_malloc else "DES-SAM's malloc tuning"
    print(
        f"{args.threads} thread(s), median of {args.repeats} after {args.warmup} warm-up run(s), "
        f"{malloc}; "
        f"CPU {cpu['model']} (avx512_bf16: {cpu['avx512_bf16']}, amx: {cpu['amx']}); "
        f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    summary.update(threads=args.threads, repeats=args.repeats, warmup=args.warmup, cpu=cpu)
    summary["malloc_tuned"] = not args.default_malloc
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    python = os.path.join(args.peers_venv, "bin", "python")
    if not os.access(python, os.X_OK):
        print(
            f"error: no peers venv at {args.peers_venv} (no bin/python): run `{SETUP_HINT}`",
            file=sys.stderr,
        )
        return 2
    names = [n for n in PEERS if not args.only or n in args.only]
    env = worker_env(args.threads, args.default_malloc)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="dessam-peers-") as tmp:
        t = time.perf_counter()
        make_inputs(tmp)
        print(f"[peers] inputs made in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        for name in names:
            t = time.perf_counter()
            rows[name] = summarize(name, run_peer(name, python, tmp, args, env))
            state = rows[name].get("error", "ok")
            print(f"[peers] {name}: {state} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
    summary = report(rows, args, cpu_info())
    print(json.dumps(summary))
    return 1 if any("error" in r for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
