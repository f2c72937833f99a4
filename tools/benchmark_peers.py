#!/usr/bin/env python
"""CPU cost of the tools users would pick instead of DES-SAM, on the same input, same threads.

    bash scripts/setup_peers_env.sh      # once: the peers' own venv, .venv-peers (~7 GB)
    python tools/benchmark_peers.py --peers-venv .venv-peers --threads 2 --repeats 3
    python tools/benchmark_peers.py --only sam_predictor_100 cellpose_sam

Peers, all ViT-based, all with random weights (no checkpoint can be downloaded here; the cost of a
forward pass does not depend on the weights, that of the post-processing somewhat does):

- ``sam_predictor_100`` / ``_500``: segment-anything's ``SamPredictor`` (ViT-B): ``set_image``,
  then ``predict_torch`` on the nuclei's boxes in batches of 100, one mask each. Parts: encoder,
  decoder.
- ``microsam_ais``: micro-sam's automatic instance segmentation (ViT-B SAM + UNETR decoder,
  ``segmentation_mode="ais"``). Parts: encoder, decoder (UNETR), postprocess (watershed).
- ``cellpose_sam``: Cellpose 4 (Cellpose-SAM, ViT-L) through ``CellposeModel`` (bfloat16 weights,
  its default) and ``model.eval(image)`` with defaults. Parts: network, masks (flow dynamics).
  ``cellpose_sam_fp32``: the same with ``use_bfloat16=False``. On a CPU without native bfloat16
  (no avx512_bf16/AMX) torch's bfloat16 matmul is ~50-200x slower than float32, so
  ``cellpose_sam`` then takes hours per image and only the float32 figure is usable.

Inputs come from ``synthetic_input`` of tools/benchmark.py (1024^2, seed 0): the image with 100
nuclei and their 100 boxes, and the image with 500 nuclei and their 500 boxes. The automatic
peers (no boxes) segment the 100-nuclei image, the one ``sam_predictor_100`` gets.

Each peer runs in a fresh process of the peers' venv (this script with ``--worker NAME``, which
imports only numpy, torch and that peer), one warm-up run then ``--repeats`` timed runs; the
figures are the median, min and max seconds per image and the process's peak RSS (``ru_maxrss``,
model building included). Workers get ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` set to
``--threads`` and, unless ``--default-malloc``, the same glibc malloc tuning as DES-SAM's tools.
Prints a table and, as its last line, one JSON object (seconds and GB per peer, null for a peer
that failed, whose row says why; the exit code is then 1).
"""

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PEERS = [
    "sam_predictor_100",
    "sam_predictor_500",
    "microsam_ais",
    "cellpose_sam",
    "cellpose_sam_fp32",
]
PARTS = {
    "sam_predictor_100": ["encoder", "decoder"],
    "sam_predictor_500": ["encoder", "decoder"],
    "microsam_ais": ["encoder", "decoder", "postprocess"],
    "cellpose_sam": ["network", "masks"],
    "cellpose_sam_fp32": ["network", "masks"],
}
NUCLEI = (100, 500)
SAM_BATCH = 100  # boxes per predict_torch call, as segment-anything's README batches them
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
    p.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--threads and --repeats must be at least 1, --warmup at least 0")
    if args.worker and not args.inputs:
        p.error("--worker needs --inputs")
    return args


# ---------------------------------------------------------------------------------------------
# Inputs (main venv)


def make_inputs(out_dir: str, size: int = 1024, seed: int = 0) -> dict:
    """Saves image_N.npy (uint8 HWC RGB) and boxes_N.npy (float32 XYXY pixels) for N in NUCLEI."""
    import numpy as np
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from benchmark import synthetic_input

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


# ---------------------------------------------------------------------------------------------
# Workers (peers venv: numpy, torch and the peer's package only)


def _load(inputs: str, n: int):
    import numpy as np

    return np.load(os.path.join(inputs, f"image_{n}.npy")), np.load(
        os.path.join(inputs, f"boxes_{n}.npy")
    )


def build_sam_predictor(inputs: str, n: int):
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    image, boxes = _load(inputs, n)
    boxes = torch.from_numpy(boxes)
    predictor = SamPredictor(sam_model_registry["vit_b"](checkpoint=None).eval())

    def run():
        t0 = time.perf_counter()
        predictor.set_image(image)
        t1 = time.perf_counter()
        for i in range(0, len(boxes), SAM_BATCH):
            batch = predictor.transform.apply_boxes_torch(boxes[i : i + SAM_BATCH], image.shape[:2])
            masks, _, _ = predictor.predict_torch(
                point_coords=None, point_labels=None, boxes=batch, multimask_output=False
            )
            assert masks.shape[0] == len(batch)
        t2 = time.perf_counter()
        return {"encoder": t1 - t0, "decoder": t2 - t1}

    return run


def build_microsam_ais(inputs: str):
    from micro_sam import util
    from micro_sam.instance_segmentation import (
        DecoderAdapter,
        get_instance_segmentation_generator,
        get_unetr,
    )

    image, _ = _load(inputs, NUCLEI[0])
    # micro-sam's ViT-B SAM (util.get_sam_model builds it the same way, then loads a checkpoint)
    predictor = util.SamPredictor(util.sam_model_registry["vit_b"]().to("cpu"))
    # get_decoder(image_encoder, decoder_state) without a decoder state: a random UNETR decoder
    unetr = get_unetr(predictor.model.image_encoder, decoder_state=None, device="cpu")
    segmenter = get_instance_segmentation_generator(
        predictor, is_tiled=False, decoder=DecoderAdapter(unetr), segmentation_mode="ais"
    )

    def run():
        # the steps of micro_sam.automatic_segmentation.automatic_instance_segmentation in 2D
        t0 = time.perf_counter()
        embeddings = util.precompute_image_embeddings(predictor, image, ndim=2, verbose=False)
        t1 = time.perf_counter()
        segmenter.initialize(image, image_embeddings=embeddings)
        t2 = time.perf_counter()
        segmentation = segmenter.generate()
        t3 = time.perf_counter()
        assert segmentation.shape == image.shape[:2]
        return {"encoder": t1 - t0, "decoder": t2 - t1, "postprocess": t3 - t2}

    return run


def build_cellpose_sam(inputs: str, bfloat16: bool = True):
    import torch
    from cellpose.models import CellposeModel
    from cellpose.vit import CPSAM

    image, _ = _load(inputs, NUCLEI[0])
    weights = os.path.join(inputs, "cpsam_random.pth")
    if not os.path.exists(weights):
        CPSAM().save_model(weights)  # random float32 weights, as Cellpose saves its models
    # its normal loading path: builds CPSAM, cast to bfloat16 unless told not to, loads the file
    model = CellposeModel(
        gpu=False, pretrained_model=weights, device=torch.device("cpu"), use_bfloat16=bfloat16
    )
    parts = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                parts[name] = parts.get(name, 0.0) + time.perf_counter() - t

        return wrapper

    model._run_net = timed("network", model._run_net)
    model._compute_masks = timed("masks", model._compute_masks)

    def run():
        parts.clear()
        masks = model.eval(image)[0]
        assert masks.shape == image.shape[:2]
        return dict(parts)

    return run


def worker(args) -> int:
    """Builds one peer, runs it once to warm up, then ``--repeats`` times; one JSON line out."""
    import numpy  # noqa: F401  (fails early and clearly in a venv without it)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    name = args.worker
    if name.startswith("sam_predictor_"):
        build = lambda: build_sam_predictor(args.inputs, int(name.rsplit("_", 1)[1]))  # noqa: E731
    else:
        build = {
            "microsam_ais": lambda: build_microsam_ais(args.inputs),
            "cellpose_sam": lambda: build_cellpose_sam(args.inputs),
            "cellpose_sam_fp32": lambda: build_cellpose_sam(args.inputs, bfloat16=False),
        }[name]
    t = time.perf_counter()
    with torch.no_grad():
        run = build()
        build_s = time.perf_counter() - t
        for _ in range(args.warmup):
            run()
        times, parts = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            parts.append(run())
            times.append(time.perf_counter() - t)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    out = {"times": times, "parts": parts, "rss_gb": rss_gb, "build_s": build_s}
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    print(json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# Driver (main venv)


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
    cmd = [python, os.path.abspath(__file__), "--worker", name, "--inputs", inputs]
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


def main(args) -> int:
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
    _args = parse_args()
    if _args.worker:
        # only numpy, torch and the peer: never this repository's packages or tools/ modules
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
        sys.exit(worker(_args))
    sys.exit(main(_args))
