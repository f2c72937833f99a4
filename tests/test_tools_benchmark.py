"""tools/benchmark.py's plumbing, on the tiny model: the parts of a run come from the model's own
profiler labels, and the peer tool is merged in or skipped with one line."""

import json
import os
import sys

import pytest
import torch
from conftest import ROOT, synthetic_input, tiny_cfg
from detectron2.modeling import build_model

sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402


def test_the_parts_of_an_inference_come_from_the_model_labels(one_thread):
    torch.manual_seed(0)
    opts = {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "TEST.DETECTIONS_PER_IMAGE": 3}
    model = build_model(tiny_cfg(**opts)).eval()
    with torch.no_grad():
        out, parts = benchmark.labelled(lambda: model([synthetic_input(0)]))
    assert len(out[0]["instances"]) == 3
    for part in benchmark.INFER_PARTS:
        assert parts[part] > 0, parts
    inner = [f"decoder/block{i}" for i in range(2)] + ["decoder/upscaling"]
    assert all(parts[k] > 0 for k in inner + ["decoder/shared_image_side"]), parts
    # The labelled parts are disjoint and lie within the run.
    assert sum(parts[p] for p in benchmark.INFER_PARTS) < 10


def args(venv):
    return benchmark.parse_args(["--peers-venv", str(venv), "--threads", "1", "--repeats", "1"])


def test_peers_are_skipped_with_one_line_when_the_tool_or_the_venv_is_missing(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(benchmark, "PEERS_TOOL", str(tmp_path / "missing.py"))
    assert benchmark.run_peers(args(tmp_path)) == {}
    assert capsys.readouterr().err.strip().count("\n") == 0
    tool = tmp_path / "peers.py"
    tool.write_text("print(1)\n")
    monkeypatch.setattr(benchmark, "PEERS_TOOL", str(tool))
    assert benchmark.run_peers(args(tmp_path / "no_venv")) == {}
    err = capsys.readouterr().err
    assert "no virtualenv" in err and err.strip().count("\n") == 0


def test_peer_figures_are_merged_and_set_against_sams_predictor(tmp_path, monkeypatch, capsys):
    figures = {"sam_predictor_100_s": 2.0, "sam_predictor_500_s": 6.0, "microsam_ais_s": 9.0}
    figures.update(cellpose_sam_s=4.0, cellpose_sam_rss_gb=1.5)
    tool = tmp_path / "peers.py"
    tool.write_text(
        "import sys\n"
        "assert sys.argv[1:3] == ['--peers-venv', %r]\n"
        "print('| peer | s |')\n"
        "print(%r)\n" % (str(tmp_path), json.dumps(figures))
    )
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    monkeypatch.setattr(benchmark, "PEERS_TOOL", str(tool))
    peers = benchmark.run_peers(args(tmp_path))
    assert peers == figures
    assert "| peer | s |" in capsys.readouterr().out
    r = {"infer_100_s": 3.0, "infer_500_s": 5.0, "infer_100_bf16_s": None, **peers}
    ratios = benchmark.peer_ratios(r)
    assert ratios["infer_100_s"] == pytest.approx(1.5) and ratios["cellpose_sam_s"] == 2.0
    assert "infer_100_bf16_s" not in ratios and ratios["sam_predictor_100_s"] == 1.0
