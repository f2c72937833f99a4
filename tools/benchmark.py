#!/usr/bin/env python
"""CPU cost of DES-SAM (ViT-B, random weights, 1024^2 input) in one run.

    python tools/benchmark.py            # median of 3 after a warm-up, ~9 min on 2 idle cores
    python tools/benchmark.py --quick    # 1 timed run after the warm-up, ~4 min on 2 idle cores

Phases: encoder forward; a training step (forward, backward, SGD step; 50 nuclei) without and
with the embedding cache; inference per image (encoder + detector + decoder + postprocessing)
with 10, 100 and 500 nuclei (score threshold 0, NMS off, DETECTIONS_PER_IMAGE = N, so the
detector keeps exactly N boxes), and with 100 and 500 again with the decoder in bfloat16; SAM's
decoder alone in ms per nucleus (segment-anything's MaskDecoder, this package's shared-work
decoder in float32 and bfloat16) and where its time goes.

Each phase runs in a fresh process and reports its peak RSS (``ru_maxrss``: model building
included, since a fresh process is the only clean way to get a phase's peak). Prints a table and,
as its last line, one JSON object with the figures and their ratios to the encoder's.

Like the other tools it runs with glibc's malloc tuned (``dessam_d2.utils.malloc``);
``DESSAM_MALLOC_TUNING=0 python tools/benchmark.py`` measures with the default allocator.
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

from dessam_d2.utils.malloc import MALLOC_TUNING_SWITCH, tune_malloc

# Figures of a straightforward first prototype (SAM + heads, no cache, segment-anything decoder),
# measured on a machine of this kind (2-core CPU) before this package existed.
PROTOTYPE = {
    "encoder_s": 11.1,
    "train_step_cached_s": 40.5,
    "infer_100_s": 25.3,
    "infer_500_s": 52.1,
    "decoder_ms_per_nucleus": 70.0,
    "peak_rss_encoder_gb": 4.0,
}
TARGET_RATIOS = {"train_step_cached": 1.5, "infer_100": 1.6, "infer_500": 3.0, "rss_500": 1.5}
PHASES = ["encoder", "train_uncached", "train_cached", "infer", "decoder"]


def build_cfg(args, **overrides):
    from dessam_d2.config import load_config

    # random weights: no checkpoint can be downloaded here
    opts = ["MODEL.DEVICE", "cpu", "MODEL.SAM.CHECKPOINT", ""]
    for k, v in overrides.items():
        opts += [k, v]
    cfg = load_config(args.config_file, opts)
    cfg.freeze()
    return cfg


def build_model(cfg, seed=0):
    from detectron2.modeling import build_model as d2_build

    torch.manual_seed(seed)
    return d2_build(cfg)


def synthetic_input(num_nuclei: int, size: int = 1024, seed: int = 0, with_gt: bool = True):
    """A pale image with dark elliptical nuclei on a jittered grid, as the mapper hands it over."""
    from dessam_d2.data.synthetic import synthetic_model_input

    out = synthetic_model_input(
        (size, size),
        num_nuclei=num_nuclei,
        seed=seed,
        background=(200.0, 30.0),
        colour=(90.0, 50.0, 130.0),
        file_name=f"benchmark_{seed}.png",
        with_gt=with_gt,
    )
    out["sam_transform"] = f"longest{size}"
    return out


def random_boxes(n: int, size: int = 1024, seed: int = 0) -> "torch.Tensor":
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 100)
    return torch.cat([xy, xy + 15 + 60 * torch.rand(n, 2, generator=g)], dim=1)


class Timers:
    """Wall time of wrapped callables, accumulated per name, reset per measured run."""

    def __init__(self):
        self.total = defaultdict(float)

    def wrap(self, obj, attr, name_fn):
        real = getattr(obj, attr)

        def timed(*a, **k):
            t = time.perf_counter()
            out = real(*a, **k)
            self.total[name_fn(*a, **k)] += time.perf_counter() - t
            return out

        setattr(obj, attr, timed)


def measure(fn, repeats: int):
    """Warm-up run, then ``repeats`` timed runs: (median seconds, per-run extra dicts)."""
    fn()
    times, extras = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        extra = fn()
        times.append(time.perf_counter() - t)
        extras.append(extra if isinstance(extra, dict) else {})
    return statistics.median(times), extras


def median_of(extras, key):
    vals = [e[key] for e in extras if key in e]
    return statistics.median(vals) if vals else None


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KB on Linux


# ----------------------------------------------------------------------------------- phases


def phase_encoder(args):
    model = build_model(build_cfg(args)).eval()
    inp = synthetic_input(50, with_gt=False)
    images, _ = model.preprocess_image([inp])
    with torch.no_grad():
        t, _ = measure(lambda: model.image_encoder.encode(images.tensor), args.repeats)
    return {"encoder_s": t}


def phase_train(args, cached: bool):
    from detectron2.utils.events import EventStorage

    cache_dir = tempfile.mkdtemp(prefix="dessam_bench_cache_") if cached else ""
    overrides = {"MODEL.DESSAM.EMBEDDING_CACHE_DIR": cache_dir}
    model = build_model(build_cfg(args, **overrides)).train()
    inp = synthetic_input(args.train_nuclei)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    timers = Timers()
    timers.wrap(model, "image_embeddings", lambda *a, **k: "embeddings")
    head = model.roi_heads.mask_head
    timers.wrap(head, "decode", lambda e, b, student: "student" if student else "teacher")
    counts = {}
    real_decode = head.decode

    def counting_decode(embedding, boxes, student):
        counts["student" if student else "teacher"] = len(boxes)
        return real_decode(embedding, boxes, student)

    head.decode = counting_decode
    losses_first = {}

    def step():
        timers.total.clear()
        torch.manual_seed(1)
        with EventStorage():
            losses = model([inp])
        if not losses_first:
            losses_first.update({k: v.item() for k, v in losses.items()})
        t = time.perf_counter()
        opt.zero_grad()
        sum(losses.values()).backward()
        backward = time.perf_counter() - t
        opt.step()
        return {"backward": backward, **dict(timers.total)}

    t, extras = measure(step, args.repeats)
    out = {
        "step_s": t,
        "embeddings_s": median_of(extras, "embeddings"),
        "teacher_s": median_of(extras, "teacher"),
        "student_fwd_s": median_of(extras, "student"),
        "backward_s": median_of(extras, "backward"),
        "teacher_prompts": counts.get("teacher", 0),
        "student_prompts": counts.get("student", 0),
        "first_losses": losses_first,
    }
    if cached:
        out["cache"] = model.embedding_cache.stats()
        shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def phase_infer(args):
    """Inference on one image where the detector keeps exactly N boxes, for each N of
    --infer-nuclei in increasing order, in one process and on one model (the cap on detections
    is set per N): one warm-up for all.

    Peak RSS readings are max-so-far: each is that N's own peak only because a larger N needs
    more memory. The full run measures 500 in a process of its own.
    """
    sizes = sorted(args.infer_nuclei)
    overrides = {
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": 1.0,  # keep every box
        "TEST.DETECTIONS_PER_IMAGE": sizes[-1],
        "MODEL.RPN.POST_NMS_TOPK_TEST": max(1000, sizes[-1]),
    }
    model = build_model(build_cfg(args, **overrides)).eval()
    inp = synthetic_input(50, with_gt=False)  # the content does not matter here
    timers = Timers()
    timers.wrap(model, "image_embeddings", lambda *a, **k: "encoder")
    timers.wrap(model.roi_heads.mask_head, "decode", lambda *a, **k: "decoder")
    timers.wrap(model, "postprocess", lambda *a, **k: "postprocess")
    kept = []

    def run():
        timers.total.clear()
        with torch.no_grad():
            kept.append(len(model([inp])[0]["instances"]))
        return dict(timers.total)

    head = model.roi_heads.mask_head
    model.roi_heads.box_predictor.test_topk_per_image = sizes[0]
    run()  # warm-up
    out = {}
    runs = [(n, "float32") for n in sizes]
    # The decoder in bfloat16 (MODEL.DESSAM.DECODER_INFERENCE_DTYPE) after the float32 runs,
    # so that the peak RSS readings above stay those of the default.
    runs += [(n, "bfloat16") for n in sizes if n >= 100]
    for n, dtype in runs:
        model.roi_heads.box_predictor.test_topk_per_image = n
        head.inference_dtype = dtype
        times, extras = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            extras.append(run())
            times.append(time.perf_counter() - t)
            if kept[-1] != n:
                raise RuntimeError(f"the detector kept {kept[-1]} boxes, not {n}")
        name = f"infer_{n}" + ("_bf16" if dtype == "bfloat16" else "")
        out[name + "_s"] = statistics.median(times)
        parts = ("encoder", "decoder", "postprocess")
        out[name + "_parts"] = {k: median_of(extras, k) for k in parts}
        if dtype == "float32":
            out[f"peak_rss_infer_{n}_gb"] = peak_rss_gb()
    return out


def decoder_breakdown(head, emb, boxes, repeats: int) -> dict:
    """Where the decoder's time goes, ms per nucleus per part, segment-anything's and ours."""
    from dessam_d2.modeling import fast_decoder

    times = defaultdict(float)

    def time_module(module, name):
        def pre(*_):
            times["_start_" + name] = time.perf_counter()

        def post(*_):
            times[name] += time.perf_counter() - times["_start_" + name]

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    dec = head.mask_decoder
    tr = dec.transformer
    for i, layer in enumerate(tr.layers):
        time_module(layer, f"ref block {i}")
    time_module(tr.final_attn_token_to_image, "ref final attention")
    time_module(dec.output_upscaling, "ref upscaling")
    for mlp in dec.output_hypernetworks_mlps:
        time_module(mlp, "hypernetwork MLPs")
    time_module(dec.iou_prediction_head, "ref IoU head")

    cls = fast_decoder.SharedImageDecoder
    originals = {a: getattr(cls, a) for a in ("__init__", "_block", "_upscaled_mask")}
    calls = defaultdict(int)

    def timed(attr, name_fn):
        real = originals[attr]

        def wrapper(self, *a, **k):
            t = time.perf_counter()
            out = real(self, *a, **k)
            times[name_fn(self)] += time.perf_counter() - t
            return out

        return wrapper

    def block_name(self):
        i = calls[id(self)] % len(tr.layers)
        calls[id(self)] += 1
        return f"fast block {i}"

    cls.__init__ = timed("__init__", lambda self: "fast shared first-block image side")
    cls._block = timed("_block", block_name)
    cls._upscaled_mask = timed("_upscaled_mask", lambda self: "fast upscaling (tiled)")
    out = {}
    try:
        for fast in (False, True):
            head.fast_decoder = fast
            times.clear()
            t = 0.0
            with torch.no_grad():
                head.decode(emb, boxes, student=True)  # warm-up
                times.clear()
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    head.decode(emb, boxes, student=True)
                    t += time.perf_counter() - t0
            parts = {k: v for k, v in times.items() if not k.startswith("_start_")}
            prefix = "fast" if fast else "reference"
            total = 1000 * t / repeats / len(boxes)
            parts = {k: 1000 * v / repeats / len(boxes) for k, v in parts.items()}
            rest = total - sum(parts.values())
            parts["rest: prompt encoder, copies, final attention, mask product"] = rest
            out[prefix] = {"total": total, **parts}
    finally:
        for attr, fn in originals.items():
            setattr(cls, attr, fn)
    return out


def phase_decoder(args):
    """SAM's decoder alone (student prompts, no grad): ms per nucleus."""
    model = build_model(build_cfg(args)).eval()
    head = model.roi_heads.mask_head
    emb = torch.randn(1, 256, 64, 64)
    out = {}
    n = args.decoder_nuclei
    boxes = random_boxes(n)
    variants = [("fast_fp32", True, "float32", head.chunk_size)]
    variants.append(("fast_bf16", True, "bfloat16", head.chunk_size))
    variants.append(("reference", False, "float32", head.chunk_size))
    if not args.quick:
        variants += [(f"fast_fp32_chunk{c}", True, "float32", c) for c in args.chunk_sizes]
    ref = {}
    for name, fast, dtype, chunk in variants:
        head.fast_decoder, head.inference_dtype, head.chunk_size = fast, dtype, chunk
        nb = boxes if fast else boxes[: args.reference_nuclei]
        with torch.no_grad():
            t, _ = measure(lambda: head.decode(emb, nb, student=True), args.repeats)
            logits = head.decode(emb, boxes[: args.reference_nuclei], student=True)
        out[f"decoder_{name}_ms_per_nucleus"] = 1000 * t / len(nb)
        ref[name] = logits
    base = ref["reference"]
    for name, logits in ref.items():
        if name == "reference":
            continue
        a, b = base > 0, logits > 0
        iou = (a & b).flatten(1).sum(1).float() / (a | b).flatten(1).sum(1).clamp_min(1).float()
        out[f"decoder_{name}_max_abs_diff"] = float((base - logits).abs().max())
        out[f"decoder_{name}_min_mask_iou"] = float(iou.min())
    out["decoder_logit_abs_max"] = float(base.abs().max())
    head.inference_dtype, head.chunk_size = "float32", 40
    nb = boxes[: args.reference_nuclei]
    out["decoder_breakdown"] = decoder_breakdown(head, emb, nb, args.repeats)
    return out


def run_phase(args):
    torch.set_num_threads(args.threads)
    if args.phase == "encoder":
        out = phase_encoder(args)
    elif args.phase in ("train_uncached", "train_cached"):
        out = phase_train(args, cached=args.phase == "train_cached")
    elif args.phase == "infer":
        out = phase_infer(args)
    elif args.phase == "decoder":
        out = phase_decoder(args)
    else:
        raise ValueError(args.phase)
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out))


# ----------------------------------------------------------------------------------- parent


def child(args, phase, extra=()):
    cmd = [sys.executable, os.path.abspath(__file__), "--phase", phase]
    cmd += ["--config-file", args.config_file, "--threads", str(args.threads)]
    cmd += ["--repeats", str(args.repeats), "--train-nuclei", str(args.train_nuclei)]
    cmd += ["--decoder-nuclei", str(args.decoder_nuclei)]
    cmd += ["--reference-nuclei", str(args.reference_nuclei)]
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


def relative_changes(a: dict, b: dict) -> dict:
    return {k: abs(b[k] - a[k]) / max(abs(a[k]), 1e-12) for k in a if k in b}


def main_parent(args):
    t0 = time.perf_counter()
    enc = child(args, "encoder")
    unc = child(args, "train_uncached")
    cac = child(args, "train_cached")
    if args.quick:
        inf = child(args, "infer", ["--infer-nuclei", "10", "100", "500"])
    else:
        inf = child(args, "infer", ["--infer-nuclei", "10", "100"])
        inf.update(child(args, "infer", ["--infer-nuclei", "500"]))
    dec = child(args, "decoder")

    e = enc["encoder_s"]
    r = {
        "encoder_s": e,
        "train_step_uncached_s": unc["step_s"],
        "train_step_cached_s": cac["step_s"],
        "infer_10_s": inf["infer_10_s"],
        "infer_100_s": inf["infer_100_s"],
        "infer_500_s": inf["infer_500_s"],
        "infer_100_bf16_s": inf["infer_100_bf16_s"],
        "infer_500_bf16_s": inf["infer_500_bf16_s"],
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
    r["train_step_uncached_ratio"] = r["train_step_uncached_s"] / e
    for n in (10, 100, 500):
        r[f"infer_{n}_ratio"] = r[f"infer_{n}_s"] / e
    for n in (100, 500):
        r[f"infer_{n}_bf16_ratio"] = r[f"infer_{n}_bf16_s"] / e
    r["peak_rss_infer_500_ratio"] = r["peak_rss_infer_500_gb"] / r["peak_rss_encoder_gb"]
    r["fp16_cache_loss_rel_change"] = relative_changes(unc["first_losses"], cac["first_losses"])
    r["cache"] = cac["cache"]
    r["threads"] = args.threads
    tuned = os.environ.get(MALLOC_TUNING_SWITCH) != "0" and tune_malloc()
    r["malloc"] = "tuned (dessam_d2.utils.malloc.tune_malloc)" if tuned else "default"
    r["repeats"] = args.repeats
    r["wall_s"] = time.perf_counter() - t0

    print_report(args, r, unc, cac, inf, dec)
    r.update({k: v for k, v in dec.items() if k.startswith("decoder_")})
    print(json.dumps(r))


def print_report(args, r, unc, cac, inf, dec):
    e = r["encoder_s"]
    print(
        f"DES-SAM CPU benchmark: ViT-B random weights, 1024^2, {args.threads} threads, "
        f"median of {args.repeats} after a warm-up; load average {os.getloadavg()[0]:.1f}; "
        f"malloc {r['malloc']}"
    )
    header = ["phase", "seconds", "x encoder", "peak RSS GB", "prototype s (x enc)"]
    print("| " + " | ".join(header) + " |")
    print("|---|---:|---:|---:|---:|")
    rows = [
        ("encoder forward (no grad)", "encoder", "encoder_s"),
        ("train step, no cache (50 nuclei)", "train_step_uncached", None),
        ("train step, cached embedding", "train_step_cached", "train_step_cached_s"),
        ("inference, 10 nuclei", "infer_10", None),
        ("inference, 100 nuclei", "infer_100", "infer_100_s"),
        ("inference, 500 nuclei", "infer_500", "infer_500_s"),
    ]
    for name, key, proto_key in rows:
        seconds = r[key + "_s"]
        rss = r[f"peak_rss_{key}_gb"]
        p = PROTOTYPE.get(proto_key)
        proto = f"{p:.1f} ({p / PROTOTYPE['encoder_s']:.1f}x)" if p else "-"
        print(f"| {name} | {seconds:.2f} | {seconds / e:.2f} | {rss:.2f} | {proto} |")
    for n in (100, 500):
        seconds = r[f"infer_{n}_bf16_s"]
        print(
            f"| inference, {n} nuclei, bfloat16 decoder | {seconds:.2f} | {seconds / e:.2f} | | - |"
        )
    print(
        f"| SAM decoder, ms per nucleus | {r['decoder_ms_per_nucleus']:.1f} | | | "
        f"{PROTOTYPE['decoder_ms_per_nucleus']:.0f} |"
    )
    print()
    parts = []
    for name, d in (("uncached", unc), ("cached", cac)):
        for k in ("embeddings_s", "teacher_s", "student_fwd_s", "backward_s"):
            if d.get(k) is not None:
                parts.append(f"{name} {k[:-2]} {d[k]:.2f}")
    prompts = f"teacher {cac['teacher_prompts']}, student {cac['student_prompts']}"
    print(f"Training step parts (s): {', '.join(parts)}; prompts: {prompts}")
    for name in ("infer_10", "infer_100", "infer_500", "infer_100_bf16", "infer_500_bf16"):
        p = inf[f"{name}_parts"]
        rest = r[f"{name}_s"] - sum(v for v in p.values() if v)
        text = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if v is not None)
        print(f"{name} parts (s): {text}, detector and rest {rest:.2f}")
    speeds = [
        f"{k[len('decoder_') : -len('_ms_per_nucleus')]} {v:.1f}"
        for k, v in dec.items()
        if k.endswith("_ms_per_nucleus")
    ]
    print("Decoder ms per nucleus: " + ", ".join(speeds))
    diffs = [
        f"{k[len('decoder_') :]} {v:.3g}" for k, v in dec.items() if k.endswith(("diff", "iou"))
    ]
    print(
        f"Decoder vs segment-anything ({args.reference_nuclei} nuclei, |logit| max "
        f"{dec['decoder_logit_abs_max']:.3g}): " + ", ".join(diffs)
    )
    for name, parts in dec["decoder_breakdown"].items():
        text = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        print(f"Decoder {name}, ms per nucleus: {text}")
    changes = r["fp16_cache_loss_rel_change"]
    print(
        "float16 cache, relative change of the first step's losses: "
        + ", ".join(f"{k} {v:.1e}" for k, v in changes.items())
    )
    checks = [
        ("cached train step", r["train_step_cached_ratio"], TARGET_RATIOS["train_step_cached"]),
        ("inference 100", r["infer_100_ratio"], TARGET_RATIOS["infer_100"]),
        ("inference 500", r["infer_500_ratio"], TARGET_RATIOS["infer_500"]),
        ("peak RSS 500 / encoder", r["peak_rss_infer_500_ratio"], TARGET_RATIOS["rss_500"]),
    ]
    verdicts = [f"{n} {v:.2f} <= {t} {'met' if v <= t else 'MISSED'}" for n, v, t in checks]
    print("Targets (x encoder): " + ", ".join(verdicts))
    print(f"Total benchmark wall time {r['wall_s']:.0f} s")


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
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    p.add_argument("--infer-nuclei", type=int, nargs="+", default=[10, 100, 500], help="phase")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


if __name__ == "__main__":
    args = parse_args()
    # every phase process tunes its own allocator (DESSAM_MALLOC_TUNING=0: glibc's defaults)
    tune_malloc()
    import torch  # after parsing: --help answers at once

    if args.phase:
        run_phase(args)
    else:
        main_parent(args)
