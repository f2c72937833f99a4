"""Inference precision (MODEL.DESSAM.INFERENCE_DTYPE) and training precision
(MODEL.DESSAM.TRAIN_DTYPE): the choices, what "auto" picks on a device, and int8 inference of SAM's
image encoder, for CPUs without native bfloat16 (AVX2-only machines).

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
from typing import Mapping, Optional

import torch
from torch import nn

from ..errors import ConfigError

__all__ = [
    "INFERENCE_DTYPES",
    "TRAIN_DTYPES",
    "cpu_has_native_bf16",
    "resolve_inference_dtype",
    "resolve_train_dtype",
    "quantize_linear_int8",
]

# "int8": SAM's encoder with its linear layers dynamically quantised (quantize_linear_int8), the
# rest in float32; torch.qint8 stands for it (no autocast).
INFERENCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.qint8}
# Training: bfloat16 is autocast (mixed precision); weights, gradients, optimiser state and the mask
# losses stay float32. No int8: quantised layers have no gradients.
TRAIN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# torch.cpu.get_capabilities() flags of a CPU that computes in bfloat16 natively (x86: AVX512-BF16,
# AMX; Arm: the BF16 and SVE-BF16 extensions). Elsewhere bfloat16 is emulated with float32
# arithmetic and conversions, which is slower than float32 (docs/PERFORMANCE.md: measured on AVX2).
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16", "sve_bf16")


def cpu_has_native_bf16(capabilities: Optional[Mapping] = None) -> bool:
    """Whether this CPU has bfloat16 arithmetic (``torch.cpu.get_capabilities()`` by default; a
    torch without that function counts as no)."""
    if capabilities is None:
        get = getattr(torch.cpu, "get_capabilities", None)
        capabilities = get() if get is not None else {}
    return any(bool(capabilities.get(flag)) for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_inference_dtype(setting: str, device) -> torch.dtype:
    """MODEL.DESSAM.INFERENCE_DTYPE on a device: "float32", "bfloat16", "int8" (CPU only:
    ``torch.qint8``), or "auto" = bfloat16 on CUDA (where supported) and on a CPU with native
    bfloat16, float32 elsewhere ("auto" never picks int8: it is opt-in)."""
    device = torch.device(device)
    if setting == "int8" and device.type != "cpu":
        raise ConfigError(
            f"MODEL.DESSAM.INFERENCE_DTYPE=int8 runs on a CPU only, not on {device.type}: use "
            "'auto' or 'bfloat16' there"
        )
    if setting in INFERENCE_DTYPES:
        return INFERENCE_DTYPES[setting]
    if setting != "auto":
        raise ConfigError(
            f"MODEL.DESSAM.INFERENCE_DTYPE={setting!r}: use 'auto', 'float32', 'bfloat16' or "
            "'int8'"
        )
    return torch.bfloat16 if _native_bf16(device) else torch.float32


def resolve_train_dtype(setting: str, device) -> torch.dtype:
    """MODEL.DESSAM.TRAIN_DTYPE on a device: "float32", "bfloat16" (autocast of the forward pass,
    the weights and the loss terms float32), or "auto" = bfloat16 where it is native (as
    ``resolve_inference_dtype``), float32 elsewhere."""
    if setting in TRAIN_DTYPES:
        return TRAIN_DTYPES[setting]
    if setting != "auto":
        raise ConfigError(
            f"MODEL.DESSAM.TRAIN_DTYPE={setting!r}: use 'auto', 'float32' or 'bfloat16' (int8 "
            "is for inference only)"
        )
    return torch.bfloat16 if _native_bf16(torch.device(device)) else torch.float32


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_native_bf16()


def quantize_linear_int8(module: nn.Module) -> nn.Module:
    """An eval-mode copy of ``module`` whose ``nn.Linear`` layers are dynamically quantised to
    int8 (CPU only); ``module`` itself is not changed."""
    work = copy.deepcopy(module).cpu().eval()
    for p in work.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the API's and the quantised tensors' deprecation notes
        return torch.ao.quantization.quantize_dynamic(work, {nn.Linear}, dtype=torch.qint8)
