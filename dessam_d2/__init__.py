"""DES-SAM (MICCAI 2024) for Detectron2: box-supervised nucleus instance segmentation on SAM.

Importing the package is light; ``dessam_d2.add_dessam_config`` (or ``dessam_d2.config``) loads
Detectron2 and registers the DESSAM meta-architecture and its parts.
"""

__all__ = ["add_dessam_config"]


def __getattr__(name):
    if name == "add_dessam_config":
        from .config import add_dessam_config

        return add_dessam_config
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
