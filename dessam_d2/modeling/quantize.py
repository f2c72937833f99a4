"""int8 inference of SAM's image encoder (MODEL.DESSAM.INFERENCE_DTYPE int8), for CPUs without
native bfloat16 (AVX2-only machines).

PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``) replaces each
``nn.Linear`` of a copy of the encoder (the attention's qkv and projection, the MLPs: nearly all
of its multiply-adds) by one with int8 weights, quantised per tensor once, and int8 activations,
quantised per call from their own range; products accumulate in int32 and the outputs are float32.
The patch embedding, the neck's convolutions, the layer norms and the attention's matrix products
stay float32, as do the pyramid, RPN, box head and mask decoder. The trained model is untouched:
the quantised copy is inference's alone and is rebuilt when the encoder's weights change.

PyTorch marks the eager quantisation API as deprecated in favour of torchao; it still ships and
is what runs here (its deprecation warnings are silenced at the call).
"""

import copy
import warnings

import torch
from torch import nn

__all__ = ["quantize_linear_int8"]


def quantize_linear_int8(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` whose ``nn.Linear`` layers are dynamically quantised to
    int8 (CPU only); ``module`` itself is not changed."""
    work = copy.deepcopy(module).cpu().eval()
    for p in work.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the API's and the quantised tensors' deprecation notes
        return torch.ao.quantization.quantize_dynamic(work, {nn.Linear}, dtype=torch.qint8)
