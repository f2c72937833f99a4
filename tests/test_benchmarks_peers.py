"""benchmarks/peers.py, the peers' driver, without the peers' venv: arguments, missing-venv
error, inputs, a failed peer's row, the workers' environment, and one real worker whose peer is
not installed."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from benchmarks import peers as bp


def test_arguments():
    args = bp.parse_args([])
    assert (args.peers_venv, args.threads, args.repeats, args.warmup) == (".venv-peers", 2, 3, 1)
    assert args.only is None and not args.default_malloc
    argv = "--peers-venv v --threads 1 --repeats 5 --only cellpose_sam microsam_ais"
    args = bp.parse_args(argv.split() + ["--default-malloc"])
    assert (args.peers_venv, args.threads, args.repeats) == ("v", 1, 5)
    assert args.only == ["cellpose_sam", "microsam_ais"] and args.default_malloc
    for bad in (["--only", "nnunet"], ["--threads", "0"], ["--warmup", "-1"]):
        with pytest.raises(SystemExit) as exc:
            bp.parse_args(bad)
        assert exc.value.code == 2


def test_missing_venv_is_one_line(tmp_path):
    missing = str(tmp_path / "no-such-venv")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.peers", "--peers-venv", missing],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bash scripts/setup_peers_env.sh" in lines[0], proc.stderr


def test_inputs_image_and_boxes(tmp_path):
    size = 192  # the benchmark uses 1024; the same code at a size that takes a second
    paths = bp.make_inputs(str(tmp_path), size=size)
    for n in bp.NUCLEI:
        image = np.load(paths[f"image_{n}"])
        boxes = np.load(paths[f"boxes_{n}"])
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        assert image.min() < 100 < 190 < image.max()  # dark nuclei on a pale background
        assert boxes.shape == (n, 4) and boxes.dtype == np.float32
        assert (boxes >= 0).all() and (boxes <= size).all()
        assert (boxes[:, 2:] > boxes[:, :2]).all()  # XYXY
        # nuclei's RGB colour (90, 50, 130) at each box centre: RGB order, boxes on the nuclei
        cx = ((boxes[:, 0] + boxes[:, 2]) / 2).astype(int)
        cy = ((boxes[:, 1] + boxes[:, 3]) / 2).astype(int)
        assert (image[cy, cx] == [90, 50, 130]).all(axis=1).mean() > 0.9


def test_failed_peer_is_null_and_worker_env(capsys):
    rows = {
        "sam_predictor_100": bp.summarize(
            "sam_predictor_100",
            {
                "times": [2.0, 1.0, 3.0],
                "parts": [{"encoder": 1.0, "decoder": 1.0}] * 3,
                "rss_gb": 1.5,
            },
        ),
        "cellpose_sam": {"error": "exit 1: ModuleNotFoundError: No module named 'cellpose'"},
    }
    args = bp.parse_args(["--threads", "2", "--repeats", "3"])
    out = bp.report(rows, args, {"model": "x", "avx512_bf16": False, "amx": False})
    json.dumps(out)
    assert out["sam_predictor_100_s"] == 2.0 and out["sam_predictor_100_rss_gb"] == 1.5
    assert out["cellpose_sam_s"] is None and out["cellpose_sam_rss_gb"] is None
    assert (out["threads"], out["repeats"]) == (2, 3)
    assert "No module named 'cellpose'" in capsys.readouterr().out
    env = bp.worker_env(3, default_malloc=False)
    assert env["OMP_NUM_THREADS"] == "3" and env["MALLOC_MMAP_MAX_"] == "0"
    assert "PYTHONPATH" not in env
    assert "MALLOC_MMAP_MAX_" not in bp.worker_env(1, default_malloc=True)


def test_a_worker_whose_peer_is_missing_fails_with_its_error(tmp_path):
    """The driver runs benchmarks/peers_worker.py by its path in a python without Cellpose (this
    venv's): the row is the worker's one-line error, and its log is kept beside the inputs."""
    pytest.importorskip("torch")
    try:
        import cellpose  # noqa: F401

        pytest.skip("Cellpose is installed here")
    except ImportError:
        pass
    args = bp.parse_args(["--threads", "1", "--repeats", "1", "--warmup", "0"])
    env = bp.worker_env(1, default_malloc=False)
    res = bp.run_peer("cellpose_sam_fp32", sys.executable, str(tmp_path), args, env)
    assert res == {"error": "exit 1: ModuleNotFoundError: No module named 'cellpose'"}
    assert "Traceback" in (tmp_path / "cellpose_sam_fp32.log").read_text()
