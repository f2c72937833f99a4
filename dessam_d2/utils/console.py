"""What the console shows of an error raised on purpose: one line, not a traceback.

Light (no torch, no Detectron2): the tools' error policy (``dessam_d2.cli``) and the library's
logging set-up (``dessam_d2.engine.setup``) both use it.
"""

import logging
import sys
from typing import Iterable

from ..errors import UserError

__all__ = ["hide_user_error_tracebacks", "one_line_message"]


def one_line_message(error: BaseException) -> str:
    """The error's message; for one re-raised by a DataLoader worker, the original message only.

    torch re-raises a worker's exception in the main process as the same type with the text
    "Caught X in DataLoader worker process N.\\nOriginal Traceback ...", whose last line is
    "<module>.X: <original message>".
    """
    text = str(error)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split("\n"))


class _HideUserErrorTracebacks(logging.Filter):
    # FloatingPointError: Detectron2's non-finite loss error, which the trainer turns into a
    # one-line NonFiniteError.
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (UserError, FloatingPointError))


def hide_user_error_tracebacks(logger_names: Iterable[str]) -> None:
    """Console handlers of these loggers drop records carrying a user error's traceback (e.g.
    Detectron2's "Exception during training:"); file handlers (log.txt) keep them."""
    for name in logger_names:
        for handler in logging.getLogger(name).handlers:
            stream = getattr(handler, "stream", None)
            if stream in (sys.stdout, sys.stderr) and not any(
                isinstance(f, _HideUserErrorTracebacks) for f in handler.filters
            ):
                handler.addFilter(_HideUserErrorTracebacks())
