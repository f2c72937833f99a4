"""The in-process training of the napari plugin: exported sets, progress per step, stop."""

import os

import pytest
from conftest import DEMO
from plugin_fixtures import field

from dessam_d2.data.export import export_box_set
from dessam_d2.errors import UsageError
from dessam_d2.inference.interactive import load_session
from dessam_d2.recipes.retrain import TrainingStopped, train_on_box_sets

SHORT = ["SOLVER.EPOCHS", 0, "SOLVER.MIN_ITER", 0, "SOLVER.MAX_ITER", 2, "SOLVER.STEPS", "()"]
SHORT += ["SOLVER.WARMUP_ITERS", 1, "SOLVER.CHECKPOINT_PERIOD", 2]


def test_training_on_an_exported_set_reports_steps_and_stops(tmp_path):
    image, boxes, _ = field()
    path = export_box_set(str(tmp_path / "set"), "a", image, boxes)
    steps = []
    weights = train_on_box_sets([path], str(tmp_path / "run"), DEMO, SHORT,
                                on_step=lambda s, t: steps.append((s, t)))  # fmt: skip
    assert steps == [(1, 2), (2, 2)] and os.path.isfile(weights)
    assert "Anchors fitted to" in open(tmp_path / "run" / "log.txt").read()
    session = load_session(str(tmp_path / "run" / "config.yaml"), weights)
    assert "fitted on the training boxes" in session.describe()["threshold"]
    with pytest.raises(TrainingStopped, match="stopped at step 1 of 2"):
        train_on_box_sets([path], str(tmp_path / "stopped"), DEMO, SHORT,
                          should_stop=lambda: True)  # fmt: skip
    assert not os.path.exists(tmp_path / "stopped" / "model_final.pth")
    with pytest.raises(UsageError, match="no box set"):
        train_on_box_sets([], str(tmp_path / "none"))
