"""glibc's allocator is tuned in-process with mallopt: no re-exec, no MALLOC_* variables."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dessam_d2.utils.malloc import MALLOC_TUNING_SWITCH

# Reads glibc's own counters: with M_MMAP_MAX 0 a 64 MB block comes from the heap (arena), not
# from a fresh mmap, and with M_TRIM_THRESHOLD unlimited the heap is not trimmed after free.
SCRIPT = r"""
import ctypes, json, os, sys
print("started", flush=True)
from dessam_d2.cli import run_cli
from dessam_d2.utils.malloc import tune_malloc

class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)

def main():
    block = libc.malloc(64 << 20)
    mapped = libc.mallinfo2().hblkhd >= 64 << 20
    libc.free(block)
    kept = libc.mallinfo2().arena >= 64 << 20
    names = ["MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"]
    print(json.dumps({"tuned": tune_malloc(), "mmapped": mapped, "heap_kept": kept,
                      "env": {k: os.environ.get(k) for k in names}}))

run_cli(main)
"""


def run(extra_env):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop(MALLOC_TUNING_SWITCH, None)
    env.update(extra_env)
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True
    )
    lines = res.stdout.splitlines()
    return lines.count("started"), json.loads(lines[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only")
def test_a_tool_tunes_malloc_in_process_without_a_re_exec_or_environment_variables():
    starts, out = run({})
    assert starts == 1  # no second start: nothing is re-executed
    assert out["tuned"] and not out["mmapped"] and out["heap_kept"]
    assert out["env"] == {"MALLOC_MMAP_MAX_": None, "MALLOC_TRIM_THRESHOLD_": None}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only")
def test_the_switch_keeps_glibcs_defaults():
    starts, out = run({MALLOC_TUNING_SWITCH: "0"})
    assert starts == 1 and not out["tuned"]
    assert out["mmapped"]  # glibc's default: a 64 MB block is its own mapping
