"""Inference precision (MODEL.DESSAM.INFERENCE_DTYPE, DECODER_INFERENCE_DTYPE): how close
bfloat16 and int8 stay to float32, what "auto" picks, and that outputs are float32.

bfloat16 keeps 8 bits of mantissa (float32: 24), int8 quantises the encoder's linear layers, so
outputs differ in the last digits; the bounds are docs/PERFORMANCE.md's: embedding cosine >=
0.999, per-nucleus mask IoU against float32 >= 0.98 (median). With SAM's mask decoder in
bfloat16 as well (DECODER_INFERENCE_DTYPE auto under INFERENCE_DTYPE bfloat16, the default) a
few border pixels of the smallest masks move: the demo SAM's worst mask fell to IoU 0.89 (median
0.984; 37 nuclei), against 0.985 (median 0.997) with the decoder in float32.
"""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import DEMO, synthetic_input, tiny_cfg
from detectron2.modeling import build_model

from dessam_d2.config import load_config
from dessam_d2.data.synthetic.cytology import render_synthetic_image
from dessam_d2.data.transforms import sam_model_input
from dessam_d2.evaluation.metrics import aji, masks_to_label_map
from dessam_d2.modeling import meta_arch
from dessam_d2.modeling.embedding_cache import EmbeddingCache
from dessam_d2.modeling.precision import cpu_has_native_bf16, resolve_inference_dtype


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    # Score threshold 0 and few proposals: a few boxes from the random detector, cheaply (on a
    # CPU without native bfloat16 every bfloat16 product is emulated, ~50x slower).
    opts = {"MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0, "MODEL.RPN.POST_NMS_TOPK_TEST": 30}
    opts["TEST.DETECTIONS_PER_IMAGE"] = 4
    return build_model(tiny_cfg(**opts)).eval()


def test_random_tiny_sam_embeddings_in_bfloat16_match_float32(tiny_model, one_thread):
    images, _ = tiny_model.preprocess_image([synthetic_input(0), synthetic_input(1)])
    fp32 = tiny_model.encode(images.tensor, torch.float32)
    bf16 = tiny_model.encode(images.tensor, torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)  # it did run in bfloat16
    assert F.cosine_similarity(bf16.flatten(), fp32.flatten(), dim=0) >= 0.999
    per_token = F.cosine_similarity(bf16.flatten(2), fp32.flatten(2), dim=1)
    assert per_token.min() >= 0.99


def test_full_inference_in_bfloat16_returns_float32(tiny_model, one_thread, monkeypatch):
    logged = []
    monkeypatch.setattr(meta_arch.logger, "info", logged.append)
    tiny_model.set_inference_dtype("bfloat16")
    x = synthetic_input(0)
    with torch.no_grad():
        inst = tiny_model([x])[0]["instances"]
    assert tiny_model.inference_dtype() == torch.bfloat16  # asked again: not logged again
    assert len(inst) > 0  # score threshold 0: the random detector keeps boxes
    assert inst.scores.dtype == inst.pred_boxes.tensor.dtype == torch.float32
    assert inst.pred_masks.dtype == torch.bool and inst.image_size == (x["height"], x["width"])
    lines = [m for m in logged if "inference runs in" in m]
    assert len(lines) == 1 and lines[0].startswith("DESSAM inference runs in bfloat16, SAM's mask")


def test_training_ignores_the_inference_dtype(one_thread):
    x = synthetic_input(0)
    losses = {}
    for dtype in ("float32", "bfloat16", "int8"):
        torch.manual_seed(0)
        model = build_model(tiny_cfg(**{"MODEL.DESSAM.INFERENCE_DTYPE": dtype})).train()
        from detectron2.utils.events import EventStorage

        with EventStorage():
            torch.manual_seed(1)
            losses[dtype] = {k: v.item() for k, v in model([x]).items()}
    assert losses["float32"] == losses["bfloat16"] == losses["int8"]


@pytest.fixture(scope="module")
def demo_model():
    # The shipped demo-pretrained tiny SAM (weights/tiny_sam_shapes.pth, loaded by the config).
    torch.manual_seed(0)
    return build_model(load_config(DEMO, [])).eval()


def demo_masks(model, settings):
    """Per-nucleus masks of two synthetic images' true boxes, for each (INFERENCE_DTYPE,
    DECODER_INFERENCE_DTYPE) of ``settings`` and for the teacher and the student."""
    rng = np.random.default_rng(3)
    inputs, boxes, truth = [], [], []
    for _ in range(2):
        image, masks = render_synthetic_image(rng, (256, 256), (12, 16))
        truth.append(masks)
        xyxy = []
        for m in masks:
            ys, xs = np.nonzero(m)
            xyxy.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        x, b = sam_model_input(image, model.image_size, boxes=np.array(xyxy, np.float32))
        inputs.append(x)
        boxes.append(torch.as_tensor(b))
    out = {}
    for setting in settings:
        model.set_inference_dtype(*setting)
        for student in (False, True):
            res = model.segment_boxes(inputs, boxes, student=student)
            out[setting, student] = torch.cat([r["instances"].pred_masks for r in res])
            # the images' AJI (%) against their true masks, as the evaluator computes it
            out["aji", setting, student] = 100 * np.mean(
                [
                    aji(
                        masks_to_label_map(np.asarray(t), np.ones(len(t))),
                        masks_to_label_map(
                            r["instances"].pred_masks.numpy(), np.ones(len(r["instances"]))
                        ),
                    )
                    for t, r in zip(truth, res)
                ]
            )
    model.set_inference_dtype("float32", "auto")
    return out


def mask_ious(a, b):
    union = (a | b).flatten(1).sum(1)
    return torch.where(union > 0, (a & b).flatten(1).sum(1) / union.clamp_min(1), 1.0)


def test_demo_tiny_sam_masks_in_bfloat16_match_float32(demo_model, one_thread):
    f32, bf16, bf16_dec32 = ("float32", "auto"), ("bfloat16", "auto"), ("bfloat16", "float32")
    out = demo_masks(demo_model, [f32, bf16, bf16_dec32])
    for student in (False, True):
        a = out[f32, student]
        assert len(a) >= 24 and a.flatten(1).any(1).float().mean() > 0.9
        iou = mask_ious(a, out[bf16_dec32, student])
        # phase-4 tiny SAM, AMD EPYC (avx512_bf16): worst / mean IoU 0.964 / 0.995 (teacher),
        # 0.933 / 0.992 (student): a few border pixels of the smallest nuclei move
        assert iou.min() >= 0.9 and iou.mean() >= 0.985, (student, iou.min(), iou.mean())
        # the default under bfloat16: the decoder too (issue bound: median >= 0.98)
        iou = mask_ious(a, out[bf16, student])
        assert iou.median() >= 0.98 and iou.mean() >= 0.96, (student, iou.median(), iou.mean())
        assert not torch.equal(a, out[bf16, student])  # the decoder did run in bfloat16
        # AJI within 1 point of float32's (issue bound)
        assert abs(out["aji", bf16, student] - out["aji", f32, student]) <= 1.0


def test_demo_tiny_sam_masks_in_int8_match_float32(demo_model, one_thread):
    f32, int8 = ("float32", "auto"), ("int8", "auto")
    before = {k: v.clone() for k, v in demo_model.state_dict().items()}
    out = demo_masks(demo_model, [f32, int8])
    for student in (False, True):
        a = out[f32, student]
        iou = mask_ious(a, out[int8, student])
        # AMD EPYC Zen 4: median 0.997, worst 0.977 (trained demo model, 37 nuclei)
        assert iou.median() >= 0.98 and iou.min() >= 0.9, (student, iou.median(), iou.min())
        assert abs(out["aji", int8, student] - out["aji", f32, student]) <= 1.0
    # the quantised copy is inference's own: the model's weights and state dict are unchanged
    after = demo_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_int8_encoder_is_quantised_once_and_rebuilt_when_the_weights_change(tiny_model):
    images, _ = tiny_model.preprocess_image([synthetic_input(0)])
    fp32 = tiny_model.encode(images.tensor, torch.float32)
    int8 = tiny_model.encode(images.tensor, torch.qint8)
    assert int8.dtype == torch.float32 and not torch.equal(fp32, int8)
    assert F.cosine_similarity(int8.flatten(), fp32.flatten(), dim=0) >= 0.99
    copy = tiny_model.int8_encoder()
    assert tiny_model.int8_encoder() is copy  # built once
    quantised = [m for m in copy.modules() if "quantized" in type(m).__module__]
    assert quantised and not any(type(m) is torch.nn.Linear for m in copy.modules())
    assert not any("quantized" in type(m).__module__ for m in tiny_model.modules())
    with torch.no_grad():
        tiny_model.image_encoder.encoder.neck[0].weight.mul_(2)  # new weights: a new copy
    try:
        assert tiny_model.int8_encoder() is not copy
    finally:
        with torch.no_grad():
            tiny_model.image_encoder.encoder.neck[0].weight.div_(2)


def test_full_inference_in_int8_returns_float32(tiny_model, one_thread, monkeypatch):
    logged = []
    monkeypatch.setattr(meta_arch.logger, "info", logged.append)
    tiny_model.set_inference_dtype("int8")
    try:
        x = synthetic_input(0)
        with torch.no_grad():
            inst = tiny_model([x])[0]["instances"]
        assert len(inst) > 0
        assert inst.scores.dtype == inst.pred_boxes.tensor.dtype == torch.float32
        assert inst.pred_masks.dtype == torch.bool
        lines = [m for m in logged if "inference runs in" in m]
        assert len(lines) == 1 and lines[0].startswith("DESSAM inference runs in int8")
        assert "mask decoder in float32" in lines[0]
    finally:
        tiny_model.set_inference_dtype("auto")


def test_int8_is_for_cpus_only_and_never_picked_by_auto(monkeypatch):
    assert resolve_inference_dtype("int8", "cpu") == torch.qint8
    with pytest.raises(ValueError, match="int8 runs on a CPU only"):
        resolve_inference_dtype("int8", "cuda:0")
    for caps in ({}, {"avx2": True}, {"avx512_bf16": True}):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda caps=caps: caps)
        assert resolve_inference_dtype("auto", "cpu") != torch.qint8


@pytest.mark.parametrize(
    "caps, native",
    [
        ({"avx2": True, "avx512_f": True}, False),  # AVX-512 without BF16: emulated
        ({"avx2": True, "avx512_bf16": True}, True),  # Cooper Lake, Zen 4+
        ({"amx_bf16": True, "amx_tile": True}, True),  # Sapphire Rapids
        ({"architecture": "aarch64", "bf16": True}, True),  # Graviton 3, Apple M2+
        ({}, False),
    ],
)
def test_auto_picks_bfloat16_only_on_a_cpu_with_native_bfloat16(monkeypatch, caps, native):
    assert cpu_has_native_bf16(caps) == native
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    expected = torch.bfloat16 if native else torch.float32
    assert resolve_inference_dtype("auto", "cpu") == expected
    assert resolve_inference_dtype("float32", "cpu") == torch.float32
    assert resolve_inference_dtype("bfloat16", "cpu") == torch.bfloat16


def test_auto_on_cuda_follows_its_bfloat16_support(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {})
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
        expected = torch.bfloat16 if supported else torch.float32
        assert resolve_inference_dtype("auto", "cuda:0") == expected


def test_a_wrong_inference_dtype_is_rejected_when_the_model_is_built():
    with pytest.raises(ValueError, match="INFERENCE_DTYPE='float16'"):
        build_model(tiny_cfg(**{"MODEL.DESSAM.INFERENCE_DTYPE": "float16"}))


def test_this_machine_gets_what_its_flags_say(caplog):
    # Documents the machine the tests ran on (and that the real capabilities call works).
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_inference_dtype("auto", "cpu") == expected
    logging.getLogger(__name__).info(f"native bfloat16: {cpu_has_native_bf16()}")


def test_cache_key_states_the_encoder_dtype(tmp_path):
    cache = EmbeddingCache(str(tmp_path))
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    fp32 = cache.key(image, "longest8", 8, "f" * 40)
    assert fp32 == cache.key(image, "longest8", 8, "f" * 40, torch.float32)
    assert fp32 != cache.key(image, "longest8", 8, "f" * 40, torch.bfloat16)
    assert fp32 != cache.key(image, "longest8", 8, "f" * 40, torch.qint8)
