"""Training: Detectron2's DefaultTrainer with DES-SAM's data, evaluators, checkpointer and hooks.

``checkpointer`` is light (inference loads trained models through it); ``Trainer`` and ``setup``
are imported on first use, so that inference does not load the training stack.
"""

from .checkpointer import DESSAMCheckpointer

__all__ = ["DESSAMCheckpointer", "Trainer", "set_deterministic", "setup"]


def __getattr__(name):
    if name in ("Trainer", "set_deterministic", "setup"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
