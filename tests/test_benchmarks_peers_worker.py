"""benchmarks/peers_worker.py: one peer in a process of its own, importing only numpy, torch and
the peer; its arguments, its timing loop and its JSON line."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from benchmarks import peers_worker as pw


def test_it_imports_nothing_of_the_repository():
    """Run by its path, as the driver runs it in the peers' venv: --help needs only argparse."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['peers_worker.py', '--help']\n"
        "try:\n"
        "    runpy.run_path('benchmarks/peers_worker.py', run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('dessam_d2', 'benchmarks')]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "cellpose_sam_fp32" in proc.stdout  # the peers it knows


def test_arguments():
    args = pw.parse_args(["microsam_ais", "--inputs", "d", "--threads", "1", "--warmup", "0"])
    assert (args.name, args.inputs, args.threads, args.repeats, args.warmup) == (
        "microsam_ais",
        "d",
        1,
        3,
        0,
    )
    for bad in (["nnunet", "--inputs", "d"], ["cellpose_sam"]):
        with pytest.raises(SystemExit) as exc:
            pw.parse_args(bad)
        assert exc.value.code == 2
    assert set(pw.PARTS) == set(pw.PEERS)
    with pytest.raises(ValueError, match="unknown peer"):
        pw.build("nnunet", "d")


def test_a_peer_is_warmed_up_then_timed_and_reported_on_one_line(monkeypatch, capsys, one_thread):
    calls = []

    def fake_build(name, inputs):
        assert (name, inputs) == ("sam_predictor_100", "d")
        return lambda: calls.append(1) or {"encoder": 0.1, "decoder": 0.2}

    monkeypatch.setattr(pw, "build", fake_build)
    assert pw.main(["sam_predictor_100", "--inputs", "d", "--threads", "1", "--repeats", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(calls) == 3 and len(out["times"]) == 2 and out["threads"] == 1
    assert out["parts"] == [{"encoder": 0.1, "decoder": 0.2}] * 2
    assert out["rss_gb"] > 0 and out["build_s"] >= 0 and out["torch"]
