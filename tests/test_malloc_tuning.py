"""Tools re-run themselves once with glibc's malloc tuned, unless told not to."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dessam_d2.cli import GLIBC_MALLOC_ENV, MALLOC_TUNING_SWITCH

SCRIPT = (
    "import json, os, sys\n"
    "print('started', flush=True)\n"
    "from dessam_d2.cli import tune_malloc\n"
    "tune_malloc()\n"
    "names = ['MALLOC_MMAP_MAX_', 'MALLOC_TRIM_THRESHOLD_', 'DESSAM_MALLOC_TUNING']\n"
    "print(json.dumps({'env': {k: os.environ.get(k) for k in names}, 'argv': sys.argv[1:]}))\n"
)


def run(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in GLIBC_MALLOC_ENV}
    env.pop(MALLOC_TUNING_SWITCH, None)
    env.update(extra_env)
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, "--an-argument", "kept"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    lines = res.stdout.splitlines()
    return lines.count("started"), json.loads(lines[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is for glibc only")
def test_a_tool_reruns_once_with_the_tuned_allocator_and_its_arguments():
    starts, out = run({})
    assert starts == 2  # the first run, then the re-exec (which does not re-exec again)
    assert out["env"] == {**GLIBC_MALLOC_ENV, MALLOC_TUNING_SWITCH: "1"}
    assert out["argv"] == ["--an-argument", "kept"]


def test_the_switch_and_the_users_own_settings_are_respected():
    starts, out = run({MALLOC_TUNING_SWITCH: "0"})
    assert starts == 1 and out["env"]["MALLOC_MMAP_MAX_"] is None
    starts, out = run({"MALLOC_MMAP_MAX_": "7"})
    assert starts == 1
    assert out["env"]["MALLOC_MMAP_MAX_"] == "7" and out["env"]["MALLOC_TRIM_THRESHOLD_"] is None
