#!/usr/bin/env python
"""CPU cost of DES-SAM (ViT-B, random weights, 1024^2 input) in one run.

    python tools/benchmark.py            # median of 3 after a warm-up, ~9 min on 2 idle cores
    python tools/benchmark.py --quick    # 1 timed run after the warm-up, ~4 min on 2 idle cores

Phases: encoder forward (float32, and bfloat16); a training step (forward, backward, SGD step;
50 nuclei) without and with the embedding cache; inference per image (encoder + detector +
decoder + postprocessing) with 10, 100 and 500 nuclei (score threshold 0, NMS off,
DETECTIONS_PER_IMAGE = N, so the detector keeps exactly N boxes), with 100 and 500 again with the
whole model in bfloat16 (MODEL.DESSAM.INFERENCE_DTYPE) and with only the decoder in bfloat16
(MODEL.DESSAM.DECODER_INFERENCE_DTYPE); SAM's decoder alone in ms per nucleus (segment-anything's
MaskDecoder, this package's shared-work decoder in float32 and bfloat16) and where its time goes.

Where the time of a run goes is read from the model's own ``torch.profiler.record_function``
labels ("dessam/encoder", "dessam/pyramid", "dessam/rpn", "dessam/box_head",
"dessam/mask_decoder", "dessam/postprocess"; "dessam/teacher" and "dessam/student" in training;
"dessam/decoder/..." inside the shared-work decoder) through ``torch.profiler.profile``.

bfloat16 is emulated (slowly) on a CPU without AVX512-BF16 / AMX / Arm BF16: ``--bf16 auto`` (the
default) measures the whole-model bfloat16 phases only where the CPU computes bfloat16 natively
(their keys are null otherwise), ``--bf16 always`` everywhere (the encoder alone then takes
minutes per forward on AVX2), ``--bf16 never`` nowhere.

``--peers-venv PATH`` also runs tools/benchmark_peers.py (segment-anything's predictor, micro-sam,
Cellpose-SAM, installed in the virtualenv PATH) and adds its figures and each one's ratio to
segment-anything's predictor with 100 boxes.

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
from typing import Optional

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
PEERS_TOOL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "benchmark_peers.py")
PEER_KEYS = ["sam_predictor_100_s", "sam_predictor_500_s", "microsam_ais_s", "cellpose_sam_s"]


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
    import torch
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


def random_boxes(n: int, size: int = 1024, seed: int = 0):
    """n random XYXY boxes (n x 4 tensor) of 15-75 px in a size x size image."""
    import torch

    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (size - 100)
    return torch.cat([xy, xy + 15 + 60 * torch.rand(n, 2, generator=g)], dim=1)


def labelled(fn, timing: Optional[dict] = None):
    """Run fn under torch.profiler: (fn's result, {label: seconds} of the "dessam/..."
    record_function labels the model code places, summed over their calls). ``timing["s"]``:
    fn's wall time, without the profiler's post-processing (seconds for thousands of events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        out = fn()
        if timing is not None:
            timing["s"] = time.perf_counter() - t
    parts = defaultdict(float)
    results = getattr(prof.profiler, "kineto_results", None)
    if results is not None:
        # The raw events: key_averages() builds a Python object per event first, minutes for
        # the ~10^5 operator events of 500 nuclei on a busy CPU.
        for evt in results.events():
            name = evt.name()
            if name.startswith("dessam/"):
                parts[name[len("dessam/") :]] += evt.duration_ns() / 1e9
    else:
        for evt in prof.key_averages():
            if evt.key.startswith("dessam/"):
                parts[evt.key[len("dessam/") :]] += evt.cpu_time_total / 1e6
    return out, dict(parts)


def measure(fn, repeats: int, warm_up: bool = True):
    """Warm-up run, then ``repeats`` timed runs: (median seconds, per-run extra dicts)."""
    if warm_up:
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


def bf16_wanted(args) -> bool:
    import torch

    from dessam_d2.modeling.meta_arch import resolve_inference_dtype

    if args.bf16 == "auto":
        return resolve_inference_dtype("auto", "cpu") == torch.bfloat16
    return args.bf16 == "always"


def phase_encoder(args):
    import torch

    model = build_model(build_cfg(args)).eval()
    inp = synthetic_input(50, model.image_size, with_gt=False)
    images, _ = model.preprocess_image([inp])
    out = {}
    with torch.no_grad():
        out["encoder_s"], _ = measure(lambda: model.encode(images.tensor), args.repeats)
        if bf16_wanted(args):
            ref = model.encode(images.tensor)
            outs = []
            # No warm-up when emulated: each forward takes minutes, the first one is no slower.
            t, _ = measure(
                lambda: outs.append(model.encode(images.tensor, torch.bfloat16)),
                args.repeats,
                native_bf16(),
            )
            emb = outs[-1]
            out["encoder_bf16_s"] = t
            out["encoder_bf16_cosine"] = float(
                torch.nn.functional.cosine_similarity(emb.flatten(), ref.flatten(), dim=0)
            )
            out["encoder_bf16_rel_err"] = float((emb - ref).norm() / ref.norm())
    return out


def native_bf16() -> bool:
    from dessam_d2.modeling.meta_arch import cpu_has_native_bf16

    return cpu_has_native_bf16()


def phase_train(args, cached: bool):
    import torch
    from detectron2.utils.events import EventStorage

    cache_dir = tempfile.mkdtemp(prefix="dessam_bench_cache_") if cached else ""
    overrides = {"MODEL.DESSAM.EMBEDDING_CACHE_DIR": cache_dir}
    model = build_model(build_cfg(args, **overrides)).train()
    inp = synthetic_input(args.train_nuclei, model.image_size)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    counts = {}
    losses_first = {}

    def forward():
        torch.manual_seed(1)
        with EventStorage() as storage:
            losses = model([inp])
        for k in ("teacher", "student"):  # how many prompts each decoder ran (the mask head's)
            counts[k] = int(storage.latest().get(f"mask_head/{k}_prompts", (0,))[0])
        return losses

    def step():
        timing = {}
        losses, parts = labelled(forward, timing)
        if not losses_first:
            losses_first.update({k: v.item() for k, v in losses.items()})
        t = time.perf_counter()
        opt.zero_grad()
        sum(losses.values()).backward()
        backward = time.perf_counter() - t
        opt.step()
        step_s = timing["s"] + time.perf_counter() - t  # the profiler's parsing left out
        return {"backward": backward, "step": step_s, **parts}

    _, extras = measure(step, args.repeats)
    out = {
        "step_s": median_of(extras, "step"),
        "embeddings_s": median_of(extras, "encoder"),
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
    import torch

    sizes = sorted(args.infer_nuclei)
    overrides = {
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": 1.0,  # keep every box
        "TEST.DETECTIONS_PER_IMAGE": sizes[-1],
        "MODEL.RPN.POST_NMS_TOPK_TEST": max(1000, sizes[-1]),
    }
    model = build_model(build_cfg(args, **overrides)).eval()
    inp = synthetic_input(50, model.image_size, with_gt=False)  # the content does not matter
    kept = []

    def run():
        with torch.no_grad():
            kept.append(len(model([inp])[0]["instances"]))

    def run_labelled():
        with torch.no_grad():
            instances, parts = labelled(lambda: model([inp])[0]["instances"])
        kept.append(len(instances))
        return parts

    head = model.roi_heads.mask_head
    model.roi_heads.box_predictor.test_topk_per_image = sizes[0]
    run()  # warm-up of the process
    out = {}
    # (nuclei, MODEL.DESSAM.INFERENCE_DTYPE, DECODER_INFERENCE_DTYPE, name suffix)
    runs = [(n, "float32", "float32", "") for n in sizes]
    # bfloat16 after the float32 runs, so that the peak RSS readings stay those of the default:
    # the decoder alone, then (--bf16) the whole model.
    runs += [(n, "float32", "bfloat16", "_bf16_decoder") for n in sizes if n >= 100]
    if bf16_wanted(args):
        runs += [(n, "bfloat16", "float32", "_bf16") for n in sizes if n >= 100]
    for n, model_dtype, decoder_dtype, suffix in runs:
        model.roi_heads.box_predictor.test_topk_per_image = n
        model.set_inference_dtype(model_dtype)
        head.inference_dtype = decoder_dtype
        # One run under the profiler for the parts (also this setting's warm-up), then the timed
        # runs without it.
        parts = run_labelled()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            run()
            times.append(time.perf_counter() - t)
            if kept[-1] != n:
                raise RuntimeError(f"the detector kept {kept[-1]} boxes, not {n}")
        name = f"infer_{n}{suffix}"
        out[name + "_s"] = statistics.median(times)
        out[name + "_parts"] = {k: parts.get(k) for k in INFER_PARTS}
        if suffix == "":
            out[f"peak_rss_infer_{n}_gb"] = peak_rss_gb()
    return out


def decoder_breakdown(head, emb, boxes, repeats: int) -> dict:
    """Where the decoder's time goes, ms per nucleus per part, segment-anything's (forward hooks
    on its modules, removed afterwards) and ours (its "dessam/decoder/..." profiler labels)."""
    import torch

    times = defaultdict(float)
    handles = []

    def time_module(module, name):
        def pre(*_):
            times["_start_" + name] = time.perf_counter()

        def post(*_):
            times[name] += time.perf_counter() - times["_start_" + name]

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    dec = head.mask_decoder
    tr = dec.transformer
    out = {}
    for fast in (False, True):
        head.fast_decoder = fast
        if not fast:
            for i, layer in enumerate(tr.layers):
                time_module(layer, f"ref block {i}")
            time_module(tr.final_attn_token_to_image, "ref final attention")
            time_module(dec.output_upscaling, "ref upscaling")
            for mlp in dec.output_hypernetworks_mlps:
                time_module(mlp, "hypernetwork MLPs")
            time_module(dec.iou_prediction_head, "ref IoU head")
        t = 0.0
        with torch.no_grad():
            head.decode(emb, boxes, student=True)  # warm-up
            times.clear()
            for _ in range(repeats):
                if fast:
                    timing = {}
                    _, labels = labelled(lambda: head.decode(emb, boxes, student=True), timing)
                    for k, v in labels.items():
                        if k.startswith("decoder/"):
                            times["fast " + k[len("decoder/") :]] += v
                    t += timing["s"]
                else:
                    t0 = time.perf_counter()
                    head.decode(emb, boxes, student=True)
                    t += time.perf_counter() - t0
        for h in handles:
            h.remove()
        handles.clear()
        parts = {k: v for k, v in times.items() if not k.startswith("_start_")}
        prefix = "fast" if fast else "reference"
        total = 1000 * t / repeats / len(boxes)
        parts = {k: 1000 * v / repeats / len(boxes) for k, v in parts.items()}
        rest = total - sum(parts.values())
        parts["rest: prompt encoder, copies, final attention, mask product"] = rest
        out[prefix] = {"total": total, **parts}
    return out


def phase_decoder(args):
    """SAM's decoder alone (student prompts, no grad): ms per nucleus."""
    import torch

    model = build_model(build_cfg(args)).eval()
    head = model.roi_heads.mask_head
    enc = model.image_encoder  # SAM's embedding: 256 x 64 x 64 for 1024 px
    emb = torch.randn(1, enc.out_chans, enc.embed_size, enc.embed_size)
    out = {}
    n = args.decoder_nuclei
    boxes = random_boxes(n, model.image_size)
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


INFER_PARTS = ("encoder", "pyramid", "rpn", "box_head", "mask_decoder", "postprocess")


def run_phase(args):
    import torch

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
    cmd += ["--reference-nuclei", str(args.reference_nuclei), "--bf16", args.bf16]
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
    """tools/benchmark_peers.py in a child process (its table goes to stdout, its last line is
    one JSON object); {} with one line saying why when it cannot run."""
    venv = os.path.abspath(os.path.expanduser(args.peers_venv))
    if not os.path.isfile(PEERS_TOOL):
        print(f"[benchmark] peers skipped: {PEERS_TOOL} does not exist", file=sys.stderr)
        return {}
    if not os.path.isfile(os.path.join(venv, "bin", "python")):
        print(
            f"[benchmark] peers skipped: no virtualenv at {venv} (no bin/python)", file=sys.stderr
        )
        return {}
    cmd = [sys.executable, PEERS_TOOL, "--peers-venv", venv]
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
    keys = [f"infer_{n}{d}_s" for n in (100, 500) for d in ("", "_bf16", "_bf16_decoder")]
    keys += PEER_KEYS
    return {k: r[k] / base for k in keys if isinstance(r.get(k), (int, float))}


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
    peers = run_peers(args) if args.peers_venv else {}

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
    r["train_step_uncached_ratio"] = r["train_step_uncached_s"] / e
    for n in (10, 100, 500):
        r[f"infer_{n}_ratio"] = r[f"infer_{n}_s"] / e
    for key in ("encoder_bf16", "infer_100_bf16", "infer_500_bf16"):
        r[f"{key}_ratio"] = r[f"{key}_s"] / e if r[f"{key}_s"] is not None else None
    for n in (100, 500):
        r[f"infer_{n}_bf16_decoder_ratio"] = r[f"infer_{n}_bf16_decoder_s"] / e
    r["encoder_bf16_cosine"] = enc.get("encoder_bf16_cosine")
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
    bf16_rows = [("encoder forward, bfloat16", "encoder_bf16")]
    for n in (100, 500):
        bf16_rows.append((f"inference, {n} nuclei, bfloat16 decoder", f"infer_{n}_bf16_decoder"))
        bf16_rows.append((f"inference, {n} nuclei, bfloat16 model", f"infer_{n}_bf16"))
    for name, key in bf16_rows:
        seconds = r[key + "_s"]
        if seconds is None:
            why = "no native bfloat16 here" if args.bf16 == "auto" else f"--bf16 {args.bf16}"
            print(f"| {name} | not measured ({why}) | | | - |")
        else:
            print(f"| {name} | {seconds:.2f} | {seconds / e:.2f} | | - |")
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
    for name in ("infer_10", "infer_100", "infer_500") + tuple(
        f"infer_{n}_bf16{d}" for n in (100, 500) for d in ("_decoder", "")
    ):
        p = inf.get(f"{name}_parts")
        if p is None:
            continue
        rest = r.get(f"{name}_s", inf.get(f"{name}_s")) - sum(v for v in p.values() if v)
        text = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if v is not None)
        print(f"{name} parts (s): {text}, rest {rest:.2f}")
    if r.get("encoder_bf16_cosine") is not None:
        print(f"bfloat16 encoder vs float32: cosine {r['encoder_bf16_cosine']:.6f}")
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
    ratios = r.get("ratio_to_sam_predictor_100")
    if ratios:
        print(
            f"Time per image over segment-anything's predictor with 100 boxes "
            f"({r['sam_predictor_100_s']:.2f} s):"
        )
        names = {
            "infer_100_s": "DES-SAM float32, 100 nuclei",
            "infer_500_s": "DES-SAM float32, 500 nuclei",
            "infer_100_bf16_s": "DES-SAM bfloat16, 100 nuclei",
            "infer_500_bf16_s": "DES-SAM bfloat16, 500 nuclei",
            "infer_100_bf16_decoder_s": "DES-SAM bfloat16 decoder only, 100 nuclei",
            "infer_500_bf16_decoder_s": "DES-SAM bfloat16 decoder only, 500 nuclei",
            "sam_predictor_100_s": "segment-anything predictor, 100 boxes",
            "sam_predictor_500_s": "segment-anything predictor, 500 boxes",
            "microsam_ais_s": "micro-sam automatic instance segmentation",
            "cellpose_sam_s": "Cellpose-SAM",
        }
        for k, v in ratios.items():
            rss = r.get(k[: -len("_s")] + "_rss_gb")
            extra = f", peak RSS {rss:.2f} GB" if isinstance(rss, (int, float)) else ""
            print(f"  {names.get(k, k)}: {r[k]:.2f} s, {v:.2f}x{extra}")
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
        "tools/benchmark_peers.py",
    )
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
    if args.phase:
        run_phase(args)
    else:
        main_parent(args)
