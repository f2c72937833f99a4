"""Trained-model checkpoints (modeling/checkpointer.py): atomic saves, no NaN model, strict load."""

import os

import pytest
import torch
from conftest import tiny_cfg
from detectron2.modeling import build_model

from dessam_d2.errors import CheckpointError, NonFiniteError
from dessam_d2.modeling.checkpointer import DESSAMCheckpointer


def tiny_model():
    torch.manual_seed(0)
    return build_model(tiny_cfg())


def test_checkpoints_are_atomic_and_a_nan_model_is_never_saved(tmp_path, monkeypatch):
    model = tiny_model()
    checkpointer = DESSAMCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000001")
    good = (tmp_path / "model_0000001.pth").read_bytes()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "model_0000001.pth").stat().st_mode & 0o777 == 0o666 & ~umask  # not 0600

    def killed_while_writing(data, f):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(torch, "save", killed_while_writing)
        with pytest.raises(KeyboardInterrupt):
            checkpointer.save("model_0000002")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_0000001.pth"]

    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(NonFiniteError, match="not saving .*model_0000003.pth.*non-finite"):
        checkpointer.save("model_0000003")
    assert not (tmp_path / "model_0000003.pth").exists()
    assert (tmp_path / "model_0000001.pth").read_bytes() == good
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"


def test_loading_checks_the_file_and_the_model_strictly(tmp_path):
    model = tiny_model()
    DESSAMCheckpointer(model, str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")
    DESSAMCheckpointer(tiny_model()).load(path)  # the same config loads

    other = build_model(tiny_cfg(**{"MODEL.SAM.ENCODER_EMBED_DIM": 32}))
    with pytest.raises(CheckpointError, match="does not fit the model.*shape mismatch") as e:
        DESSAMCheckpointer(other).load(path)
    assert "\n" not in str(e.value) and path in str(e.value)

    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, tmp_path / "sam.pth")
    with pytest.raises(CheckpointError, match="official SAM checkpoint.*MODEL.SAM.CHECKPOINT"):
        DESSAMCheckpointer(tiny_model()).load(str(tmp_path / "sam.pth"))

    data = open(path, "rb").read()
    (tmp_path / "cut.pth").write_bytes(data[:1000])
    with pytest.raises(CheckpointError, match="cut.pth cannot be read.*truncated") as e:
        DESSAMCheckpointer(tiny_model()).load(str(tmp_path / "cut.pth"))
    assert "\n" not in str(e.value)

    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(CheckpointError, match="model_0000009.pth .named in .*last_checkpoint"):
        DESSAMCheckpointer(tiny_model(), str(tmp_path)).resume_or_load("", resume=True)


def test_the_fitted_threshold_and_anchors_travel_with_the_checkpoint(tmp_path):
    """A model trained with fitted anchors and threshold predicts with them wherever it is
    loaded, whatever anchors and threshold the loading config names."""
    torch.manual_seed(0)
    trained = build_model(tiny_cfg(**{"MODEL.ANCHOR_GENERATOR.SIZES": [[10], [14], [20], [28]]}))
    trained.set_fitted_score_threshold(0.31)
    DESSAMCheckpointer(trained, save_dir=str(tmp_path)).save("model_final")
    path = str(tmp_path / "model_final.pth")

    other = build_model(tiny_cfg())  # the config's anchors 8-64, threshold 0.55
    assert other.score_threshold == 0.55 and other.fitted_score_threshold is None
    DESSAMCheckpointer(other).load(path)
    assert other.score_threshold == pytest.approx(0.31)
    assert other.fitted_score_threshold == pytest.approx(0.31)
    for mine, saved in zip(other.cell_anchors(), trained.cell_anchors()):
        assert torch.equal(mine, saved)

    plain = build_model(tiny_cfg())  # a model without a fitted threshold keeps the config's
    DESSAMCheckpointer(plain, save_dir=str(tmp_path / "plain")).save("model_final")
    fresh = build_model(tiny_cfg())
    DESSAMCheckpointer(fresh).load(str(tmp_path / "plain" / "model_final.pth"))
    assert fresh.score_threshold == 0.55 and fresh.fitted_score_threshold is None

    three_ratios_less = build_model(tiny_cfg(**{"MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[1.0]]}))
    with pytest.raises(CheckpointError, match="its anchors .* are not this config's"):
        DESSAMCheckpointer(three_ratios_less).load(path)
