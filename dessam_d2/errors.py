"""The errors this package raises on purpose: each says in one line which file or setting is wrong
and what to do. Every tool prints them as ``error: <message>`` and exits with status 2
(``dessam_d2.cli``); any other exception is a bug and keeps its traceback.

Each class also derives from the built-in type a caller would expect (``ValueError``,
``FileNotFoundError``, ``FloatingPointError``), so ``except ValueError`` keeps working.
"""

__all__ = [
    "first_few",
    "UserError",
    "UsageError",
    "ConfigError",
    "InputNotFoundError",
    "ImageReadError",
    "ImageNotFoundError",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "EmptyDatasetError",
    "CNSegLayoutError",
    "ISBIFormatError",
    "SAMCheckpointError",
    "CheckpointError",
    "NonFiniteError",
    "SlideError",
    "RunFailedError",
]


def first_few(items, n: int = 3) -> str:
    """``a, b, c (+4 more)``: the start of a long list of names, for a one-line message."""
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(str(i) for i in items[:n]) + more


class UserError(Exception):
    """Base of every error caused by the user's files, config or arguments (or a diverged run).

    ``exit_code``: the status a tool ends with (2, ``dessam_d2.cli.EXIT_USER_ERROR``, unless a
    subclass passes on a child process's status)."""

    exit_code = 2


class UsageError(UserError, ValueError):
    """A command-line argument or function argument that cannot be used."""


class ConfigError(UsageError):
    """A config file or override that cannot be used."""


class InputNotFoundError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ImageReadError(UserError, ValueError):
    """An image file that is missing, unreadable or not an image."""


class ImageNotFoundError(ImageReadError, FileNotFoundError):
    """An image file that does not exist."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A registered data set whose converted files are not there (yet)."""


class DatasetFormatError(UserError, ValueError):
    """A data-set file that is not what its format requires (e.g. not COCO)."""


class EmptyDatasetError(UserError, ValueError):
    """A data set with no image (left) to train or evaluate on."""


class CNSegLayoutError(UserError, ValueError):
    """A CNSeg download whose folders are not laid out as the converter expects."""


class ISBIFormatError(UserError, ValueError):
    """An ISBI 2014 .mat file that does not hold the expected arrays."""


class SAMCheckpointError(UserError, ValueError):
    """An official SAM checkpoint that is missing, unreadable or of another variant."""


class CheckpointError(UserError, ValueError):
    """A trained model checkpoint that is missing, unreadable or does not fit the model."""


class NonFiniteError(UserError, FloatingPointError):
    """Training produced a NaN or infinite loss or parameter."""


class SlideError(UserError, ValueError):
    """A whole-slide image that cannot be opened or predicted as asked."""


class RunFailedError(UserError, RuntimeError):
    """A child training or evaluation run failed (it printed why); its message names the log to
    read, and the tool ends with the child's exit status."""

    def __init__(self, message: str, returncode: int):
        super().__init__(message)
        self.returncode = self.exit_code = returncode
