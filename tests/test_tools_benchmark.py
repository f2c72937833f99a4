"""tools/benchmark.py's plumbing, on the tiny model: the parts of a run come from the model's own
profiler labels, the peer tool is merged in or skipped with one line, every phase runs; and
tools/benchmark_slides.py's --writer-only."""

import json
import os
import sys

import pytest
import torch
from conftest import DEMO, ROOT, synthetic_input, tiny_cfg
from detectron2.modeling import build_model

sys.path.insert(0, os.path.join(ROOT, "tools"))
import benchmark  # noqa: E402
import benchmark_slides  # noqa: E402


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


def test_each_phase_runs_in_process_on_the_demo_model(one_thread, capsys):
    """The phases import what they use (no NameError when imported as a module) and follow the
    config's input size; the shared-work decoder matches segment-anything's in float32."""
    argv = ["--config-file", DEMO, "--threads", "1", "--repeats", "1", "--bf16", "never"]
    argv += ["--quick", "--decoder-nuclei", "4", "--reference-nuclei", "2", "--infer-nuclei", "3"]
    argv += ["--train-nuclei", "3"]
    results = {}
    for phase in ("encoder", "decoder", "infer", "train_cached"):
        benchmark.run_phase(benchmark.parse_args(argv + ["--phase", phase]))
        results[phase] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert results["encoder"]["encoder_s"] > 0 and results["encoder"]["peak_rss_gb"] > 0
    decoder = results["decoder"]
    assert decoder["decoder_fast_fp32_max_abs_diff"] < 1e-4
    assert decoder["decoder_fast_fp32_min_mask_iou"] == 1.0
    assert results["infer"]["infer_3_s"] > 0  # the detector kept exactly 3 boxes (else raises)
    train = results["train_cached"]
    assert (train["cache"]["misses"], train["cache"]["hits"]) == (1, 1)  # warm-up, timed step
    assert train["student_prompts"] > 0 and train["teacher_prompts"] == 3


def test_benchmark_slides_writer_only_writes_every_nucleus(tmp_path, capsys):
    """--writer-only on a 1024-px slide (one prediction tile of 16 x 16 discs): the JSON line
    counts 256 ids, and the label TIFF holds exactly ids 1..256."""
    import tifffile

    assert benchmark_slides.main(["--writer-only", "--sizes", "1024", "--work", str(tmp_path)]) == 0
    (result,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["writer"]
    assert result["label_tiff_px"] == "1024x1024" and result["ids"] == 256
    labels = tifffile.imread(tmp_path / "labels_1024.tif", level=0)
    assert labels.shape == (1024, 1024)
    assert sorted(set(labels.ravel().tolist())) == list(range(257))
