"""What the command-line tools share: user errors end in one line and a non-zero exit."""

import logging
import sys
from typing import Callable

from detectron2.data.catalog import DatasetCatalog  # noqa: F401  (registered names for errors)

from .data.image_io import ImageReadError
from .modeling.checkpoint import SAMCheckpointError

# Errors caused by the user's files, configs or arguments: their message says what to do.
USER_ERRORS = (SAMCheckpointError, ImageReadError, FileNotFoundError, ValueError)


def run_cli(main: Callable, *args):
    """Run ``main(*args)``; a user error prints ``error: <message>`` and exits with status 2."""
    try:
        return main(*args)
    except USER_ERRORS as e:
        logging.getLogger("dessam_d2").debug("user error", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
