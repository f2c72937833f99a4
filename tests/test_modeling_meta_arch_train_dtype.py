"""Training precision (MODEL.DESSAM.TRAIN_DTYPE): under bfloat16 the forward pass runs in autocast
while the weights, gradients and loss terms stay float32, the losses and gradients stay close to
float32's, and "auto" picks bfloat16 only where it is native.

On a CPU without native bfloat16 every bfloat16 product is emulated (slow), so these use the
tiny model on one image.
"""

import os

import pytest
import torch
from conftest import ROOT, synthetic_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from dessam_d2.errors import ConfigError
from dessam_d2.modeling import precision
from dessam_d2.modeling.precision import resolve_train_dtype


def _train_step(dtype: str, **overrides):
    """Losses, gradients and the dtypes seen inside one training step of the tiny model."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**{"MODEL.DESSAM.TRAIN_DTYPE": dtype, **overrides})).train()
    seen = {}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = output.dtype

        return hook

    # (the pyramid's and the box head's convolutions end in LayerNorms whose float32 weights
    # promote their outputs to float32; the products before them ran in bfloat16)
    model.proposal_generator.rpn_head.objectness_logits.register_forward_hook(record("rpn"))
    model.roi_heads.box_head.register_forward_hook(record("box_head"))
    criterion = model.mask_head.criterion

    class Checked:  # the criterion, recording how it is called
        loss_names = criterion.loss_names
        needs_teacher = criterion.needs_teacher

        def __call__(self, student, teacher, images, *rest):
            seen["criterion_autocast"] = torch.is_autocast_enabled("cpu")
            seen["criterion_inputs"] = {student.dtype, images.dtype}
            return criterion(student, teacher, images, *rest)

    model.mask_head.criterion = Checked()
    with EventStorage():
        torch.manual_seed(1)
        losses = model([synthetic_input(0)])
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return model, losses, grads, seen


@pytest.fixture(scope="module")
def steps():
    with torch.random.fork_rng():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return {d: _train_step(d) for d in ("float32", "bfloat16")}
        finally:
            torch.set_num_threads(threads)


def test_bfloat16_training_runs_the_detector_in_bfloat16_and_the_losses_in_float32(steps):
    model, losses, grads, seen = steps["bfloat16"]
    assert model.train_dtype() == torch.bfloat16
    assert seen["rpn"] == seen["box_head"] == torch.bfloat16
    assert seen["criterion_autocast"] is False
    assert seen["criterion_inputs"] == {torch.float32}
    assert {v.dtype for v in losses.values()} == {torch.float32}
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert grads and all(
        g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads.values()
    )
    tokens = model.mask_head.learnable_tokens
    assert tokens.grad is not None and tokens.grad.abs().sum() > 0  # the student trains


def test_float32_training_runs_without_autocast(steps):
    model, losses, _, seen = steps["float32"]
    assert model.train_dtype() == torch.float32
    assert seen["rpn"] == seen["box_head"] == torch.float32
    assert seen["criterion_autocast"] is False


def test_bfloat16_losses_and_gradients_stay_close_to_float32(steps):
    _, fp32, g32, _ = steps["float32"]
    _, bf16, g16, _ = steps["bfloat16"]
    assert fp32.keys() == bf16.keys()
    for k in fp32:
        a, b = fp32[k].item(), bf16[k].item()
        assert abs(a - b) <= 0.02 + 0.02 * abs(a), (k, a, b)
    assert g32.keys() == g16.keys()
    total32 = torch.cat([g.flatten() for g in g32.values()])
    total16 = torch.cat([g16[n].flatten() for n in g32])
    cosine = torch.nn.functional.cosine_similarity(total32, total16, dim=0)
    assert cosine >= 0.99, cosine


def test_bfloat16_training_trains_a_trainable_encoder(one_thread):
    model, _, grads, _ = _train_step("bfloat16", **{"MODEL.SAM.FREEZE_ENCODER": False})
    encoder = [n for n in grads if n.startswith("backbone.net.")]
    assert encoder and all(torch.isfinite(grads[n]).all() for n in encoder)


@pytest.mark.parametrize("native", [True, False])
def test_auto_picks_bfloat16_only_where_native(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_train_dtype("auto", "cpu") == expected
    assert resolve_train_dtype("float32", "cpu") == torch.float32
    assert resolve_train_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("word", ["int8", "float16", "fp32"])
def test_a_wrong_train_dtype_is_rejected_when_the_model_is_built(word):
    with pytest.raises(ConfigError, match="MODEL.DESSAM.TRAIN_DTYPE"):
        build_model(tiny_cfg(**{"MODEL.DESSAM.TRAIN_DTYPE": word}))


def test_the_paper_and_demo_configs_train_in_float32():
    from dessam_d2.config import load_config

    for name in ("patchseg", "clusterseg", "demo"):
        cfg = load_config(os.path.join(ROOT, "configs", f"dessam_{name}.yaml"), [])
        assert cfg.MODEL.DESSAM.TRAIN_DTYPE == "float32", name
