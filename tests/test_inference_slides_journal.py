"""The resume journal: a killed run goes on from its last finished tile to the same files."""

import json
import os

import pytest
from test_inference_slides_run import predictor

from dessam_d2.inference.slides import predict_slide, slide_output_paths


def test_a_killed_run_resumes_to_the_same_files(slide, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    first = predictor()
    predict_slide(first, slide, str(whole), progress=False)
    with pytest.raises(KeyboardInterrupt):
        predict_slide(predictor(fail_at=20), slide, str(resumed), progress=False)
    paths = slide_output_paths(str(resumed), slide)
    assert not os.path.exists(paths["csv"]) and not os.path.exists(paths["geojson"])
    state = json.load(open(paths["state"]))
    assert state["tiles_done"] > 19
    rest = predictor()
    predict_slide(rest, slide, str(resumed), progress=False)
    assert rest.model.calls == first.model.calls - 19  # only the tiles not finished
    for name in ("cyto.geojson", "cyto_nuclei.csv"):
        assert (whole / name).read_bytes() == (resumed / name).read_bytes()
