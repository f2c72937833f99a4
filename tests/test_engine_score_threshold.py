"""The box score threshold fitted after training (dessam_d2/engine/score_threshold.py)."""

import json

import numpy as np
import pytest

from dessam_d2.engine.score_threshold import best_f1_threshold, report_fit


def test_the_threshold_keeps_the_detections_of_best_f1():
    # 4 true nuclei; by score: TP, TP, FP, TP, FP, FP
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    is_tp = np.array([1, 1, 0, 1, 0, 0], bool)
    fit = best_f1_threshold(scores, is_tp, num_gt=4, fixed=0.55)
    # keeping 4: P 3/4, R 3/4, F1 0.75 (keeping 2: P 1, R 0.5, F1 0.667)
    assert fit.threshold == pytest.approx((0.6 + 0.3) / 2)
    assert (fit.precision, fit.recall, fit.f1) == pytest.approx((0.75, 0.75, 0.75))
    assert (fit.fixed_precision, fit.fixed_recall) == pytest.approx((3 / 4, 3 / 4))
    assert fit.boxes == 4


def test_the_order_of_the_inputs_does_not_matter():
    scores = np.array([0.3, 0.9, 0.6, 0.8])
    is_tp = np.array([0, 1, 1, 1], bool)
    a = best_f1_threshold(scores, is_tp, 3, 0.55)
    order = np.array([2, 0, 3, 1])
    b = best_f1_threshold(scores[order], is_tp[order], 3, 0.55)
    assert a == b and a.recall == 1.0 and a.threshold == pytest.approx(0.45)


def test_a_detector_that_scores_everything_low_gets_a_low_threshold_not_an_empty_result():
    scores = np.array([0.2, 0.15, 0.1])
    fit = best_f1_threshold(scores, np.ones(3, bool), 3, 0.55)
    assert fit.threshold < 0.1 and fit.recall == 1.0
    assert (fit.fixed_precision, fit.fixed_recall) == (0.0, 0.0)  # at 0.55 it finds nothing


def test_no_detection_at_all_keeps_the_fixed_threshold():
    fit = best_f1_threshold(np.zeros(0), np.zeros(0, bool), 5, 0.55)
    assert fit.threshold == 0.55 and fit.recall == 0.0


def test_the_report_warns_in_one_line_when_recall_is_low_and_saves_the_fit(tmp_path):
    fit = best_f1_threshold(np.array([0.9, 0.2]), np.array([1, 1], bool), 10, 0.55)
    lines = report_fit(fit, auto=False, output_dir=str(tmp_path))
    assert lines[0].startswith("Box score threshold 0.550 (MODEL.ROI_HEADS.SCORE_THRESH_TEST)")
    assert "recall 10.0%" in lines[0]
    assert len(lines) == 2 and lines[1].startswith("WARNING: the detector finds only 10%")
    assert "\n" not in lines[1] and "TEST.SCORE_THRESH_AUTO True" in lines[1]
    saved = json.loads((tmp_path / "score_threshold.json").read_text())
    assert saved["used"] == 0.55 and saved["auto"] is False
    good = best_f1_threshold(np.array([0.9]), np.array([1], bool), 1, 0.55)
    assert len(report_fit(good, auto=True)) == 1
