"""The tools' error policy and start-up (cli.py, errors.py): a UserError is one line and exit 2, a
bug keeps its traceback; every tool parses its arguments before importing torch."""

import argparse
import glob
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from dessam_d2 import errors
from dessam_d2.cli import add_launch_arguments, launch_error, launch_flags

BUG = """
from dessam_d2.cli import run_cli
def main():
    {}
run_cli(main)
"""


def run(body):
    return subprocess.run(
        [sys.executable, "-c", BUG.format(body)], capture_output=True, text=True, cwd=ROOT
    )


def test_every_error_raised_on_purpose_is_a_user_error_and_keeps_its_builtin_type():
    classes = [getattr(errors, n) for n in errors.__all__ if n[0].isupper()]
    assert len(classes) >= 15
    for cls in classes:
        assert issubclass(cls, errors.UserError), cls
    assert issubclass(errors.ImageNotFoundError, FileNotFoundError)
    assert issubclass(errors.NonFiniteError, FloatingPointError)
    assert issubclass(errors.ConfigError, ValueError)


def test_a_user_error_is_one_line_and_exit_2():
    proc = run("from dessam_d2.errors import ConfigError; raise ConfigError('a.yaml: bad key X')")
    assert proc.returncode == 2
    assert proc.stderr == "error: a.yaml: bad key X\n"


def test_a_bug_keeps_its_traceback():
    proc = run("raise ValueError('a bug in our code')")
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "ValueError: a bug in our code" in proc.stderr
    proc = run("raise FileNotFoundError('not a user error either')")
    assert proc.returncode == 1 and "Traceback" in proc.stderr


def test_a_failed_child_run_passes_its_status_on():
    proc = run("from dessam_d2.errors import RunFailedError; raise RunFailedError('see log', 3)")
    assert proc.returncode == 3 and proc.stderr == "error: see log\n"


HELP = """
import runpy, sys
sys.argv = [{tool!r}, "--help"]
try:
    runpy.run_path({tool!r}, run_name="__main__")
except SystemExit:
    pass
print("TORCH" if "torch" in sys.modules else "NO TORCH", file=sys.stderr)
"""


@pytest.mark.parametrize(
    "tool",
    sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "tools", "*.py"))),
)
def test_help_answers_without_importing_torch(tool):
    proc = subprocess.run(
        [sys.executable, "-c", HELP.format(tool=tool)], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "NO TORCH", tool


def test_several_machines_need_the_address_of_machine_0():
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    assert launch_error(parser.parse_args(["--num-gpus", "4"])) is None
    assert "--dist-url tcp://" in launch_error(parser.parse_args(["--num-machines", "2"]))
    assert launch_error(parser.parse_args(["--num-gpus", "0"])) is not None
    assert launch_error(parser.parse_args(["--num-machines", "2", "--machine-rank", "2"]))


def test_only_the_launch_options_given_reach_a_child_run():
    parser = argparse.ArgumentParser()
    add_launch_arguments(parser)
    assert launch_flags(parser.parse_args([])) == []
    args = parser.parse_args(["--num-gpus", "4", "--machine-rank", "1", "--num-machines", "2"])
    assert launch_flags(args) == ["--num-gpus", "4", "--num-machines", "2", "--machine-rank", "1"]


def test_the_prediction_tools_dtype_is_auto_unless_asked_and_a_config_override_wins():
    import importlib.util

    from dessam_d2.cli import PRECISIONS
    from dessam_d2.config import CHOICES, load_config, precision_opts

    assert set(PRECISIONS) == set(CHOICES["MODEL.DESSAM.INFERENCE_DTYPE"])
    for tool in ("predict", "boxes_to_masks"):
        spec = importlib.util.spec_from_file_location(tool, os.path.join(ROOT, f"tools/{tool}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        required = ["--config-file", "c.yaml", "--output", "o"]
        required += ["--input", "i.png"] if tool == "predict" else ["--annotations", "a.json"]
        required += [] if tool == "predict" else ["--image-root", "."]
        assert module.parse_args(required).dtype == "auto"
        assert module.parse_args(required + ["--dtype", "int8"]).dtype == "int8"
    paper = os.path.join(ROOT, "configs/dessam_clusterseg.yaml")
    assert load_config(paper).MODEL.DESSAM.INFERENCE_DTYPE == "float32"  # evaluation: the paper's
    cfg = load_config(paper, precision_opts("auto"))
    assert (cfg.MODEL.DESSAM.INFERENCE_DTYPE, cfg.MODEL.DESSAM.DECODER_INFERENCE_DTYPE) == (
        "auto",
        "auto",
    )
    user = ["MODEL.DESSAM.INFERENCE_DTYPE", "float32"]
    assert load_config(paper, precision_opts("auto") + user).MODEL.DESSAM.INFERENCE_DTYPE == (
        "float32"
    )
