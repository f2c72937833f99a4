"""Peak memory of whole-slide prediction on two synthetic slides of different sizes, from the
repository root:

    python -m benchmarks.slides --sizes 2048 6144 --work /tmp/slide_bench

Writes square synthetic cytology slides (dessam_d2/data/synthetic/slide.py) and runs
tools/predict.py on each in its own process (the demo's tiny SAM with random weights, level 0),
reporting the process' peak RSS (ru_maxrss of that child alone), the tiles, nuclei and seconds.
Flat peak RSS across sizes is what streaming promises. The last line is one JSON object.

    python -m benchmarks.slides --sizes 4096 8192 --label-tiff both --tile-size 1024 \
        MODEL.SAM.IMAGE_SIZE 128 MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 \
        MODEL.DESSAM.MASK_LOGIT_THRESHOLD 0.06

runs each size without and with --label-tiff; the overrides make the random model return
nuclei (blobs of its random masks), so the per-nucleus outputs and the label TIFF are exercised.

    python -m benchmarks.slides --writer-only --sizes 8192 32768

measures the label TIFF writer alone (``write_label_tiff``), each size in its own process, on
a grid of 1024-px prediction tiles (128 px overlap) of 256 disc nuclei each: ids run past
65 535 from 16 384 px on, and the whole level 0 as uint32 would be 4 GB at 32768 px.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEASURE = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, "
    "text=True); print(p.stdout); print(p.stderr[-2000:], file=sys.stderr); "
    "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(p.returncode)"
)


def write_synthetic_label_tiff(side: int, work: str) -> int:
    """write_label_tiff on a side x side slide of 1024-px prediction tiles, 256 nuclei each."""
    import numpy as np

    from dessam_d2.inference.slides.label_tiff import write_label_tiff
    from dessam_d2.inference.slides.reader import SlideGrid
    from dessam_d2.inference.tiling import tile_starts

    tile = 1024
    starts = tile_starts(side, tile, 128)
    yy, xx = np.mgrid[:tile, :tile]
    disc = ((yy % 64) - 32) ** 2 + ((xx % 64) - 32) ** 2 < 20**2
    labels = np.where(disc, (yy // 64) * 16 + (xx // 64) + 1, 0).astype(np.uint16)
    scores = np.linspace(1, 0.5, 257)
    grid = SlideGrid(0, 1.0, (0, 0), (side, side))
    path = os.path.join(work, f"labels_{side}.tif")
    write_label_tiff(
        path, (side, side), grid, (starts, starts), tile, lambda i: (labels, scores, 1 + 256 * i)
    )
    print("TIFF_MB", round(os.path.getsize(path) / 2**20, 1), "IDS", 256 * len(starts) ** 2)
    return 0


def measure_writer(sizes, work: str) -> int:
    os.makedirs(work, exist_ok=True)
    results = []
    for side in sizes:
        cmd = [sys.executable, "-m", "benchmarks.slides", "--writer-child", str(side)]
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE] + cmd + ["--work", work],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        out = proc.stdout.split()
        results.append(
            {
                "label_tiff_px": f"{side}x{side}",
                "ids": int(out[out.index("IDS") + 1]),
                "tiff_mb": float(out[out.index("TIFF_MB") + 1]),
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": round(int(out[out.index("MAXRSS_KB") + 1]) / 1024),
            }
        )
        print(results[-1], flush=True)
    print(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "writer": results}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 6144])
    p.add_argument("--work", default="/tmp/dessam_slide_bench")
    p.add_argument(
        "--label-tiff",
        choices=("no", "yes", "both"),
        default="no",
        help="run predict.py with --label-tiff: no, yes, or both (each size twice)",
    )
    p.add_argument("--tile-size", type=int, default=0, help="predict.py --tile-size")
    p.add_argument("--tile-overlap", type=int, default=None, help="predict.py --tile-overlap")
    p.add_argument(
        "--writer-only", action="store_true", help="the label TIFF writer alone (no model)"
    )
    p.add_argument("--writer-child", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides for predict.py")
    args = p.parse_args(argv)
    if args.writer_child:
        return write_synthetic_label_tiff(args.writer_child, args.work)
    if args.writer_only:
        return measure_writer(args.sizes, args.work)
    from dessam_d2.data.synthetic.slide import write_synthetic_slide

    os.makedirs(args.work, exist_ok=True)
    results = []
    label_tiff = {"no": [False], "yes": [True], "both": [False, True]}[args.label_tiff]
    for size, with_labels in [(s, b) for s in args.sizes for b in label_tiff]:
        slide = os.path.join(args.work, f"slide_{size}.tif")
        if not os.path.exists(slide):
            write_synthetic_slide(slide, (size, size), seed=size)
        out = os.path.join(args.work, f"out_{size}")
        cmd = [sys.executable, os.path.join(ROOT, "tools/predict.py")]
        cmd += ["--config-file", os.path.join(ROOT, "configs/dessam_demo.yaml"), "--random-weights"]
        cmd += ["--input", slide, "--output", out, "--overwrite"]
        if args.tile_size:
            cmd += ["--tile-size", str(args.tile_size)]
        if args.tile_overlap is not None:
            cmd += ["--tile-overlap", str(args.tile_overlap)]
        if with_labels:
            cmd += ["--label-tiff"]
        cmd += ["MODEL.SAM.CHECKPOINT", ""] + args.opts
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", MEASURE] + cmd, capture_output=True, text=True, cwd=ROOT
        )
        seconds = time.perf_counter() - start
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        maxrss = int(proc.stdout.split("MAXRSS_KB")[-1].split()[0])
        table = {
            line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1]
            for line in proc.stdout.splitlines()
            if line[:1].isalpha() and len(line.split()) > 1 and line.split()[-1].isdigit()
        }
        results.append(
            {
                "slide_px": f"{size}x{size}",
                "slide_mb": round(os.path.getsize(slide) / 2**20, 1),
                "tiles_predicted": int(table.get("tiles predicted", -1)),
                "tiles_skipped": int(table.get("tiles skipped (no tissue)", -1)),
                "nuclei": int(table.get("nuclei found", -1)),
                "label_tiff": with_labels,
                "label_tiff_mb": (
                    round(
                        os.path.getsize(os.path.join(out, f"slide_{size}_labels.ome.tif")) / 2**20,
                        1,
                    )
                    if with_labels
                    else None
                ),
                "seconds": round(seconds, 1),
                "peak_rss_mb": round(maxrss / 1024),
            }
        )
        print(results[-1], flush=True)
    print(json.dumps({"threads": os.environ.get("OMP_NUM_THREADS"), "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
