"""The limit each phase of ``python -m benchmarks.run`` could reach on this machine: its
multiply-adds, counted, over this machine's measured peak.

- ``count_inference``: fvcore's ``FlopCountAnalysis`` (through Detectron2's wrapper, which traces
  a model taking a list of dicts) of one inference where the detector keeps exactly N boxes, split
  by module into the benchmark's parts: encoder (``backbone.net``), pyramid (the rest of
  ``backbone``), RPN (``proposal_generator``), box head (``roi_heads`` less its mask head), mask
  decoder (``roi_heads.mask_head``: prompt encoder and SAM's decoder for the N boxes) and the
  rest. fvcore counts **one multiply-add as one flop**; every figure here is in multiply-adds
  (MACs), and a FLOP rate is 2 x MACs / s. Element-wise operations (GELU, softmax, norms) are not
  counted, as fvcore does not: they are a few per cent of a ViT's MACs.
- ``count_train_step``: the cached training step's forward (pyramid, RPN, box head, the teacher
  and the student decodes; no encoder) traced the same way in training mode; its backward is
  counted as 2x the forward of the trained parts (gradients of activations and of weights) and
  1x the student's decode (activations only: SAM's decoder is frozen, the gradient reaches the
  learnable tokens through it), the usual estimate for layers dominated by products.
- ``peak_macs``: this machine's peak for a dtype, on the benchmark's threads: the median rate
  of the encoder's own largest product (4096 tokens x 768 -> 3072, its MLP) over repeated runs.

fvcore's own handle for ``aten::matmul`` rejects 1-D operands and it has none for
``aten::baddbmm`` (the shared-work decoder's attention): both are counted here by their output
size times the contracted dimension.
"""

import math
import statistics
import time
from typing import Dict

PARTS = ("encoder", "pyramid", "rpn", "box_head", "mask_decoder", "rest")


def _matmul_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    return math.prod(get_shape(outputs[0])) * get_shape(inputs[0])[-1]


def _baddbmm_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    return math.prod(get_shape(outputs[0])) * get_shape(inputs[1])[-1]


def analysis(model, inputs):
    """Detectron2's FlopCountAnalysis of ``model(inputs)`` with the handles above, quiet."""
    from detectron2.utils.analysis import FlopCountAnalysis

    fca = FlopCountAnalysis(model, inputs)
    fca.set_op_handle("aten::matmul", _matmul_macs, "aten::baddbmm", _baddbmm_macs)
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca


def split_parts(by_module: Dict[str, int], total: int) -> Dict[str, int]:
    """The benchmark's parts from fvcore's per-module counts (module names under "model.")."""

    def m(name: str) -> int:
        return int(by_module.get("model." + name, 0))

    parts = {
        "encoder": m("backbone.net"),
        "pyramid": m("backbone") - m("backbone.net"),
        "rpn": m("proposal_generator"),
        "box_head": m("roi_heads") - m("roi_heads.mask_head"),
        "mask_decoder": m("roi_heads.mask_head"),
    }
    parts["rest"] = int(total) - sum(parts.values())
    return parts


def count_inference(model, inp) -> Dict[str, int]:
    """MACs of ``model([inp])`` (eval mode) per part, and "total"."""
    import torch

    model.eval()
    with torch.no_grad():
        fca = analysis(model, [inp])
        total = fca.total()
        parts = split_parts(fca.by_module(), total)
    return {**parts, "total": int(total)}


def count_train_step(model, inp) -> Dict[str, int]:
    """MACs of a cached training step: the traced forward per part, "forward" (without the
    encoder, whose embedding a cached step reads), "backward" (the module doc's estimate) and
    "total"."""
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage():
        fca = analysis(model, [inp])
        total = fca.total()
        parts = split_parts(fca.by_module(), total)
    trained = parts["pyramid"] + parts["rpn"] + parts["box_head"]
    student = parts["mask_decoder"] / 2  # the teacher's decode and the student's, same boxes
    backward = int(2 * trained + student)
    forward = int(total) - parts["encoder"]  # cached: the embedding is read, not computed
    return {**parts, "forward": forward, "backward": backward, "total": forward + backward}


def peak_macs(dtype_name: str, repeats: int = 20) -> float:
    """Multiply-adds per second of the encoder's MLP product (4096 x 768 @ 768 x 3072) in
    ``dtype_name`` on the current threads: the median of ``repeats`` runs after a warm-up."""
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4096, 768, generator=g).to(dtype)
    b = torch.randn(768, 3072, generator=g).to(dtype)
    with torch.no_grad():
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
    return 4096 * 768 * 3072 / statistics.median(times)


def limits(macs: Dict[str, float], rate: float) -> Dict[str, float]:
    """Seconds each count would take at ``rate`` MACs per second."""
    return {k: v / rate for k, v in macs.items()}
