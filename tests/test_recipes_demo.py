"""The demo's results and console text (dessam_d2/recipes/demo.py, demo_spread.py) without
training: the run itself is tests/test_e2e_demo_training.py and `make demo`."""

import json

from dessam_d2.recipes.demo import DemoResult, demo_report, results_table
from dessam_d2.recipes.demo_spread import spread_report


def _metrics(aji):
    return {"nuclei": {"Dice": 80.0, "AJI": aji, "AJI+": aji + 1, "PQ": 50.0}, "segm": {"AP": 9.5}}


def _result(aji=40.0):
    tables = {
        "dessam_synthetic_test": {"untrained": _metrics(1.0), "DES-SAM": _metrics(aji)},
        "dessam_synthetic_shifted_test": {"DES-SAM": _metrics(aji - 5)},
    }
    return DemoResult(
        tables=tables,
        token_norm=1.23456,
        token_change=0.5,
        picture="out/comparison.png",
        prediction_dir="out/predictions",
        output_dir="out",
        data_set="datasets/synthetic_cytology/test/annotations.json",
    )


def test_the_report_is_what_the_demo_printed():
    result = _result()
    text = "\n".join(demo_report(result, count_images=lambda name: 12))  # print() per block
    # as print() wrote it: a blank line, the title, a blank line, the table, for each set
    for name, table in result.tables.items():
        block = f"\nDES-SAM demo on {name} (12 held-out images, metrics in %):\n\n"
        assert block + results_table(table) + "\n" in text
    assert text.startswith("\nDES-SAM demo on dessam_synthetic_test")
    assert "\n\nLearnable token: norm 1.235, moved 0.500 from its initial value" in text
    assert text.endswith(
        "Model: out/model_final.pth\n"
        "Per-image metrics: out/inference/<test set>/nuclei_metrics_<test set>.csv\n"
        "Data set: datasets/synthetic_cytology/test/annotations.json"
    )


def test_the_spread_is_the_mean_std_and_worst_run(tmp_path):
    runs = []
    for seed, aji in ((1, 40.0), (2, 30.0)):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        summary = {"seed": seed, "threads": 1, "tables": _result(aji).tables}
        (run / "demo_results.json").write_text(json.dumps(summary))
        runs.append(str(run))
    report = spread_report(runs + [str(tmp_path / "unfinished")])
    assert report.startswith("2 runs: seed 1 x 1 thread(s), seed 2 x 1 thread(s)")
    assert "35.00 ± 5.00" in report  # AJI of DES-SAM over the two runs
    assert "worst DES-SAM run: seed 2 x 1 thread(s)" in report
    assert spread_report([str(tmp_path / "none")]) == "no finished run\n"


def test_the_demo_switches_the_model_through_its_methods():
    """without_learnable_tokens and the box prior on detections use the model's public settings."""
    import torch
    from conftest import tiny_cfg
    from detectron2.modeling import build_model

    from dessam_d2.recipes.demo import EllipsesInDetections, without_learnable_tokens

    torch.manual_seed(0)
    model = build_model(tiny_cfg()).eval()
    with without_learnable_tokens(model):
        assert model.set_learnable_tokens(False) is False  # off inside
    assert model.set_learnable_tokens(True) is True  # back on after
    prior = EllipsesInDetections(model)
    assert prior.set_score_threshold(0.25) == 0.55  # the detector's, from the config
    assert model.score_threshold == 0.25
