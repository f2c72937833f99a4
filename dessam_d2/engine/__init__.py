"""Training: Detectron2's DefaultTrainer with DES-SAM's data, evaluators, checkpointer and hooks.

The checkpointer lives in ``dessam_d2.modeling.checkpointer`` (predicting loads trained models
through it, without the trainer). ``Trainer`` and ``setup`` are imported on first use.
"""

__all__ = ["Trainer", "set_deterministic", "setup"]


def __getattr__(name):
    if name in ("Trainer", "set_deterministic", "setup"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
