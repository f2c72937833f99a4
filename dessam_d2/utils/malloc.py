"""glibc's allocator, tuned for the SAM encoder's large temporaries, from inside the process.

glibc's malloc hands every block above its mmap threshold (at most 32 MB) straight back to the
kernel when it is freed, so each SAM encoder forward maps and page-faults its large temporaries
(the global-attention maps alone are 12 x 4096 x 4096 floats) afresh. Serving them from the heap
(``M_MMAP_MAX`` 0) and never trimming it (``M_TRIM_THRESHOLD`` -1, i.e. unlimited) removes those
page faults (740k -> 49k per ViT-B forward) and speeds the forward up on a 2-core CPU (figures in
benchmarks/run.py, docs/PERFORMANCE.md), for about 1 GB more peak RSS.

``tune_malloc()`` sets both with ``mallopt`` through ctypes: nothing is re-executed and no
``MALLOC_*`` variable leaks into subprocesses. Call it first thing in each process, including
each rank that ``detectron2.engine.launch`` spawns (it is idempotent). Set
``DESSAM_MALLOC_TUNING=0`` to keep glibc's defaults; off glibc it does nothing.
"""

import ctypes
import ctypes.util
import os
import platform

__all__ = [
    "MALLOC_TUNING_SWITCH",
    "M_TRIM_THRESHOLD",
    "M_MMAP_MAX",
    "GLIBC_MALLOC_ENV",
    "tune_malloc",
]

MALLOC_TUNING_SWITCH = "DESSAM_MALLOC_TUNING"
# mallopt parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

# The same tuning for a process that cannot call tune_malloc (another tool's Python, e.g. the
# peers of benchmarks/peers.py): glibc reads these variables when the process starts.
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(64 << 30)}

_tuned = False


def tune_malloc() -> bool:
    """Tune glibc's malloc for this process (once); returns whether it is tuned."""
    global _tuned
    if _tuned:
        return True
    if os.environ.get(MALLOC_TUNING_SWITCH) == "0" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success
    _tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    return _tuned
