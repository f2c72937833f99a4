"""What the command-line tools share: user errors end in one line and a non-zero exit."""

import logging
import os
import platform
import sys
from typing import Callable, Iterable

from detectron2.data.catalog import DatasetCatalog  # noqa: F401  (registered names for errors)

from .checkpointing import CheckpointError, NonFiniteError
from .data.image_io import ImageReadError
from .modeling.checkpoint import SAMCheckpointError

# Errors caused by the user's files, configs or arguments (their message says what to do), and a
# diverged training run (its message names the iteration and the loss terms).
USER_ERRORS = (
    SAMCheckpointError,
    CheckpointError,
    ImageReadError,
    FileNotFoundError,
    ValueError,
    NonFiniteError,
)


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
        return not isinstance(error, USER_ERRORS + (FloatingPointError,))


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


# Exit status of every tool (train_net, predict, boxes_to_masks, the converters):
EXIT_DONE = 0  # every input was processed (or was already done by an earlier run)
EXIT_SOME_SKIPPED = 1  # finished, but some inputs failed; the summary counts them with reasons
EXIT_USER_ERROR = 2  # nothing done: a one-line "error: ..." names the file and the fix


def exit_status(done: int, failed: int) -> int:
    """The tools' exit status from the number of inputs done (now or by an earlier run) and the
    number that failed: 0 all done, 1 some failed, 2 every input failed (nothing done)."""
    if not failed:
        return EXIT_DONE
    return EXIT_SOME_SKIPPED if done else EXIT_USER_ERROR


def run_cli(main: Callable, *args):
    """Run ``main(*args)``; a user error prints ``error: <message>`` and exits with status 2
    (``EXIT_USER_ERROR``)."""
    try:
        return main(*args)
    except USER_ERRORS as e:
        logging.getLogger("dessam_d2").debug("user error", exc_info=True)
        print(f"error: {one_line_message(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


# glibc's malloc hands every block above its mmap threshold (at most 32 MB) straight back to the
# kernel when it is freed, so each SAM encoder forward maps and page-faults its large temporaries
# (the global-attention maps alone are 12 x 4096 x 4096 floats) afresh. Serving them from the
# heap and never trimming it halves the ViT-B encoder forward on this 2-core CPU (about 11 ->
# 5.6 s; see tools/benchmark.py) for about 1 GB more peak RSS. glibc reads these variables only
# at start-up, hence the re-exec.
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}
MALLOC_TUNING_SWITCH = "DESSAM_MALLOC_TUNING"


def tune_malloc() -> None:
    """Re-run this process with ``GLIBC_MALLOC_ENV`` set, once, on glibc systems.

    Nothing happens when ``DESSAM_MALLOC_TUNING=0``, when the user set either variable, or off
    glibc; the re-run sets ``DESSAM_MALLOC_TUNING=1``, so there is never a second re-exec. Call
    it first thing in a tool's ``__main__`` block (after parsing arguments: ``--help`` and usage
    errors then stay instant).
    """
    if os.environ.get(MALLOC_TUNING_SWITCH) in ("0", "1"):
        return
    if any(k in os.environ for k in GLIBC_MALLOC_ENV) or platform.libc_ver()[0] != "glibc":
        return
    env = {**os.environ, **GLIBC_MALLOC_ENV, MALLOC_TUNING_SWITCH: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
