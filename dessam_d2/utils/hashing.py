"""Content hashes of tensors and modules: cache keys and cross-rank model checks."""

import hashlib
from typing import Iterable

import torch
from torch import nn

__all__ = ["tensor_digest", "module_fingerprint"]


def tensor_digest(t: torch.Tensor, h=None):
    """Feed a tensor's dtype, shape and bytes into a blake2b hash (a new one if h is None)."""
    h = h or hashlib.blake2b(digest_size=20)
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; the bytes are what matter
        t = t.view(torch.int16)
    h.update(memoryview(t.reshape(-1).numpy()).cast("B"))
    return h


def module_fingerprint(module: nn.Module, extra: Iterable[torch.Tensor] = ()) -> str:
    """A hash of every parameter and buffer of ``module`` (names, shapes, values) and ``extra``:
    equal for two modules (e.g. on two data-parallel ranks) iff they hold the same weights.

    Hashes all values, not a sample, so that fine-tuned or partially loaded weights never
    collide: ~0.5 s for ViT-B's 90M parameters, once per model and weight load.
    """
    h = hashlib.blake2b(digest_size=20)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        tensor_digest(t, h)
    for t in extra:
        tensor_digest(t, h)
    return h.hexdigest()
