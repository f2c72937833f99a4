"""The measured phases of ``python -m benchmarks.run``, each a function that builds its own model
(random weights) and returns its figures as a dict (seconds, ratios, peak RSS readings):

- ``phase_encoder``: SAM's encoder forward, float32 and (``bf16``) bfloat16 with its cosine to
  float32;
- ``phase_train``: a training step (forward, backward, SGD step), without or with the embedding
  cache, in float32 or (MODEL.DESSAM.TRAIN_DTYPE) bfloat16 mixed precision, and where its time
  goes;
- ``phase_infer``: inference per image where the detector keeps exactly N boxes, in float32,
  with the decoder in bfloat16 and (``bf16``) with the whole model in bfloat16;
- ``phase_accuracy``: each fast precision's masks and the demo's AJI against float32's
  (``benchmarks.accuracy``);
- ``phase_flops``: the multiply-adds of inference with N boxes and of the cached training step,
  per part, and this machine's peak rates (``benchmarks.flops``);
- ``phase_decoder``: SAM's decoder alone in ms per nucleus (segment-anything's MaskDecoder, this
  package's shared-work decoder in float32 and bfloat16), how far they differ, where its time goes.

Where the time goes is read from the model's own ``torch.profiler.record_function`` labels
("dessam/encoder", "dessam/pyramid", ...; see ``measure.labelled``).
"""

import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Sequence

from benchmarks.measure import (
    bf16_wanted,
    build_cfg,
    build_model,
    labelled,
    measure,
    median_of,
    native_bf16,
    peak_rss_gb,
    random_boxes,
    synthetic_input,
)

INFER_PARTS = ("encoder", "pyramid", "rpn", "box_head", "mask_decoder", "postprocess")


def phase_encoder(config_file: str, repeats: int, bf16: str = "auto") -> dict:
    import torch

    model = build_model(build_cfg(config_file)).eval()
    inp = synthetic_input(50, model.image_size, with_gt=False)
    images, _ = model.preprocess_image([inp])
    out = {}
    with torch.no_grad():
        out["encoder_s"], _ = measure(lambda: model.encode(images.tensor), repeats)
        ref = model.encode(images.tensor)
        model.int8_encoder()  # the quantised copy is made once per weights, not timed
        int8 = []
        out["encoder_int8_s"], _ = measure(
            lambda: int8.append(model.encode(images.tensor, torch.qint8)), repeats
        )
        out["encoder_int8_cosine"] = float(
            torch.nn.functional.cosine_similarity(int8[-1].flatten(), ref.flatten(), dim=0)
        )
        if bf16_wanted(bf16):
            outs = []
            # No warm-up when emulated: each forward takes minutes, the first one is no slower.
            t, _ = measure(
                lambda: outs.append(model.encode(images.tensor, torch.bfloat16)),
                repeats,
                native_bf16(),
            )
            emb = outs[-1]
            out["encoder_bf16_s"] = t
            out["encoder_bf16_cosine"] = float(
                torch.nn.functional.cosine_similarity(emb.flatten(), ref.flatten(), dim=0)
            )
            out["encoder_bf16_rel_err"] = float((emb - ref).norm() / ref.norm())
    return out


def phase_train(
    config_file: str, repeats: int, train_nuclei: int, cached: bool, dtype: str = "float32"
) -> dict:
    """``dtype``: MODEL.DESSAM.TRAIN_DTYPE ("bfloat16": mixed precision)."""
    import torch
    from detectron2.utils.events import EventStorage

    from dessam_d2.modeling.criterion import MASK_LOSSES

    cache_dir = tempfile.mkdtemp(prefix="dessam_bench_cache_") if cached else ""
    overrides = {"MODEL.DESSAM.EMBEDDING_CACHE_DIR": cache_dir, "MODEL.DESSAM.TRAIN_DTYPE": dtype}
    model = build_model(build_cfg(config_file, **overrides)).train()
    inp = synthetic_input(train_nuclei, model.image_size)
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
        # the mask losses' backward (student decoder, prompt tokens) apart from the detector's
        # (pyramid, RPN, box head): the same gradients as one backward of their sum
        mask = sum(v for k, v in losses.items() if k in MASK_LOSSES)
        detector = sum(v for k, v in losses.items() if k not in MASK_LOSSES)
        mask.backward(retain_graph=True)
        backward_mask = time.perf_counter() - t
        detector.backward()
        backward = time.perf_counter() - t
        opt.step()
        step_s = timing["s"] + time.perf_counter() - t  # the profiler's parsing left out
        split = {"backward_mask": backward_mask, "backward_detector": backward - backward_mask}
        return {"backward": backward, "step": step_s, **split, **parts}

    _, extras = measure(step, repeats)
    out = {
        "step_s": median_of(extras, "step"),
        "embeddings_s": median_of(extras, "encoder"),
        "teacher_s": median_of(extras, "teacher"),
        "student_fwd_s": median_of(extras, "student"),
        "backward_s": median_of(extras, "backward"),
        "backward_mask_s": median_of(extras, "backward_mask"),
        "backward_detector_s": median_of(extras, "backward_detector"),
        "teacher_prompts": counts.get("teacher", 0),
        "student_prompts": counts.get("student", 0),
        "first_losses": losses_first,
    }
    if cached:
        out["cache"] = model.embedding_cache.stats()
        shutil.rmtree(cache_dir, ignore_errors=True)
    return out


def phase_infer(
    config_file: str, repeats: int, infer_nuclei: Sequence[int], bf16: str = "auto"
) -> dict:
    """Inference on one image where the detector keeps exactly N boxes, for each N of
    ``infer_nuclei`` in increasing order, in one process and on one model (the cap on detections
    is set per N): one warm-up for all.

    Peak RSS readings are max-so-far: each is that N's own peak only because a larger N needs
    more memory. The full run measures 500 in a process of its own.
    """
    import torch

    sizes = sorted(infer_nuclei)
    overrides = {
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
        "MODEL.ROI_HEADS.NMS_THRESH_TEST": 1.0,  # keep every box
        "TEST.DETECTIONS_PER_IMAGE": sizes[-1],
        "MODEL.RPN.POST_NMS_TOPK_TEST": max(1000, sizes[-1]),
    }
    model = build_model(build_cfg(config_file, **overrides)).eval()
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

    model.set_detections_per_image(sizes[0])
    run()  # warm-up of the process
    out = {}
    # (nuclei, MODEL.DESSAM.INFERENCE_DTYPE, DECODER_INFERENCE_DTYPE, name suffix)
    runs = [(n, "float32", "float32", "") for n in sizes]
    # The fast paths after the float32 runs, so that the peak RSS readings stay float32's: the
    # decoder alone in bfloat16, the encoder in int8, then (--bf16) bfloat16 end to end (the
    # decoder following the model: what predict.py's --dtype auto runs where it is native).
    runs += [(n, "float32", "bfloat16", "_bf16_decoder") for n in sizes if n >= 100]
    runs += [(n, "int8", "auto", "_int8") for n in sizes if n >= 100]
    if bf16_wanted(bf16):
        runs += [(n, "bfloat16", "auto", "_bf16") for n in sizes if n >= 100]
    for n, model_dtype, decoder_dtype, suffix in runs:
        model.set_detections_per_image(n)
        model.set_inference_dtype(model_dtype, decoder=decoder_dtype)
        # One run under the profiler for the parts (also this setting's warm-up), then the timed
        # runs without it.
        parts = run_labelled()
        times = []
        for _ in range(repeats):
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
        head.set_decoding(fast=fast)
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


def phase_decoder(
    config_file: str,
    repeats: int,
    decoder_nuclei: int,
    reference_nuclei: int,
    chunk_sizes: Sequence[int] = (),
) -> dict:
    """SAM's decoder alone (student prompts, no grad): ms per nucleus, ours against
    segment-anything's on ``reference_nuclei`` boxes, and for each of ``chunk_sizes``."""
    import torch

    model = build_model(build_cfg(config_file)).eval()
    head = model.mask_head
    enc = model.image_encoder  # SAM's embedding: 256 x 64 x 64 for 1024 px
    emb = torch.randn(1, enc.out_chans, enc.embed_size, enc.embed_size)
    out = {}
    boxes = random_boxes(decoder_nuclei, model.image_size)
    chunk_size = head.set_decoding()["chunk_size"]  # the config's (changes nothing)
    variants = [("fast_fp32", True, "float32", chunk_size)]
    variants.append(("fast_bf16", True, "bfloat16", chunk_size))
    variants.append(("reference", False, "float32", chunk_size))
    variants += [(f"fast_fp32_chunk{c}", True, "float32", c) for c in chunk_sizes]
    ref = {}
    for name, fast, dtype, chunk in variants:
        head.set_decoding(fast=fast, inference_dtype=dtype, chunk_size=chunk)
        nb = boxes if fast else boxes[:reference_nuclei]
        with torch.no_grad():
            t, _ = measure(lambda: head.decode(emb, nb, student=True), repeats)
            logits = head.decode(emb, boxes[:reference_nuclei], student=True)
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
    head.set_decoding(inference_dtype="float32", chunk_size=chunk_size)
    nb = boxes[:reference_nuclei]
    out["decoder_breakdown"] = decoder_breakdown(head, emb, nb, repeats)
    return out


def phase_flops(config_file: str, train_nuclei: int, infer_nuclei: Sequence[int]) -> dict:
    """Multiply-adds of inference with each N of ``infer_nuclei`` boxes and of the cached
    training step (``train_nuclei`` ground-truth boxes), per part, and the peak rates."""
    from benchmarks import flops

    out = {}
    for n in infer_nuclei:
        overrides = {
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0,
            "MODEL.ROI_HEADS.NMS_THRESH_TEST": 1.0,
            "TEST.DETECTIONS_PER_IMAGE": n,
            "MODEL.RPN.POST_NMS_TOPK_TEST": max(1000, n),
        }
        model = build_model(build_cfg(config_file, **overrides))
        inp = synthetic_input(50, model.image_size, with_gt=False)
        out[f"infer_{n}"] = flops.count_inference(model, inp)
    model = build_model(build_cfg(config_file))
    step = flops.count_train_step(model, synthetic_input(train_nuclei, model.image_size))
    out["train_cached"] = step
    out["peak_macs_float32"] = flops.peak_macs("float32")
    out["peak_macs_bfloat16"] = flops.peak_macs("bfloat16") if native_bf16() else None
    return out


def phase_accuracy(config_file: str, bf16: str = "auto") -> dict:
    """Per-nucleus mask IoU against float32 and the demo's AJI at each fast precision (int8,
    and bfloat16 where measured): ``benchmarks.accuracy``."""
    from benchmarks import accuracy

    dtypes = (["bfloat16"] if bf16_wanted(bf16) else []) + ["int8"]
    return {
        "dtypes": dtypes,
        "vit_b_random_mask_iou_median": accuracy.vitb_ious(config_file, dtypes),
        "demo": accuracy.demo_accuracy(dtypes),
    }
