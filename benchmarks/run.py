"""CPU cost of DES-SAM (ViT-B, random weights, 1024^2 input) in one run, from the repository root:

    python -m benchmarks.run            # median of 3 after a warm-up, ~9 min on 2 idle cores
    python -m benchmarks.run --quick    # 1 timed run after the warm-up, ~4 min on 2 idle cores

Phases (benchmarks/phases.py): encoder forward (float32, int8, and bfloat16); a training step
(forward, backward, SGD step; 50 nuclei) without and with the embedding cache, and with it in
bfloat16 mixed precision (MODEL.DESSAM.TRAIN_DTYPE; where bfloat16 is measured); inference per image
(encoder + detector + decoder + postprocessing) with 10, 100 and 500 nuclei (score threshold 0,
NMS off, DETECTIONS_PER_IMAGE = N, so the detector keeps exactly N boxes), with 100 and 500 again
in bfloat16 end to end (MODEL.DESSAM.INFERENCE_DTYPE, the decoder following), with the encoder in
int8, and with only the decoder in bfloat16 (MODEL.DESSAM.DECODER_INFERENCE_DTYPE); SAM's decoder
alone in ms per nucleus (segment-anything's MaskDecoder, this package's shared-work decoder in
float32 and bfloat16) and where its time goes; the multiply-adds of each part against this
machine's peak (flops.py); each fast precision's per-nucleus mask IoU against float32 and the
demo's AJI change (accuracy.py: the demo's part needs ``make demo``'s model and data).

bfloat16 is emulated (slowly) on a CPU without AVX512-BF16 / AMX / Arm BF16: ``--bf16 auto`` (the
default) measures the whole-model bfloat16 phases only where the CPU computes bfloat16 natively
(their keys are null otherwise), ``--bf16 always`` everywhere (the encoder alone then takes
minutes per forward on AVX2), ``--bf16 never`` nowhere.

``--peers-venv PATH`` also runs ``python -m benchmarks.peers`` (segment-anything's predictor,
micro-sam, Cellpose-SAM, installed in the virtualenv PATH) and adds its figures and each one's
ratio to segment-anything's predictor with 100 boxes.

Each phase runs in a fresh process and reports its peak RSS (``ru_maxrss``: model building
included, since a fresh process is the only clean way to get a phase's peak). Prints a table and,
as its last line, one JSON object with the figures and their ratios to the encoder's.

Like the tools it runs with glibc's malloc tuned (``dessam_d2.utils.malloc``);
``DESSAM_MALLOC_TUNING=0 python -m benchmarks.run`` measures with the default allocator.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional

from benchmarks.measure import bf16_wanted, native_bf16, peak_rss_gb
from benchmarks.report import format_report
from dessam_d2.utils.malloc import MALLOC_TUNING_SWITCH, tune_malloc

PHASES = ["encoder", "train_uncached", "train_cached", "train_cached_bf16", "infer", "decoder"]
PHASES += ["flops", "accuracy"]
PEERS_COMMAND = [sys.executable, "-m", "benchmarks.peers"]
PEER_KEYS = [
    "sam_predictor_100_s",
    "sam_predictor_100_bf16_s",
    "sam_predictor_500_s",
    "microsam_ais_s",
    "cellpose_sam_s",
]
# DES-SAM's 100 nuclei over segment-anything's predictor with the same 100 boxes, per precision
SAME_PRECISION = {"float32": ("infer_100_s", "sam_predictor_100_s"),
                  "bfloat16": ("infer_100_bf16_s", "sam_predictor_100_bf16_s")}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config-file", default="configs/Base-DESSAM.yaml")
    p.add_argument("--quick", action="store_true", help="1 timed run per phase (< 5 min)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--train-nuclei", type=int, default=50)
    p.add_argument("--decoder-nuclei", type=int, default=100)
    p.add_argument("--reference-nuclei", type=int, default=16, help="for segment-anything's")
    p.add_argument("--chunk-sizes", type=int, nargs="+", default=[8, 16, 64])
    p.add_argument(
        "--bf16",
        choices=["auto", "always", "never"],
        default="auto",
        help="whole-model bfloat16 phases: auto = where the CPU has native bfloat16",
    )
    p.add_argument(
        "--peers-venv",
        default="",
        help="virtualenv with segment-anything, micro-sam and Cellpose-SAM: also run "
        "python -m benchmarks.peers",
    )
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--infer-nuclei", type=int, nargs="+", default=[10, 100, 500], help="phase")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def run_phase(args) -> dict:
    """One phase (``args.phase``) in this process: its figures and the process's peak RSS."""
    import torch

    from benchmarks import phases

    torch.set_num_threads(args.threads)
    config, repeats = args.config_file, args.repeats
    if args.phase == "encoder":
        out = phases.phase_encoder(config, repeats, args.bf16)
    elif args.phase in ("train_uncached", "train_cached"):
        cached = args.phase == "train_cached"
        out = phases.phase_train(config, repeats, args.train_nuclei, cached)
    elif args.phase == "train_cached_bf16":
        out = phases.phase_train(config, repeats, args.train_nuclei, True, "bfloat16")
    elif args.phase == "infer":
        out = phases.phase_infer(config, repeats, args.infer_nuclei, args.bf16)
    elif args.phase == "flops":
        out = phases.phase_flops(config, args.train_nuclei, (100, 500))
    elif args.phase == "accuracy":
        out = phases.phase_accuracy(config, args.bf16)
    elif args.phase == "decoder":
        chunks = () if args.quick else args.chunk_sizes
        out = phases.phase_decoder(
            config, repeats, args.decoder_nuclei, args.reference_nuclei, chunks
        )
    else:
        raise ValueError(args.phase)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def child(args, phase, extra=()) -> dict:
    """``phase`` in a fresh process (``--phase``): the JSON object of its last output line."""
    cmd = [sys.executable, "-m", "benchmarks.run", "--phase", phase]
    cmd += ["--config-file", args.config_file, "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats), "--train-nuclei", str(args.train_nuclei)]
    cmd += ["--decoder-nuclei", str(args.decoder_nuclei)]
    cmd += ["--reference-nuclei", str(args.reference_nuclei), "--bf16", args.bf16]
    cmd += ["--chunk-sizes"] + [str(c) for c in args.chunk_sizes]
    cmd += (["--quick"] if args.quick else []) + list(extra)
    t = time.perf_counter()
    print(f"[benchmark] {phase} {' '.join(extra)} ...", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-4000:])
        raise RuntimeError(f"benchmark phase {phase} failed")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"[benchmark] {phase} done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return out


def run_peers(args) -> dict:
    """``python -m benchmarks.peers`` in a child process (its table goes to stdout, its last line
    is one JSON object); {} with one line saying why when it cannot run."""
    venv = os.path.abspath(os.path.expanduser(args.peers_venv))
    if not os.path.isfile(os.path.join(venv, "bin", "python")):
        print(
            f"[benchmark] peers skipped: no virtualenv at {venv} (no bin/python)", file=sys.stderr
        )
        return {}
    cmd = PEERS_COMMAND + ["--peers-venv", venv]
    cmd += ["--threads", str(args.threads), "--repeats", str(args.repeats)]
    print("[benchmark] peers ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = res.stdout.strip().splitlines()
    try:
        peers = json.loads(lines[-1]) if res.returncode == 0 and lines else None
    except json.JSONDecodeError:
        peers = None
    if not isinstance(peers, dict):
        sys.stderr.write(res.stderr[-4000:])
        print(f"[benchmark] peers failed (exit {res.returncode}), skipped", file=sys.stderr)
        return {}
    print("\n".join(lines[:-1]))
    print(f"[benchmark] peers done in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return peers


def peer_ratios(r: dict) -> dict:
    """Each row's time over segment-anything's predictor with 100 boxes."""
    base = r.get("sam_predictor_100_s")
    if not base:
        return {}
    suffixes = ("", "_bf16", "_bf16_decoder", "_int8")
    keys = [f"infer_{n}{d}_s" for n in (100, 500) for d in suffixes]
    keys += PEER_KEYS
    return {k: r[k] / base for k in keys if isinstance(r.get(k), (int, float))}


def same_precision_ratios(r: dict) -> dict:
    """DES-SAM (finds the nuclei, then segments them) over SamPredictor given the same boxes,
    each precision where both were measured."""
    out = {}
    for precision, (ours, theirs) in SAME_PRECISION.items():
        a, b = r.get(ours), r.get(theirs)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
            out[precision] = a / b
    return out


def relative_changes(a: dict, b: dict) -> dict:
    return {k: abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) for k in a if k in b}


def summarize(
    args,
    enc: dict,
    unc: dict,
    cac: dict,
    inf: dict,
    dec: dict,
    peers: dict,
    cac_bf16: Optional[dict] = None,
) -> dict:
    """The run's figures from the phases' outputs: seconds, peak RSS and ratios to the encoder
    (``cac_bf16``: the cached step in bfloat16 mixed precision, where measured)."""
    e = enc["encoder_s"]
    r = {
        "encoder_s": e,
        "train_step_uncached_s": unc["step_s"],
        "train_step_cached_s": cac["step_s"],
        "infer_10_s": inf["infer_10_s"],
        "infer_100_s": inf["infer_100_s"],
        "infer_500_s": inf["infer_500_s"],
        "encoder_bf16_s": enc.get("encoder_bf16_s"),
        "infer_100_bf16_s": inf.get("infer_100_bf16_s"),
        "infer_500_bf16_s": inf.get("infer_500_bf16_s"),
        "infer_100_bf16_decoder_s": inf["infer_100_bf16_decoder_s"],
        "infer_500_bf16_decoder_s": inf["infer_500_bf16_decoder_s"],
        "decoder_ms_per_nucleus": dec["decoder_fast_fp32_ms_per_nucleus"],
        "decoder_bf16_ms_per_nucleus": dec["decoder_fast_bf16_ms_per_nucleus"],
        "decoder_reference_ms_per_nucleus": dec["decoder_reference_ms_per_nucleus"],
        "peak_rss_encoder_gb": enc["peak_rss_gb"],
        "peak_rss_train_step_uncached_gb": unc["peak_rss_gb"],
        "peak_rss_train_step_cached_gb": cac["peak_rss_gb"],
        "peak_rss_infer_10_gb": inf["peak_rss_infer_10_gb"],
        "peak_rss_infer_100_gb": inf["peak_rss_infer_100_gb"],
        "peak_rss_infer_500_gb": inf["peak_rss_infer_500_gb"],
    }
    r["train_step_cached_ratio"] = r["train_step_cached_s"] / e
    r.update(train_bf16_figures(cac, cac_bf16, e))
    r["train_step_uncached_ratio"] = r["train_step_uncached_s"] / e
    for n in (10, 100, 500):
        r[f"infer_{n}_ratio"] = r[f"infer_{n}_s"] / e
    for key in ("encoder_bf16", "infer_100_bf16", "infer_500_bf16"):
        r[f"{key}_ratio"] = r[f"{key}_s"] / e if r[f"{key}_s"] is not None else None
    for n in (100, 500):
        r[f"infer_{n}_bf16_decoder_ratio"] = r[f"infer_{n}_bf16_decoder_s"] / e
    r["encoder_bf16_cosine"] = enc.get("encoder_bf16_cosine")
    r["encoder_int8_s"], r["encoder_int8_cosine"] = (
        enc["encoder_int8_s"],
        enc["encoder_int8_cosine"],
    )
    r["encoder_int8_ratio"] = r["encoder_int8_s"] / e
    for n in (100, 500):
        r[f"infer_{n}_int8_s"] = inf[f"infer_{n}_int8_s"]
        r[f"infer_{n}_int8_ratio"] = r[f"infer_{n}_int8_s"] / e
    r["native_bf16"] = native_bf16()
    r["bf16_phases"] = args.bf16
    r["peak_rss_infer_500_ratio"] = r["peak_rss_infer_500_gb"] / r["peak_rss_encoder_gb"]
    r["fp16_cache_loss_rel_change"] = relative_changes(unc["first_losses"], cac["first_losses"])
    r["cache"] = cac["cache"]
    r["threads"] = args.threads
    tuned = os.environ.get(MALLOC_TUNING_SWITCH) != "0" and tune_malloc()
    r["malloc"] = "tuned (dessam_d2.utils.malloc.tune_malloc)" if tuned else "default"
    r["repeats"] = args.repeats
    r.update(peers)
    if peers:
        r["ratio_to_sam_predictor_100"] = peer_ratios(r)
        r["ratio_to_sam_predictor_100_same_precision"] = same_precision_ratios(r)
    return r


def train_bf16_figures(cac: dict, bf16: Optional[dict], encoder_s: float) -> dict:
    """The cached training step in bfloat16 mixed precision (MODEL.DESSAM.TRAIN_DTYPE): seconds,
    its parts, peak RSS, speed-up over float32 and the first step's losses against float32's
    (all None where not measured)."""
    keys = ("train_step_cached_bf16_s", "train_step_cached_bf16_ratio", "train_bf16_speedup")
    if not bf16:
        return {k: None for k in keys + ("peak_rss_train_step_cached_bf16_gb",)}
    parts = ("student_fwd_s", "backward_s", "backward_mask_s", "backward_detector_s")
    return {
        "train_step_cached_bf16_s": bf16["step_s"],
        "train_step_cached_bf16_ratio": bf16["step_s"] / encoder_s,
        "train_bf16_speedup": cac["step_s"] / bf16["step_s"],
        "peak_rss_train_step_cached_bf16_gb": bf16["peak_rss_gb"],
        "train_step_cached_bf16_parts": {k[:-2]: bf16.get(k) for k in parts},
        "train_bf16_loss_rel_change": relative_changes(cac["first_losses"], bf16["first_losses"]),
    }


def accuracy_figures(acc: dict, native: bool) -> dict:
    """The accuracy phase's figures: ``mask_iou_vs_float32_median`` at the fast precision of
    this machine (bfloat16 where native, int8 elsewhere), from the demo's trained model where
    it was there (else the random ViT-B's), and every precision's IoU and demo AJI change."""
    fast = "bfloat16" if native and "bfloat16" in acc["dtypes"] else "int8"
    demo = acc["demo"]
    source = "demo" if "mask_iou_median" in demo else "vit_b_random"
    ious = demo["mask_iou_median"] if source == "demo" else acc["vit_b_random_mask_iou_median"]
    return {
        "fast_precision": fast,
        "mask_iou_vs_float32_median": ious[fast],
        "mask_iou_vs_float32_source": source,
        "mask_iou_vs_float32": {
            d: {"vit_b_random": acc["vit_b_random_mask_iou_median"][d],
                "demo": demo.get("mask_iou_median", {}).get(d)}
            for d in acc["dtypes"]
        },  # fmt: skip
        "demo_aji_change_vs_float32": demo.get("aji_change"),
        "demo_accuracy_skipped": demo.get("skipped"),
    }


def limit_figures(r: dict, flops: dict) -> dict:
    """Each phase's limit (its multiply-adds over this machine's peak, ``benchmarks.flops``) and
    its time over that limit, in float32 and, where native, bfloat16; the ``limit_ratio_*`` keys
    at the best native precision (bfloat16 where it was measured, else float32)."""
    peak32, peak16 = flops["peak_macs_float32"], flops.get("peak_macs_bfloat16")
    out = {
        "peak_gflops_float32": 2 * peak32 / 1e9,
        "peak_gflops_bfloat16": 2 * peak16 / 1e9 if peak16 else None,
        "macs": {k: flops[k] for k in ("infer_100", "infer_500", "train_cached")},
        "macs_convention": "fvcore: one multiply-add = one flop; FLOPs = 2 x MACs",
    }
    limits = {}
    for n in (100, 500):
        total = flops[f"infer_{n}"]["total"]
        limits[f"infer_{n}"] = total / peak32
        out[f"limit_ratio_infer_{n}_float32"] = r[f"infer_{n}_s"] / limits[f"infer_{n}"]
        bf16 = r.get(f"infer_{n}_bf16_s")
        if peak16 and bf16:
            limits[f"infer_{n}_bf16"] = total / peak16
            out[f"limit_ratio_infer_{n}_bfloat16"] = bf16 / limits[f"infer_{n}_bf16"]
        best = out.get(f"limit_ratio_infer_{n}_bfloat16") or out[f"limit_ratio_infer_{n}_float32"]
        out[f"limit_ratio_infer_{n}"] = best
    limits["encoder"] = flops["infer_100"]["encoder"] / peak32
    step = flops["train_cached"]["total"]
    limits["train_step_cached"] = step / peak32
    ratio = r["train_step_cached_s"] / limits["train_step_cached"]
    out["limit_ratio_train_step_cached_float32"] = out["limit_ratio_train_step_cached"] = ratio
    if peak16 and r.get("train_step_cached_bf16_s"):
        limits["train_step_cached_bf16"] = step / peak16
        ratio = r["train_step_cached_bf16_s"] / limits["train_step_cached_bf16"]
        out["limit_ratio_train_step_cached_bfloat16"] = out["limit_ratio_train_step_cached"] = ratio
    out["limit_ratio_encoder_float32"] = r["encoder_s"] / limits["encoder"]
    out["limits_s"] = limits
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    # every phase process tunes its own allocator (DESSAM_MALLOC_TUNING=0: glibc's defaults)
    tune_malloc()
    if args.phase:
        print(json.dumps(run_phase(args)))
        return 0
    t0 = time.perf_counter()
    enc = child(args, "encoder")
    unc = child(args, "train_uncached")
    cac = child(args, "train_cached")
    cac_bf16 = child(args, "train_cached_bf16") if bf16_wanted(args.bf16) else None
    if args.quick:
        inf = child(args, "infer", ["--infer-nuclei", "10", "100", "500"])
    else:
        inf = child(args, "infer", ["--infer-nuclei", "10", "100"])
        inf.update(child(args, "infer", ["--infer-nuclei", "500"]))
    dec = child(args, "decoder")
    flops = child(args, "flops")
    acc = child(args, "accuracy")
    peers = run_peers(args) if args.peers_venv else {}
    r = summarize(args, enc, unc, cac, inf, dec, peers, cac_bf16)
    r.update(limit_figures(r, flops))
    r.update(accuracy_figures(acc, r["native_bf16"]))
    r["wall_s"] = time.perf_counter() - t0
    phases = {"train_uncached": unc, "train_cached": cac, "infer": inf, "decoder": dec}
    phases["flops"] = flops
    print(format_report(r, phases, args.threads, args.repeats, args.bf16, args.reference_nuclei))
    r.update({k: v for k, v in dec.items() if k.startswith("decoder_")})
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
