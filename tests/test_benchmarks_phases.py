"""benchmarks/phases.py on the demo model: every phase runs in process (it imports what it uses)
and follows the config's input size; the shared-work decoder matches segment-anything's."""

import pytest
from conftest import DEMO

from benchmarks import phases


def test_encoder_phase(one_thread):
    out = phases.phase_encoder(DEMO, repeats=1, bf16="never")
    assert out["encoder_s"] > 0 and "encoder_bf16_s" not in out
    assert out["encoder_int8_s"] > 0 and out["encoder_int8_cosine"] > 0.99


def test_decoder_phase_matches_segment_anythings_in_float32(one_thread):
    out = phases.phase_decoder(DEMO, repeats=1, decoder_nuclei=4, reference_nuclei=2)
    assert out["decoder_fast_fp32_max_abs_diff"] < 1e-4
    assert out["decoder_fast_fp32_min_mask_iou"] == 1.0
    assert out["decoder_fast_bf16_ms_per_nucleus"] > 0
    assert set(out["decoder_breakdown"]) == {"reference", "fast"}


def test_infer_phase_keeps_exactly_n_boxes(one_thread):
    out = phases.phase_infer(DEMO, repeats=1, infer_nuclei=[3, 100], bf16="never")
    assert out["infer_3_s"] > 0  # the detector kept exactly 3 boxes (else raises)
    assert out["infer_100_int8_s"] > 0 and "infer_100_bf16_s" not in out
    assert set(out["infer_3_parts"]) == set(phases.INFER_PARTS)
    assert out["peak_rss_infer_3_gb"] > 0


def test_cached_train_phase_hits_the_cache(one_thread):
    out = phases.phase_train(DEMO, repeats=1, train_nuclei=3, cached=True)
    assert (out["cache"]["misses"], out["cache"]["hits"]) == (1, 1)  # warm-up, timed step
    assert out["student_prompts"] > 0 and out["teacher_prompts"] == 3
    assert out["step_s"] > 0 and out["first_losses"]
    # the backward is timed in two parts: the mask losses', then the detector's
    split = out["backward_mask_s"] + out["backward_detector_s"]
    assert min(out["backward_mask_s"], out["backward_detector_s"]) > 0
    assert split == pytest.approx(out["backward_s"])


def test_cached_train_phase_in_bfloat16_mixed_precision(one_thread):
    out = phases.phase_train(DEMO, repeats=1, train_nuclei=3, cached=True, dtype="bfloat16")
    ref = phases.phase_train(DEMO, repeats=1, train_nuclei=3, cached=True)
    assert out["step_s"] > 0 and out["student_prompts"] > 0
    assert out["first_losses"].keys() == ref["first_losses"].keys()
    assert out["first_losses"] != ref["first_losses"]  # it did compute in bfloat16


def test_accuracy_phase_on_the_tiny_sam(one_thread, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no make demo output here: the demo's part says it is skipped
    out = phases.phase_accuracy(DEMO, bf16="never")
    assert out["dtypes"] == ["int8"]
    assert 0.9 <= out["vit_b_random_mask_iou_median"]["int8"] <= 1.0
    assert out["demo"]["skipped"].startswith("no output/demo/model_final.pth")
