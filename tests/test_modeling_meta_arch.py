"""DESSAM end to end on tiny shapes: losses, what trains, teacher/student prompts, inference."""

import copy
import math

import cv2
import numpy as np
import pytest
import torch
from conftest import make_instances, synthetic_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, BoxMode
from detectron2.utils.events import EventStorage

from dessam_d2.data.mapper import DESSAMDatasetMapper
from dessam_d2.modeling.meta_arch import DESSAM

EXPECTED_LOSSES = {
    "loss_rpn_cls",
    "loss_rpn_loc",
    "loss_cls",
    "loss_box_reg",
    "loss_distill_bce",
    "loss_distill_dice",
    "loss_local_pairwise",
    "loss_global_levelset",
}


def build(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    return model


def train_losses(model, inputs, seed=0):
    torch.manual_seed(seed)
    with EventStorage():
        return model(inputs)


def test_is_a_registered_meta_architecture(cfg):
    assert isinstance(build(cfg), DESSAM)


def test_one_step_gives_finite_named_losses_for_every_term(cfg):
    from conftest import synthetic_input

    losses = train_losses(build(cfg), [synthetic_input(0), synthetic_input(1)])
    assert set(losses) == EXPECTED_LOSSES
    for name, value in losses.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    assert losses["loss_distill_bce"].item() > 0 and losses["loss_local_pairwise"].item() > 0


def test_frozen_parameters_stay_bit_identical_and_trainable_ones_move(cfg):
    from conftest import synthetic_input

    model = build(cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    for step in range(3):
        losses = train_losses(model, [synthetic_input(step)], seed=step)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    frozen = set(before) - trainable
    # Exactly the paper's trainable set: SimpleFeaturePyramid, RPN, box head, prompt tokens.
    assert all(
        k.startswith(("backbone.simfp_", "proposal_generator.", "roi_heads.box_"))
        or k == "roi_heads.mask_head.learnable_tokens"
        for k in trainable
    )
    assert all(
        k.startswith(("backbone.net.encoder.", "roi_heads.mask_head.prompt_encoder."))
        or k.startswith("roi_heads.mask_head.mask_decoder.")
        for k in frozen
    )
    params = dict(model.named_parameters())
    for k in frozen:
        assert torch.equal(params[k], before[k]), k
    unmoved = [k for k in trainable if torch.equal(params[k], before[k])]
    assert unmoved == []


def test_teacher_gets_gt_boxes_without_grad_and_student_the_predicted_boxes(cfg, monkeypatch):
    from conftest import synthetic_input

    model = build(cfg)
    head = model.roi_heads.mask_head
    calls, seen = [], {}
    real_decode = head.decode

    def spy(embedding, boxes, student):
        calls.append((student, boxes.detach().clone(), torch.is_grad_enabled()))
        return real_decode(embedding, boxes, student)

    def capture(module, args):
        seen["instances"] = [copy.deepcopy(i) for i in args[1]]

    monkeypatch.setattr(head, "decode", spy)
    head.register_forward_pre_hook(capture)
    inp = synthetic_input(0)
    train_losses(model, [inp])
    (t_student, t_boxes, t_grad), (s_student, s_boxes, s_grad) = calls
    gt = inp["instances"].gt_boxes.tensor
    assert not t_student and not t_grad
    assert sorted(map(tuple, t_boxes.tolist())) == sorted(map(tuple, gt.tolist()))
    assert s_student and s_grad
    inst = seen["instances"][0]
    assert len(s_boxes) == len(inst) > 0
    assert torch.allclose(s_boxes, inst.proposal_boxes.tensor.clamp(0, 256))
    # The student's prompts are the box head's predictions, not the ground truth they match.
    assert not torch.equal(s_boxes, inst.gt_boxes.tensor)
    assert model.roi_heads.train_on_pred_boxes


def test_learnable_tokens_get_gradient_only_through_the_student(cfg):
    from conftest import synthetic_input

    model = build(cfg)
    head = model.roi_heads.mask_head
    losses = train_losses(model, [synthetic_input(0)])
    losses["loss_distill_bce"].backward()
    assert head.learnable_tokens.grad.abs().sum() > 0
    emb = torch.randn(1, 256, 16, 16)
    boxes = torch.tensor([[10.0, 10.0, 60.0, 50.0]])
    with torch.no_grad():
        teacher = head.decode(emb, boxes, student=False)
        student = head.decode(emb, boxes, student=True)
        head.learnable_tokens.add_(1.0)
        assert torch.equal(head.decode(emb, boxes, student=False), teacher)
        assert not torch.allclose(head.decode(emb, boxes, student=True), student)


def test_training_never_reads_gt_masks(cfg):
    """The losses are identical with GT masks absent, present, or changed."""
    from conftest import synthetic_input

    model = build(cfg)
    base = train_losses(model, [synthetic_input(0)], seed=5)
    for fill in (True, False):
        inp = synthetic_input(0)
        masks = torch.full((2, 256, 200), fill, dtype=torch.bool)
        inp["instances"].gt_masks = BitMasks(masks)
        other = train_losses(model, [inp], seed=5)
        assert {k: v.item() for k, v in other.items()} == {k: v.item() for k, v in base.items()}


def test_inference_returns_masks_of_the_original_size_one_per_kept_box(cfg):
    from conftest import synthetic_input

    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    model = build(cfg).eval()
    for (h, w), (oh, ow) in [
        ((256, 200), (300, 234)),
        ((40, 256), (50, 321)),
        ((256, 256), (7, 7)),
    ]:
        inp = synthetic_input(0, size=(h, w), boxes=((2, 2, 30, 30),))
        inp.update(height=oh, width=ow)
        del inp["instances"]
        inst = model([inp])[0]["instances"]
        assert inst.image_size == (oh, ow)
        assert len(inst) > 0
        assert inst.pred_masks.shape == (len(inst), oh, ow) and inst.pred_masks.dtype == torch.bool
        assert len(inst.pred_boxes) == len(inst.scores) == len(inst.pred_classes) == len(inst)
        assert inst.pred_boxes.tensor[:, 2].max() <= ow and inst.pred_boxes.tensor[:, 3].max() <= oh


def test_pyramid_and_rpn_skip_rows_and_columns_that_are_only_padding(cfg):
    """Detector features cover the batch's largest image (in whole p5 cells), not SAM's square;
    the mask head still gets SAM's whole embedding."""
    from conftest import synthetic_input

    model = build(cfg)
    seen = {}

    def rpn_input(module, args):
        assert set(args[1]) == {"p2", "p3", "p4", "p5"}  # the pyramid only
        seen["rpn"] = {k: tuple(v.shape[-2:]) for k, v in args[1].items()}

    def mask_head_input(module, args):
        seen["sam"] = tuple(args[0].shape[-2:])  # forward(embeddings, instances, raw_images)

    model.proposal_generator.register_forward_pre_hook(rpn_input)
    model.mask_head.register_forward_pre_hook(mask_head_input)
    batch = [
        synthetic_input(0, size=(40, 256), boxes=((2, 2, 30, 30),)),
        synthetic_input(1, size=(100, 200), boxes=((20, 30, 60, 70),)),
    ]
    losses = train_losses(model, batch)  # 256 px square, patch 16: a 16 x 16 embedding
    assert all(torch.isfinite(v) for v in losses.values())
    # rows: 100 px -> 4 cells of 32 px -> 8 tokens; columns: 256 px -> 16 tokens
    assert seen["rpn"] == {"p2": (32, 64), "p3": (16, 32), "p4": (8, 16), "p5": (4, 8)}
    assert seen["sam"] == (16, 16)
    model.eval()
    inp = synthetic_input(2, size=(150, 60), boxes=((2, 2, 30, 30),))
    del inp["instances"]
    model([inp])
    assert seen["rpn"]["p4"] == (10, 4) and seen["sam"] == (16, 16)


def test_inference_caps_detections_per_image(cfg):
    from conftest import synthetic_input

    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.TEST.DETECTIONS_PER_IMAGE = 3
    inp = synthetic_input(0)
    del inp["instances"]
    assert len(build(cfg).eval()([inp])[0]["instances"]) == 3


def test_an_oversized_input_is_a_clear_error(cfg):
    model = build(cfg).eval()
    with pytest.raises(ValueError, match="longest side <= 256"):
        model([{"image": torch.zeros(3, 300, 10, dtype=torch.uint8), "file_name": "x.png"}])


def box_masks_like(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """R x 1 x m x m binary masks of XYXY boxes given in the mask's pixel frame."""
    coords = torch.arange(logits.shape[-1], dtype=logits.dtype) + 0.5
    inside_x = (coords[None] >= boxes[:, 0:1]) & (coords[None] <= boxes[:, 2:3])
    inside_y = (coords[None] >= boxes[:, 1:2]) & (coords[None] <= boxes[:, 3:4])
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(logits.dtype)[:, None]


def test_each_roi_loss_reads_its_own_mask(cfg, monkeypatch):
    """The edge-aware loss crops box k from mask k (not from the image's first mask)."""
    head = build(cfg).roi_heads.mask_head
    boxes = torch.tensor([[16.0, 16.0, 80.0, 80.0], [144.0, 144.0, 208.0, 208.0]])

    def box_logits(embedding, b, student):
        # Mask k: +20 inside box k, -20 elsewhere; mask 0 is also +20 on the left half of box 1,
        # so box 1's crop has an edge if (and only if) it is read from the wrong mask.
        masks = box_masks_like(torch.zeros(len(b), 1, 64, 64), b / 4)
        masks[0, :, 36:52, 36:44] = 1
        return (masks * 40 - 20).detach()

    monkeypatch.setattr(head, "decode", box_logits)
    from conftest import make_instances

    inst = make_instances(boxes.tolist(), (256, 256))
    inst.proposal_boxes = inst.gt_boxes.clone()
    losses = head.losses(torch.zeros(1, 256, 16, 16), torch.full((1, 3, 256, 256), 128.0), [inst])
    # Only bilinear sampling at the crops' borders is left (the wrong mask gives > 1).
    assert losses["loss_local_pairwise"].item() < 0.01
    assert losses["loss_distill_dice"].item() == pytest.approx(0.0, abs=1e-3)


def test_mask_threshold_is_a_logit_threshold_of_0_5(cfg):
    """The release keeps logit > 0.5 (probability > 0.622): a logit of 0.45 (probability 0.61)
    is background, 0.55 is nucleus."""
    from detectron2.structures import Boxes, Instances

    model = build(cfg).eval()
    r = Instances((256, 256))
    r.pred_boxes = Boxes(torch.tensor([[0.0, 0.0, 256.0, 256.0]]))
    r.scores = torch.ones(1)
    r.pred_classes = torch.zeros(1, dtype=torch.int64)
    logits = torch.full((1, 1, 64, 64), 0.45)
    logits[..., :, 32:] = 0.55
    r.pred_mask_logits = logits
    mask = model.postprocess(r, {"height": 256, "width": 256}, (256, 256)).pred_masks[0]
    assert not mask[:, :120].any() and mask[:, 136:].all()


def _finite_losses(model, batch):
    with EventStorage(0):
        losses = model(batch)
    sum(losses.values()).backward()
    assert losses and all(math.isfinite(float(v)) for v in losses.values()), losses
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    model.zero_grad()
    return losses


@pytest.mark.parametrize("overrides", [{}, {"MODEL.DESSAM.PAIRWISE_LOSS": "boxinst"}])
def test_no_nuclei_and_degenerate_boxes_give_finite_losses(tmp_path, one_thread, overrides):
    torch.manual_seed(0)
    cfg = tiny_cfg(**overrides)
    model = build_model(cfg).train()
    # an image with no nuclei, alone and next to one with nuclei: the same terms, all finite
    alone = _finite_losses(model, [synthetic_input(0, boxes=())])
    assert _finite_losses(model, [synthetic_input(0, boxes=()), synthetic_input(1)]).keys() == (
        alone.keys()
    )

    # all boxes degenerate (zero or negative size, outside the image): the mapper drops every one
    cv2.imwrite(str(tmp_path / "img.png"), np.full((100, 120, 3), 200, np.uint8))
    boxes = [[10, 10, 0, 20], [30, 30, -5, 10], [40, 40, 10, -3], [500, 500, 20, 20]]
    boxes += [[-50, 10, 20, 20], [10, 10, float("nan"), 5]]
    record = {
        "file_name": str(tmp_path / "img.png"),
        "image_id": 1,
        "height": 100,
        "width": 120,
        "annotations": [
            {"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0} for b in boxes
        ],
    }
    mapped = DESSAMDatasetMapper(cfg, is_train=True)(record)
    assert len(mapped["instances"]) == 0
    # next to the thinnest boxes the mapper keeps (1 px)
    thin = synthetic_input(2)
    size = thin["instances"].image_size
    thin["instances"] = make_instances([[10, 10, 11, 40], [50, 50, 90, 51], [9, 9, 10, 10]], size)
    _finite_losses(model, [mapped, thin])


def test_learnable_tokens_switch_off_and_back_for_inference(cfg):
    """``set_learnable_tokens(False)``: SAM's own output tokens only (the teacher's decoding)."""
    model = build(cfg).eval()
    with torch.no_grad():
        model.mask_head.learnable_tokens.normal_(0.0, 3.0)
    calls = []
    real = model.mask_head.decode
    model.mask_head.decode = lambda emb, boxes, student: calls.append(student) or real(
        emb, boxes, student
    )
    inp = synthetic_input(0)
    del inp["instances"]
    model([inp])
    assert model.set_learnable_tokens(False) is True
    model([inp])
    assert model.set_learnable_tokens(True) is False
    model([inp])
    assert calls == [True, False, True]


def test_trainable_decoder_and_token_stats(cfg):
    assert not build(cfg).trainable_decoder
    cfg.MODEL.SAM.FREEZE_DECODER = False
    model = build(cfg)
    assert model.trainable_decoder
    head = model.mask_head
    with torch.no_grad():
        head.learnable_tokens.zero_()
        head.learnable_tokens[0, :2] = torch.tensor([3.0, 4.0])
        head.learnable_tokens_init.zero_()
        head.learnable_tokens_init[0, 1] = 4.0
    assert model.token_stats() == {"norm": 5.0, "change": 3.0, "grad_norm": 0.0}
    head.learnable_tokens.grad = torch.zeros_like(head.learnable_tokens)
    head.learnable_tokens.grad[0, 0] = 2.0
    assert model.token_stats()["grad_norm"] == 2.0


# ------------------------------------------------- the embedding cache is never served stale


def cached(tmp_path, seed=0, **overrides):
    """A tiny DESSAM (eval) with the embedding cache on in ``tmp_path``/cache: two models built
    with one seed hold the same weights, so they share entries."""
    cfg = tiny_cfg(**{"MODEL.DESSAM.EMBEDDING_CACHE_DIR": str(tmp_path / "cache"), **overrides})
    return build(cfg, seed).eval()


def cache_input(flip=False):
    """A 96 x 128 image as the mapper hands it to a 256-px model (``flip``: mirrored, as a
    training flip does)."""
    from detectron2.data import transforms as T

    from dessam_d2.data.transforms import sam_model_input

    rgb = synthetic_input(0, size=(96, 128), boxes=((20, 30, 60, 70),))["image"]
    flips = T.AugmentationList([T.RandomFlip(prob=1.0, horizontal=True)]) if flip else None
    return sam_model_input(rgb.permute(1, 2, 0).numpy(), 256, augmentations=flips)[0]


def lookup(model, inp):
    """The embedding of one input as inference computes it, and what the cache did: "hit", or
    "miss" (a new entry computed and written, none damaged or overwritten); else the change of
    (hits, misses, writes, bad entries, entries on disk)."""
    c = model.embedding_cache

    def counts():
        return c.hits, c.misses, c.writes, c.bad_entries, c.stats()["entries"]

    before = counts()
    images, _ = model.preprocess_image([inp])
    with torch.no_grad():
        emb = model.image_embeddings(images, [inp], model.inference_dtype())[0]
    delta = tuple(a - b for a, b in zip(counts(), before))
    return emb, {(1, 0, 0, 0, 0): "hit", (0, 1, 1, 0, 1): "miss"}.get(delta, delta)


def test_embedding_cache_unchanged_model_and_image_is_a_hit_with_the_identical_tensor(tmp_path):
    inp = cache_input()
    assert inp["sam_transform"] == "longest256" and inp["image"].shape == (3, 192, 256)
    model = cached(tmp_path)
    first, outcome = lookup(model, inp)
    assert outcome == "miss"
    assert torch.equal(first, model.encode(model.preprocess_image([inp])[0].tensor)[0].half())
    again, outcome = lookup(model, dict(inp, image=inp["image"].clone()))
    assert outcome == "hit" and torch.equal(again, first)
    other, outcome = lookup(cached(tmp_path), inp)  # another model with the same weights
    assert outcome == "hit" and torch.equal(other, first)


def test_embedding_cache_misses_after_the_encoder_weights_change(tmp_path):
    model, inp = cached(tmp_path), cache_input()
    encoder = model.image_encoder.encoder
    original = copy.deepcopy(encoder.state_dict())
    first, _ = lookup(model, inp)
    with torch.no_grad():  # in place: the tensor and its storage stay the same
        encoder.blocks[0].mlp.lin1.weight.mul_(1.5)
    changed, outcome = lookup(model, inp)
    assert outcome == "miss" and not torch.equal(changed, first)
    encoder.load_state_dict(cached(tmp_path / "other", seed=1).image_encoder.encoder.state_dict())
    loaded, outcome = lookup(model, inp)  # other weights loaded (copied into the same tensors)
    assert outcome == "miss" and not torch.equal(loaded, first) and not torch.equal(loaded, changed)
    encoder.load_state_dict(original)  # the key is the weights' content, not their history
    back, outcome = lookup(model, inp)
    assert outcome == "hit" and torch.equal(back, first)


@pytest.mark.parametrize("name", ["PIXEL_MEAN", "PIXEL_STD"])
def test_embedding_cache_misses_for_another_normalisation_alone(tmp_path, name):
    from dessam_d2.utils.hashing import module_fingerprint

    inp, model = cache_input(), cached(tmp_path)
    first, _ = lookup(model, inp)
    values = list(getattr(tiny_cfg().MODEL, name))
    values[1] += 5.0  # one channel
    other = cached(tmp_path, **{f"MODEL.{name}": values})
    assert module_fingerprint(other.image_encoder.encoder) == module_fingerprint(
        model.image_encoder.encoder
    )  # the same weights: only the normalisation differs
    renormalised, outcome = lookup(other, inp)
    assert outcome == "miss" and not torch.equal(renormalised, first)
    buffer = getattr(model, name.lower())
    with torch.no_grad():  # the same change, in place, on the first model: the same key
        buffer[1] += 5.0
    changed, outcome = lookup(model, inp)
    assert outcome == "hit" and torch.equal(changed, renormalised)


def test_embedding_cache_misses_for_another_sam_image_size(tmp_path):
    inp = cache_input()  # 192 x 256: fits either model
    first, _ = lookup(cached(tmp_path), inp)
    larger = cached(tmp_path, **{"MODEL.SAM.IMAGE_SIZE": 512})
    other, outcome = lookup(larger, inp)
    assert outcome == "miss" and first.shape == (256, 16, 16) and other.shape == (256, 32, 32)


def test_embedding_cache_misses_for_another_encoder_dtype(tmp_path):
    model, inp = cached(tmp_path), cache_input()
    first, _ = lookup(model, inp)
    model.set_inference_dtype("bfloat16")
    assert model.inference_dtype() == torch.bfloat16
    bf16, outcome = lookup(model, inp)
    assert outcome == "miss" and not torch.equal(bf16, first)
    assert (bf16 - first).abs().max() < 0.1 * first.abs().max()  # the same image, though
    model.set_inference_dtype("float32")
    again, outcome = lookup(model, inp)
    assert outcome == "hit" and torch.equal(again, first)


def test_embedding_cache_misses_for_another_storage_dtype(tmp_path):
    inp = cache_input()
    first, _ = lookup(cached(tmp_path), inp)  # float16, the default
    model = cached(tmp_path, **{"MODEL.DESSAM.EMBEDDING_CACHE_DTYPE": "float32"})
    exact, outcome = lookup(model, inp)
    assert outcome == "miss"  # its own entry: the float16 one is neither read nor overwritten
    assert torch.equal(exact, model.encode(model.preprocess_image([inp])[0].tensor)[0])
    assert not torch.equal(exact, first) and torch.equal(exact.half().float(), first)
    again, outcome = lookup(cached(tmp_path), inp)
    assert outcome == "hit" and torch.equal(again, first)


def test_embedding_cache_misses_for_a_flipped_image(tmp_path):
    model, inp, flipped = cached(tmp_path), cache_input(), cache_input(flip=True)
    assert flipped["sam_transform"] == "longest256+hflip"
    assert torch.equal(flipped["image"], inp["image"].flip(-1))
    first, _ = lookup(model, inp)
    mirrored, outcome = lookup(model, flipped)
    assert outcome == "miss" and not torch.equal(mirrored, first)
    # either difference alone is a new entry: the transform's name, the pixels
    same_pixels, outcome = lookup(model, dict(inp, sam_transform="longest256+hflip"))
    assert outcome == "miss" and torch.equal(same_pixels, first)
    same_name, outcome = lookup(model, dict(flipped, sam_transform="longest256"))
    assert outcome == "miss" and torch.equal(same_name, mirrored)
