"""Which trained weights a prediction tool loads (``dessam_d2.modeling.checkpointer.load_model``
loads them)."""

from ..errors import ConfigError


def resolve_weights(cfg, weights: str, random_weights: bool, config_file: str, flag: str) -> str:
    """The trained weights to load: ``weights``, else ``cfg.MODEL.WEIGHTS``. Neither is a user
    error (a model with random weights predicts noise and would not say so) unless
    ``random_weights`` (the tools' ``--random-weights``, for tests and benchmarks) is set."""
    weights = weights or cfg.MODEL.WEIGHTS
    if not weights and not random_weights:
        raise ConfigError(
            f"{config_file}: no trained weights (MODEL.WEIGHTS is empty and no --weights given): "
            f"pass {flag}, or --random-weights to run an untrained model"
        )
    return weights
