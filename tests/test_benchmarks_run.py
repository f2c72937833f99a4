"""benchmarks/run.py, the driver: a phase runs in a fresh process and prints one JSON line, the
peers' figures are merged in or skipped with one line, the figures and ratios are collected from
the phases; every benchmarks module imports without torch and without output, stays under 400
lines and outside the package."""

import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import DEMO, ROOT

from benchmarks import report, run

MODULES = ["measure", "phases", "report", "run", "peers", "peers_worker", "slides", "flops"]


def test_every_module_imports_without_torch_or_output():
    code = (
        "import sys\n"
        f"for m in {MODULES!r}: __import__('benchmarks.' + m)\n"
        "heavy = [m for m in ('torch', 'detectron2', 'numpy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""


def test_the_benchmarks_stay_outside_the_package_and_under_400_lines():
    """No module of dessam_d2 imports benchmarks (nor do setup.py's packages include it), and no
    benchmarks module is over 400 lines."""
    for folder, _, files in os.walk(os.path.join(ROOT, "dessam_d2")):
        for name in (f for f in files if f.endswith(".py")):
            with open(os.path.join(folder, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    mods = [node.module or ""]
                else:
                    continue
                assert not any(m.split(".")[0] == "benchmarks" for m in mods), (folder, name)
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert 'find_packages(include=["dessam_d2", "dessam_d2.*"])' in f.read()
    for module in MODULES + ["__init__"]:
        with open(os.path.join(ROOT, "benchmarks", module + ".py")) as f:
            assert sum(1 for _ in f) <= 400, module


def test_a_phase_runs_in_a_fresh_process_and_prints_one_json_line(capsys):
    """What the driver does for each phase: ``python -m benchmarks.run --phase``, alone (no
    conftest's imports to register the model for it)."""
    argv = ["--config-file", DEMO, "--threads", "1", "--quick", "--bf16", "never"]
    out = run.child(run.parse_args(argv), "encoder")
    assert out["encoder_s"] > 0 and out["peak_rss_gb"] > 0
    assert "[benchmark] encoder done in" in capsys.readouterr().err


def args(venv):
    return run.parse_args(["--peers-venv", str(venv), "--threads", "1", "--repeats", "1"])


def test_peers_are_skipped_with_one_line_when_the_venv_is_missing_or_they_fail(
    tmp_path, monkeypatch, capsys
):
    assert run.run_peers(args(tmp_path / "no_venv")) == {}
    err = capsys.readouterr().err
    assert "no virtualenv" in err and err.strip().count("\n") == 0
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").write_text("")
    tool = tmp_path / "peers.py"
    tool.write_text("import sys\nprint('not json')\nsys.exit(1)\n")
    monkeypatch.setattr(run, "PEERS_COMMAND", [sys.executable, str(tool)])
    assert run.run_peers(args(tmp_path)) == {}
    assert "peers failed (exit 1), skipped" in capsys.readouterr().err


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
    monkeypatch.setattr(run, "PEERS_COMMAND", [sys.executable, str(tool)])
    peers = run.run_peers(args(tmp_path))
    assert peers == figures
    assert "| peer | s |" in capsys.readouterr().out
    r = {"infer_100_s": 3.0, "infer_500_s": 5.0, "infer_100_bf16_s": None, **peers}
    ratios = run.peer_ratios(r)
    assert ratios["infer_100_s"] == pytest.approx(1.5) and ratios["cellpose_sam_s"] == 2.0
    assert "infer_100_bf16_s" not in ratios and ratios["sam_predictor_100_s"] == 1.0
    # the same-precision pairs: float32 with float32, bfloat16 with bfloat16 where both ran
    assert run.same_precision_ratios(r) == {"float32": 1.5}
    r.update(infer_100_bf16_s=1.0, sam_predictor_100_bf16_s=4.0)
    assert run.same_precision_ratios(r) == {"float32": 1.5, "bfloat16": 0.25}


def phase_outputs():
    """What the phases return (figures invented), the peak RSS readings included."""
    losses = {"loss_cls": 1.0, "loss_distill": 0.5}
    train = {"teacher_prompts": 50, "student_prompts": 80, "first_losses": losses}
    train.update(embeddings_s=2.0, teacher_s=0.5, student_fwd_s=1.0, backward_s=3.0)
    train.update(backward_mask_s=1.25, backward_detector_s=1.75)
    enc = {
        "encoder_s": 4.0,
        "peak_rss_gb": 2.0,
        "encoder_int8_s": 2.0,
        "encoder_int8_cosine": 0.999,
    }
    unc = {**train, "step_s": 8.0, "peak_rss_gb": 3.0}
    cac = {**train, "step_s": 6.0, "peak_rss_gb": 2.5, "embeddings_s": None}
    cac["first_losses"] = {"loss_cls": 1.001, "loss_distill": 0.5}
    cac["cache"] = {"hits": 1, "misses": 1}
    inf = {"peak_rss_gb": 2.4}
    for n, s in ((10, 5.0), (100, 6.0), (500, 10.0)):
        inf[f"infer_{n}_s"], inf[f"peak_rss_infer_{n}_gb"] = s, 2.0 + n / 1000
        inf[f"infer_{n}_parts"] = {"encoder": 4.0, "mask_decoder": s - 4.5, "pyramid": None}
        if n >= 100:
            inf[f"infer_{n}_bf16_decoder_s"] = s - 1
            inf[f"infer_{n}_int8_s"] = s - 2
    dec = {"decoder_logit_abs_max": 3.0, "peak_rss_gb": 1.0}
    for name, ms in (("fast_fp32", 10.0), ("fast_bf16", 5.0), ("reference", 30.0)):
        dec[f"decoder_{name}_ms_per_nucleus"] = ms
    dec.update(decoder_fast_fp32_max_abs_diff=1e-6, decoder_fast_fp32_min_mask_iou=1.0)
    dec["decoder_breakdown"] = {"reference": {"total": 30.0}, "fast": {"total": 10.0}}
    return enc, unc, cac, inf, dec


def test_the_figures_and_their_ratios_to_the_encoder():
    a = run.parse_args(["--bf16", "never", "--threads", "2", "--repeats", "1"])
    enc, unc, cac, inf, dec = phase_outputs()
    r = run.summarize(a, enc, unc, cac, inf, dec, peers={})
    assert r["train_step_cached_ratio"] == 1.5 and r["infer_500_ratio"] == 2.5
    assert r["infer_100_bf16_decoder_ratio"] == 1.25 and r["infer_100_bf16_ratio"] is None
    assert r["infer_100_int8_ratio"] == 1.0 and r["encoder_int8_ratio"] == 0.5
    assert r["peak_rss_infer_500_ratio"] == 1.25 and r["decoder_ms_per_nucleus"] == 10.0
    assert r["fp16_cache_loss_rel_change"]["loss_cls"] == pytest.approx(1e-3)
    assert (r["threads"], r["repeats"], r["bf16_phases"]) == (2, 1, "never")
    assert "ratio_to_sam_predictor_100" not in r
    json.dumps(r)
    peers = {"sam_predictor_100_s": 12.0}
    r = run.summarize(a, enc, unc, cac, inf, dec, peers)
    assert r["ratio_to_sam_predictor_100"]["infer_100_s"] == 0.5


def test_arguments():
    a = run.parse_args([])
    assert (a.repeats, a.quick, a.bf16, a.phase) == (3, False, "auto", None)
    assert run.parse_args(["--quick"]).repeats == 1
    assert os.path.isfile(os.path.join(ROOT, a.config_file))


def flops_output(peak16=None):
    """What phase_flops returns (counts invented): 1e9 MACs a second in float32."""
    infer = {"encoder": 4e9, "pyramid": 1e9, "rpn": 0, "box_head": 0, "mask_decoder": 1e9}
    return {
        "infer_100": {**infer, "rest": 0, "total": 6e9},
        "infer_500": {**infer, "mask_decoder": 5e9, "rest": 0, "total": 10e9},
        "train_cached": {**infer, "rest": 0, "forward": 2e9, "backward": 1e9, "total": 3e9},
        "peak_macs_float32": 1e9,
        "peak_macs_bfloat16": peak16,
    }


def test_each_phase_is_set_against_its_limit_at_the_best_native_precision():
    a = run.parse_args(["--bf16", "never", "--threads", "2", "--repeats", "1"])
    r = run.summarize(a, *phase_outputs(), peers={})
    lim = run.limit_figures(r, flops_output())
    # infer_100: 6 s measured against 6e9 MACs at 1e9/s; the cached step: 6 s against 3 s
    assert lim["limit_ratio_infer_100"] == 1.0 and lim["limit_ratio_infer_500"] == 1.0
    assert lim["limit_ratio_train_step_cached"] == 2.0 and lim["limit_ratio_encoder_float32"] == 1
    assert lim["peak_gflops_float32"] == 2.0 and lim["peak_gflops_bfloat16"] is None
    r["infer_100_bf16_s"] = 4.0  # bfloat16 native at twice the rate: 3 s of limit
    lim = run.limit_figures(r, flops_output(peak16=2e9))
    assert lim["limit_ratio_infer_100"] == pytest.approx(4 / 3)
    assert lim["limit_ratio_infer_100_float32"] == 1.0
    assert lim["limit_ratio_infer_500"] == 1.0  # no bfloat16 time: float32's
    r.update(lim, wall_s=1.0)
    phases = dict(zip(("train_uncached", "train_cached", "infer", "decoder"), phase_outputs()[1:]))
    text = report.format_report(r, phases, 2, 1, "never", reference_nuclei=16)
    assert "| inference, 100 nuclei, bfloat16 | 4.00 | 6.0 | 3.00 | 1.33 |" in text


def test_the_bfloat16_training_step_is_set_against_the_bfloat16_limit():
    a = run.parse_args(["--bf16", "always", "--threads", "2", "--repeats", "1"])
    enc, unc, cac, inf, dec = phase_outputs()
    r = run.summarize(a, enc, unc, cac, inf, dec, peers={})
    assert r["train_step_cached_bf16_s"] is None and r["train_bf16_speedup"] is None
    lim = run.limit_figures(r, flops_output(peak16=2e9))
    assert lim["limit_ratio_train_step_cached"] == lim["limit_ratio_train_step_cached_float32"]
    assert "limit_ratio_train_step_cached_bfloat16" not in lim
    bf16 = {**cac, "step_s": 4.0, "peak_rss_gb": 2.0, "backward_s": 2.0}
    bf16["first_losses"] = {"loss_cls": 1.002, "loss_distill": 0.5}
    r = run.summarize(a, enc, unc, cac, inf, dec, {}, bf16)
    assert r["train_step_cached_bf16_ratio"] == 1.0 and r["train_bf16_speedup"] == 1.5
    assert r["train_step_cached_bf16_parts"]["backward"] == 2.0
    assert r["train_bf16_loss_rel_change"]["loss_cls"] == pytest.approx(1e-3, rel=1e-3)
    lim = run.limit_figures(r, flops_output(peak16=2e9))
    # 4 s against 3e9 MACs at 2e9/s: 1.5 s of limit; float32 keeps its own 6 s against 3 s
    assert lim["limit_ratio_train_step_cached"] == pytest.approx(4 / 1.5)
    assert lim["limit_ratio_train_step_cached_bfloat16"] == pytest.approx(4 / 1.5)
    assert lim["limit_ratio_train_step_cached_float32"] == 2.0
    r.update(lim, wall_s=1.0)
    phases = dict(zip(("train_uncached", "train_cached", "infer", "decoder"), phase_outputs()[1:]))
    text = report.format_report(r, phases, 2, 1, "always", reference_nuclei=16)
    assert "| train step, cached, bfloat16 | 4.00 | 3.0 | 1.50 | 2.67 |" in text
    assert "| train step, cached, bfloat16 mixed precision | 4.00 | 1.00 | |" in text
    assert "cached bfloat16 backward 2.00" in text
    json.dumps(r)


def accuracy_output(demo=True):
    """What phase_accuracy returns (figures invented)."""
    acc = {"dtypes": ["bfloat16", "int8"]}
    acc["vit_b_random_mask_iou_median"] = {"bfloat16": 0.95, "int8": 0.97}
    acc["demo"] = {"skipped": "no output/demo/model_final.pth (make demo writes it)"}
    if demo:
        acc["demo"] = {"mask_iou_median": {"bfloat16": 0.986, "int8": 0.996}, "nuclei": 157}
        acc["demo"]["aji_change"] = {"bfloat16/dessam_synthetic_test": -0.5, "int8/x": 0.0}
    return acc


def test_the_fast_precisions_iou_is_the_demo_models_where_it_was_measured():
    a = run.parse_args(["--bf16", "never", "--threads", "2", "--repeats", "1"])
    r = run.summarize(a, *phase_outputs(), peers={})
    fig = run.accuracy_figures(accuracy_output(), native=True)
    assert (fig["fast_precision"], fig["mask_iou_vs_float32_median"]) == ("bfloat16", 0.986)
    assert fig["mask_iou_vs_float32_source"] == "demo"
    assert fig["mask_iou_vs_float32"]["int8"] == {"vit_b_random": 0.97, "demo": 0.996}
    fig = run.accuracy_figures(accuracy_output(demo=False), native=False)
    assert (fig["fast_precision"], fig["mask_iou_vs_float32_median"]) == ("int8", 0.97)
    assert fig["mask_iou_vs_float32_source"] == "vit_b_random"
    assert fig["demo_accuracy_skipped"].startswith("no output/demo/model_final.pth")
    r.update(run.accuracy_figures(accuracy_output(), native=True), wall_s=1.0)
    phases = dict(zip(("train_uncached", "train_cached", "infer", "decoder"), phase_outputs()[1:]))
    text = report.format_report(r, phases, 2, 1, "never", reference_nuclei=16)
    assert "per-nucleus mask IoU against float32, median: 0.9860 (demo; bound >= 0.98)" in text
    assert "  int8: mask IoU median, ViT-B random weights 0.9700, demo model 0.9960" in text
    assert "Demo AJI change against float32 (points; bound within 1): bfloat16/test -0.50" in text
    assert "| inference, 100 nuclei, int8 encoder | 4.00 | 1.00 | |" in text
    assert "int8 encoder vs float32: cosine 0.999000" in text
    json.dumps(r)
