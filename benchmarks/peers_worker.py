"""One peer of ``python -m benchmarks.peers`` in the peers' venv, in a process of its own:

    .venv-peers/bin/python benchmarks/peers_worker.py NAME --inputs DIR [--threads 2 ...]

builds the peer NAME (random weights) on the inputs ``benchmarks.peers`` saved in DIR
(image_N.npy, boxes_N.npy), runs it ``--warmup`` times untimed, then ``--repeats`` times, and
prints one JSON line: the seconds of each run, the parts of each, the peak RSS (``ru_maxrss``,
model building included) and the seconds the model took to build.

Run as a script by its path, never as part of the repository: it imports only the standard
library, numpy, torch and the peer's own package (segment-anything, micro-sam or Cellpose), which
the main venv need not have and the peers' venv has without this repository's packages.
"""

import argparse
import json
import os
import resource
import sys
import time

PEERS = [
    "sam_predictor_100",
    "sam_predictor_100_bf16",
    "sam_predictor_500",
    "microsam_ais",
    "cellpose_sam",
    "cellpose_sam_fp32",
]
PARTS = {
    "sam_predictor_100": ["encoder", "decoder"],
    "sam_predictor_100_bf16": ["encoder", "decoder"],
    "sam_predictor_500": ["encoder", "decoder"],
    "microsam_ais": ["encoder", "decoder", "postprocess"],
    "cellpose_sam": ["network", "masks"],
    "cellpose_sam_fp32": ["network", "masks"],
}
NUCLEI = (100, 500)
SAM_BATCH = 100  # boxes per predict_torch call, as segment-anything's README batches them


def _load(inputs: str, n: int):
    import numpy as np

    return np.load(os.path.join(inputs, f"image_{n}.npy")), np.load(
        os.path.join(inputs, f"boxes_{n}.npy")
    )


def build_sam_predictor(inputs: str, n: int, bfloat16: bool = False):
    """``bfloat16``: both steps under ``torch.autocast("cpu", torch.bfloat16)`` (segment-anything
    has no precision option of its own; autocast is how a user gets bfloat16 from it, and how
    DES-SAM runs it)."""
    import torch
    from segment_anything import SamPredictor, sam_model_registry

    image, boxes = _load(inputs, n)
    boxes = torch.from_numpy(boxes)
    predictor = SamPredictor(sam_model_registry["vit_b"](checkpoint=None).eval())

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            t0 = time.perf_counter()
            predictor.set_image(image)
            t1 = time.perf_counter()
            for i in range(0, len(boxes), SAM_BATCH):
                batch = boxes[i : i + SAM_BATCH]
                batch = predictor.transform.apply_boxes_torch(batch, image.shape[:2])
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


def build(name: str, inputs: str):
    """The peer ``name``'s run function (no arguments; returns its parts' seconds)."""
    if name == "sam_predictor_100_bf16":
        return build_sam_predictor(inputs, 100, bfloat16=True)
    if name.startswith("sam_predictor_"):
        return build_sam_predictor(inputs, int(name.rsplit("_", 1)[1]))
    if name == "microsam_ais":
        return build_microsam_ais(inputs)
    if name in ("cellpose_sam", "cellpose_sam_fp32"):
        return build_cellpose_sam(inputs, bfloat16=name == "cellpose_sam")
    raise ValueError(f"unknown peer {name!r}, not one of {PEERS}")


def time_runs(run, warmup: int, repeats: int):
    """``warmup`` untimed runs, then ``repeats`` timed: (seconds of each, parts of each)."""
    for _ in range(warmup):
        run()
    times, parts = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        parts.append(run())
        times.append(time.perf_counter() - t)
    return times, parts


def measure_peer(name: str, inputs: str, threads: int, repeats: int, warmup: int = 1) -> dict:
    """Builds the peer ``name``, runs it ``warmup`` times to warm up, then ``repeats`` times."""
    import numpy  # noqa: F401  (fails early and clearly in a venv without it)
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.no_grad():
        run = build(name, inputs)
        build_s = time.perf_counter() - t
        times, parts = time_runs(run, warmup, repeats)
    rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    out = {"times": times, "parts": parts, "rss_gb": rss_gb, "build_s": build_s}
    out["torch"] = torch.__version__
    out["threads"] = torch.get_num_threads()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("name", choices=PEERS, help="the peer to measure")
    p.add_argument("--inputs", required=True, help="folder of image_N.npy and boxes_N.npy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = measure_peer(args.name, args.inputs, args.threads, args.repeats, args.warmup)
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    # only numpy, torch and the peer: never this repository's packages or its other modules
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.exit(main())
