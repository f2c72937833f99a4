"""The summary ``python -m benchmarks.run`` prints: a Markdown table of the phases (seconds, times
the encoder's, peak RSS), where the time of each goes, how the decoders differ, the targets met
or missed and, with the peers, each figure over segment-anything's predictor with 100 boxes."""

import os
from typing import List

# The targets, in multiples of the encoder forward's time (peak RSS: of its peak RSS).
TARGET_RATIOS = {"train_step_cached": 1.5, "infer_100": 1.6, "infer_500": 3.0, "rss_500": 1.5}
PEER_NAMES = {
    "infer_100_s": "DES-SAM float32, 100 nuclei",
    "infer_500_s": "DES-SAM float32, 500 nuclei",
    "infer_100_bf16_s": "DES-SAM bfloat16, 100 nuclei",
    "infer_500_bf16_s": "DES-SAM bfloat16, 500 nuclei",
    "infer_100_int8_s": "DES-SAM int8 encoder, 100 nuclei",
    "infer_500_int8_s": "DES-SAM int8 encoder, 500 nuclei",
    "infer_100_bf16_decoder_s": "DES-SAM bfloat16 decoder only, 100 nuclei",
    "infer_500_bf16_decoder_s": "DES-SAM bfloat16 decoder only, 500 nuclei",
    "sam_predictor_100_s": "segment-anything predictor, 100 boxes",
    "sam_predictor_100_bf16_s": "segment-anything predictor, 100 boxes, bfloat16 autocast",
    "sam_predictor_500_s": "segment-anything predictor, 500 boxes",
    "microsam_ais_s": "micro-sam automatic instance segmentation",
    "cellpose_sam_s": "Cellpose-SAM",
}


def phase_table(r: dict, bf16: str) -> List[str]:
    e = r["encoder_s"]
    lines = ["| phase | seconds | x encoder | peak RSS GB |", "|---|---:|---:|---:|"]
    rows = [
        ("encoder forward (no grad)", "encoder"),
        ("train step, no cache (50 nuclei)", "train_step_uncached"),
        ("train step, cached embedding", "train_step_cached"),
        ("inference, 10 nuclei", "infer_10"),
        ("inference, 100 nuclei", "infer_100"),
        ("inference, 500 nuclei", "infer_500"),
    ]
    for name, key in rows:
        seconds = r[key + "_s"]
        rss = r[f"peak_rss_{key}_gb"]
        lines.append(f"| {name} | {seconds:.2f} | {seconds / e:.2f} | {rss:.2f} |")
    bf16_rows = [
        ("encoder forward, int8", "encoder_int8"),
        ("encoder forward, bfloat16", "encoder_bf16"),
        ("train step, cached, bfloat16 mixed precision", "train_step_cached_bf16"),
    ]
    for n in (100, 500):
        bf16_rows.append((f"inference, {n} nuclei, bfloat16 decoder", f"infer_{n}_bf16_decoder"))
        bf16_rows.append((f"inference, {n} nuclei, int8 encoder", f"infer_{n}_int8"))
        bf16_rows.append((f"inference, {n} nuclei, bfloat16 end to end", f"infer_{n}_bf16"))
    for name, key in bf16_rows:
        seconds = r.get(key + "_s")
        if seconds is None:
            why = "no native bfloat16 here" if bf16 == "auto" else f"--bf16 {bf16}"
            lines.append(f"| {name} | not measured ({why}) | | |")
        else:
            lines.append(f"| {name} | {seconds:.2f} | {seconds / e:.2f} | |")
    lines.append(f"| SAM decoder, ms per nucleus | {r['decoder_ms_per_nucleus']:.1f} | | |")
    return lines


def parts_lines(r: dict, unc: dict, cac: dict, inf: dict) -> List[str]:
    parts = []
    for name, d in (("uncached", unc), ("cached", cac)):
        for k in ("embeddings_s", "teacher_s", "student_fwd_s", "backward_s", "backward_mask_s",
                  "backward_detector_s"):  # fmt: skip
            if d.get(k) is not None:
                parts.append(f"{name} {k[:-2]} {d[k]:.2f}")
    for k, v in (r.get("train_step_cached_bf16_parts") or {}).items():
        if v is not None:
            parts.append(f"cached bfloat16 {k} {v:.2f}")
    prompts = f"teacher {cac['teacher_prompts']}, student {cac['student_prompts']}"
    lines = [f"Training step parts (s): {', '.join(parts)}; prompts: {prompts}"]
    for name in ("infer_10", "infer_100", "infer_500") + tuple(
        f"infer_{n}{d}" for n in (100, 500) for d in ("_bf16_decoder", "_int8", "_bf16")
    ):
        p = inf.get(f"{name}_parts")
        if p is None:
            continue
        rest = r.get(f"{name}_s", inf.get(f"{name}_s")) - sum(v for v in p.values() if v)
        text = ", ".join(f"{k} {v:.2f}" for k, v in p.items() if v is not None)
        lines.append(f"{name} parts (s): {text}, rest {rest:.2f}")
    return lines


def decoder_lines(dec: dict, reference_nuclei: int) -> List[str]:
    speeds = [
        f"{k[len('decoder_') : -len('_ms_per_nucleus')]} {v:.1f}"
        for k, v in dec.items()
        if k.endswith("_ms_per_nucleus")
    ]
    lines = ["Decoder ms per nucleus: " + ", ".join(speeds)]
    diffs = [
        f"{k[len('decoder_') :]} {v:.3g}" for k, v in dec.items() if k.endswith(("diff", "iou"))
    ]
    lines.append(
        f"Decoder vs segment-anything ({reference_nuclei} nuclei, |logit| max "
        f"{dec['decoder_logit_abs_max']:.3g}): " + ", ".join(diffs)
    )
    for name, parts in dec["decoder_breakdown"].items():
        text = ", ".join(f"{k} {v:.1f}" for k, v in parts.items())
        lines.append(f"Decoder {name}, ms per nucleus: {text}")
    return lines


def accuracy_lines(r: dict) -> List[str]:
    """Each fast precision against float32: per-nucleus mask IoU (median) and the demo's AJI."""
    if "mask_iou_vs_float32" not in r:
        return []
    lines = [
        f"Fast precision here: {r['fast_precision']}; per-nucleus mask IoU against float32, "
        f"median: {r['mask_iou_vs_float32_median']:.4f} ({r['mask_iou_vs_float32_source']}; "
        "bound >= 0.98)"
    ]
    for dtype, ious in r["mask_iou_vs_float32"].items():
        demo = f"{ious['demo']:.4f}" if ious["demo"] is not None else "not measured"
        lines.append(
            f"  {dtype}: mask IoU median, ViT-B random weights {ious['vit_b_random']:.4f}, demo "
            f"model {demo}"
        )
    changes = r.get("demo_aji_change_vs_float32")
    if changes:
        lines.append(
            "Demo AJI change against float32 (points; bound within 1): "
            + ", ".join(
                f"{k.replace('dessam_synthetic_', '')} {v:+.2f}" for k, v in changes.items()
            )
        )
    elif r.get("demo_accuracy_skipped"):
        lines.append(f"Demo accuracy not measured: {r['demo_accuracy_skipped']}")
    return lines


def target_line(r: dict) -> str:
    checks = [
        ("cached train step", r["train_step_cached_ratio"], TARGET_RATIOS["train_step_cached"]),
        ("inference 100", r["infer_100_ratio"], TARGET_RATIOS["infer_100"]),
        ("inference 500", r["infer_500_ratio"], TARGET_RATIOS["infer_500"]),
        ("peak RSS 500 / encoder", r["peak_rss_infer_500_ratio"], TARGET_RATIOS["rss_500"]),
    ]
    verdicts = [f"{n} {v:.2f} <= {t} {'met' if v <= t else 'MISSED'}" for n, v, t in checks]
    return "Targets (x encoder): " + ", ".join(verdicts)


def peer_lines(r: dict) -> List[str]:
    ratios = r.get("ratio_to_sam_predictor_100")
    if not ratios:
        return []
    lines = [
        f"Time per image over segment-anything's predictor with 100 boxes "
        f"({r['sam_predictor_100_s']:.2f} s):"
    ]
    for k, v in ratios.items():
        rss = r.get(k[: -len("_s")] + "_rss_gb")
        extra = f", peak RSS {rss:.2f} GB" if isinstance(rss, (int, float)) else ""
        lines.append(f"  {PEER_NAMES.get(k, k)}: {r[k]:.2f} s, {v:.2f}x{extra}")
    same = r.get("ratio_to_sam_predictor_100_same_precision") or {}
    if same:
        lines.append(
            "DES-SAM 100 nuclei over the predictor given the same 100 boxes, same precision "
            "(target <= 0.7): " + ", ".join(f"{p} {v:.2f}x" for p, v in same.items())
        )
    return lines


def limit_lines(r: dict) -> List[str]:
    """Each phase's time against its limit (multiply-adds / this machine's peak rate)."""
    if "limits_s" not in r:
        return []
    lims, macs = r["limits_s"], r["macs"]
    peak16 = r.get("peak_gflops_bfloat16")
    lines = [
        "",
        f"Peak (the encoder's MLP product, {r['threads']} threads): float32 "
        f"{r['peak_gflops_float32']:.0f} GFLOP/s"
        + (f", bfloat16 {peak16:.0f} GFLOP/s" if peak16 else ", bfloat16 not native")
        + f"; {r['macs_convention']}",
        "| phase | seconds | GMACs | limit s | x limit |",
        "|---|---:|---:|---:|---:|",
    ]
    rows = [
        ("encoder forward, float32", r["encoder_s"], macs["infer_100"]["encoder"], "encoder"),
        ("train step, cached, float32", r["train_step_cached_s"], macs["train_cached"]["total"],
         "train_step_cached"),
    ]  # fmt: skip
    if "train_step_cached_bf16" in lims:
        rows.append(("train step, cached, bfloat16", r["train_step_cached_bf16_s"],
                     macs["train_cached"]["total"], "train_step_cached_bf16"))  # fmt: skip
    for n in (100, 500):
        rows.append((f"inference, {n} nuclei, float32", r[f"infer_{n}_s"],
                     macs[f"infer_{n}"]["total"], f"infer_{n}"))  # fmt: skip
        if f"infer_{n}_bf16" in lims:
            rows.append((f"inference, {n} nuclei, bfloat16", r[f"infer_{n}_bf16_s"],
                         macs[f"infer_{n}"]["total"], f"infer_{n}_bf16"))  # fmt: skip
    for name, seconds, count, key in rows:
        limit = lims[key]
        lines.append(
            f"| {name} | {seconds:.2f} | {count / 1e9:.1f} | {limit:.2f} | {seconds / limit:.2f} |"
        )
    parts = macs["infer_100"]
    lines.append(
        "MACs of inference with 100 nuclei by part (G): "
        + ", ".join(f"{k} {parts[k] / 1e9:.1f}" for k in parts if k != "total")
    )
    step = macs["train_cached"]
    lines.append(
        f"Cached training step (G): forward {step['forward'] / 1e9:.1f} (no encoder), backward "
        f"{step['backward'] / 1e9:.1f} (estimated: 2x the trained parts, 1x the student decode)"
    )
    return lines


def format_report(
    r: dict, phases: dict, threads: int, repeats: int, bf16: str, reference_nuclei: int
) -> str:
    """The summary of the figures ``r`` (``run.collect``'s) and of each phase's own output
    (``phases``: "train_uncached", "train_cached", "infer", "decoder")."""
    unc, cac = phases["train_uncached"], phases["train_cached"]
    inf, dec = phases["infer"], phases["decoder"]
    lines = [
        f"DES-SAM CPU benchmark: ViT-B random weights, 1024^2, {threads} threads, "
        f"median of {repeats} after a warm-up; load average {os.getloadavg()[0]:.1f}; "
        f"malloc {r['malloc']}"
    ]
    lines += phase_table(r, bf16) + [""] + parts_lines(r, unc, cac, inf)
    if r.get("encoder_bf16_cosine") is not None:
        lines.append(f"bfloat16 encoder vs float32: cosine {r['encoder_bf16_cosine']:.6f}")
    if r.get("encoder_int8_cosine") is not None:
        lines.append(f"int8 encoder vs float32: cosine {r['encoder_int8_cosine']:.6f}")
    lines += accuracy_lines(r)
    lines += decoder_lines(dec, reference_nuclei)
    changes = r["fp16_cache_loss_rel_change"]
    lines.append(
        "float16 cache, relative change of the first step's losses: "
        + ", ".join(f"{k} {v:.1e}" for k, v in changes.items())
    )
    lines += limit_lines(r)
    lines.append(target_line(r))
    lines += peer_lines(r)
    lines.append(f"Total benchmark wall time {r['wall_s']:.0f} s")
    return "\n".join(lines)
