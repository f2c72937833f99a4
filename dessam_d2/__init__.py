"""DES-SAM (MICCAI 2024) for Detectron2: box-supervised nucleus instance segmentation on SAM.

Importing the package is light (no torch). ``dessam_d2.add_dessam_config(cfg)`` adds the config
keys (``dessam_d2.config``) and registers DES-SAM's model (``dessam_d2.modeling``) and the
built-in data sets (``dessam_d2.data.datasets``) with Detectron2, so that a script can go on with
Detectron2's own ``build_model`` and ``DatasetCatalog``.

Layers (each imports only the ones below it; tests/test_layering.py checks):
``recipes`` -> ``engine`` / ``inference`` -> ``modeling`` / ``data`` / ``evaluation`` ->
``config`` / ``errors`` / ``utils``; ``cli`` is for the tools only.
"""

__all__ = ["add_dessam_config"]


def add_dessam_config(cfg) -> None:
    """Every DES-SAM config key with the paper's default (``dessam_d2.config.add_dessam_config``),
    and DES-SAM's model parts and the built-in data sets registered with Detectron2."""
    from . import modeling  # noqa: F401  (importing it registers the model's parts)
    from .config import add_dessam_config as add_keys
    from .data import datasets  # noqa: F401  (importing it registers the data sets)

    add_keys(cfg)
