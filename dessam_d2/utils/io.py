"""The package's one file writer: whatever it writes appears whole or not at all.

A file is written to a hidden temporary name in its final folder, flushed to disk and renamed
into place (``os.replace`` is atomic on POSIX), so a kill or a full disk leaves either the old
file or the complete new one, never a truncated file. Files get the permissions any new file
gets here (0666 less the umask, usually 0644), whatever they hold: checkpoints, converted data
sets, cache entries, evaluation results.
"""

import contextlib
import glob
import json
import os
import shutil
import tempfile
import time
from typing import IO, Any, Iterator, List

__all__ = [
    "TEMP_SUFFIX",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_copy",
    "remove_stale_temp_files",
]

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **kwargs) -> Iterator[IO]:
    """A file object (``mode`` "wb" or "w", ``kwargs`` as for ``open``) whose contents appear
    under ``path`` only once the ``with`` block ends without an exception."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes new files: mode 'wb' or 'w', not {mode!r}")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=TEMP_SUFFIX
    )
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide the file from the group
        # opened by name, so that f.name is a path (tifffile, for one, needs it)
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, indent=None) -> None:
    """JSON, compact by default (CNSeg's polygons make indented files several times larger)."""
    separators = (",", ":") if indent is None else None
    atomic_write_text(path, json.dumps(obj, indent=indent, separators=separators))


def atomic_copy(src: str, dst: str, link: bool = False) -> bool:
    """Copy ``src`` to ``dst`` atomically, or hard-link it when ``link`` and the file system
    allows; returns whether it linked."""
    if link:
        directory = os.path.dirname(os.path.abspath(dst))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(dst)}.{os.getpid()}{TEMP_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        try:
            os.link(src, tmp)
            os.replace(tmp, dst)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                os.remove(tmp)
    with open(src, "rb") as fin, atomic_open(dst) as fout:
        shutil.copyfileobj(fin, fout)
    return False


def remove_stale_temp_files(pattern: str, older_than_s: float = 0.0) -> List[str]:
    """Delete temporary files matching ``pattern`` (a glob) that a killed writer left behind,
    if older than ``older_than_s`` seconds (a live writer in another process may own a young
    one); returns the paths removed."""
    now = time.time()
    removed = []
    for path in sorted(glob.glob(pattern)):
        with contextlib.suppress(OSError):
            if now - os.path.getmtime(path) >= older_than_s:
                os.remove(path)
                removed.append(path)
    return removed
