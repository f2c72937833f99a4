"""DESSAMROIHeads: which boxes prompt the student (MODEL.DESSAM.STUDENT_PROMPTS) and the box head
of the paper configs (the release's: no normalisation, softmax cross-entropy)."""

import copy

import pytest
import torch
from conftest import synthetic_input, tiny_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn

from dessam_d2.config import load_config
from dessam_d2.errors import ConfigError


def student_prompts_of_one_step(cfg):
    """(student prompts, the Instances the mask head got, RPN proposals, GT boxes) of one step;
    the Instances carry ``edge_boxes``, the boxes L_edge cropped at."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    head = model.roi_heads.mask_head
    calls, seen = [], {}
    real_decode = head.decode

    def spy(embedding, boxes, student):
        if student:
            calls.append(boxes.detach().clone())
        return real_decode(embedding, boxes, student)

    def rpn_output(module, args, output):
        # An untrained RPN seldom proposes a box at IoU >= 0.5 with a nucleus: add each GT box
        # moved by a few pixels, so positives other than the added GT boxes exist.
        (props,), losses = output
        moved = Instances(props.image_size)
        moved.proposal_boxes = Boxes(gt + torch.tensor([2.0, -1.0, 3.0, 1.0]))
        moved.objectness_logits = props.objectness_logits.new_full((len(gt),), 10.0)
        props = Instances.cat([props, moved])
        seen["rpn"] = props.proposal_boxes.tensor.detach().clone()
        return [props], losses

    def mask_input(module, args):
        seen["instances"] = copy.deepcopy(args[1][0])

    real_crops = head.criterion.edge_crops

    def crops(student, images, boxes, image_ids):
        seen["instances"].edge_boxes = boxes.clone()  # where L_edge crops mask and image
        return real_crops(student, images, boxes, image_ids)

    inp = synthetic_input(0)
    gt = inp["instances"].gt_boxes.tensor
    head.decode = spy
    head.criterion.edge_crops = crops
    model.proposal_generator.register_forward_hook(rpn_output)
    head.register_forward_pre_hook(mask_input)
    torch.manual_seed(0)
    with EventStorage():
        model([inp])
    (prompts,) = calls
    return prompts, seen["instances"], seen["rpn"], gt


def rows_in(rows, table):
    """For each row of ``rows``, whether it equals some row of ``table`` exactly."""
    return (rows[:, None, :] == table[None, :, :]).all(-1).any(-1)


def test_student_prompts_proposals_are_the_positive_rpn_boxes_and_added_gt_boxes():
    cfg = tiny_cfg(**{"MODEL.DESSAM.STUDENT_PROMPTS": "proposals"})
    prompts, inst, rpn, gt = student_prompts_of_one_step(cfg)
    assert len(prompts) == len(inst) > 0
    assert torch.equal(prompts, inst.proposal_boxes.tensor.clamp(0, 256))
    # Every prompt is an RPN proposal or a ground-truth box Detectron2 added to them, and the
    # positives are capped as the release's sampler caps them (512 x 0.25 = 128 per image).
    assert rows_in(prompts, torch.cat([rpn, gt]).clamp(0, 256)).all()
    assert not rows_in(prompts, gt).all()
    assert len(prompts) <= cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE * 0.25


def test_student_prompts_predicted_are_the_box_heads_refined_boxes():
    cfg = tiny_cfg()  # the default: MODEL.DESSAM.STUDENT_PROMPTS "predicted"
    assert cfg.MODEL.DESSAM.STUDENT_PROMPTS == "predicted"
    prompts, inst, rpn, gt = student_prompts_of_one_step(cfg)
    assert len(prompts) == len(inst) > 0
    assert torch.equal(prompts, inst.proposal_boxes.tensor.clamp(0, 256))
    # Refined by the box head: not one of them is an RPN proposal or a GT box as such.
    assert not rows_in(prompts, torch.cat([rpn, gt]).clamp(0, 256)).any()


@pytest.mark.parametrize("prompts", ["predicted", "proposals"])
def test_inference_prompts_the_student_with_the_final_detections(prompts):
    cfg = tiny_cfg(
        **{"MODEL.DESSAM.STUDENT_PROMPTS": prompts, "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0}
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    head, calls = model.roi_heads.mask_head, []
    real_decode = head.decode
    head.decode = lambda e, b, student: calls.append((b.clone(), student)) or real_decode(
        e, b, student
    )
    inp = synthetic_input(0, size=(256, 256))
    del inp["instances"]
    with torch.no_grad():
        out = model([inp])[0]["instances"]
    ((boxes, student),) = calls
    assert student and len(out) > 0
    assert torch.equal(boxes, out.pred_boxes.tensor)  # 256 x 256 input: no rescaling


def test_student_prompts_other_values_are_config_errors():
    with pytest.raises(ConfigError, match="STUDENT_PROMPTS='gt'"):
        build_model(tiny_cfg(**{"MODEL.DESSAM.STUDENT_PROMPTS": "gt"}))


PAPER_CONFIGS = ["configs/dessam_clusterseg.yaml", "configs/dessam_patchseg.yaml"]


def tiny_paper_model(path):
    """The paper config's model at tiny shapes (the sizes of conftest.tiny_cfg)."""
    cfg = load_config(path)
    sizes = tiny_cfg()
    for key in ("SAM", "FPN", "ANCHOR_GENERATOR"):
        cfg.MODEL[key] = sizes.MODEL[key]
    cfg.MODEL.ROI_BOX_HEAD.CONV_DIM = sizes.MODEL.ROI_BOX_HEAD.CONV_DIM
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = sizes.MODEL.ROI_BOX_HEAD.FC_DIM
    cfg.MODEL.DESSAM.EMBEDDING_CACHE_DIR = ""
    torch.manual_seed(0)
    return cfg, build_model(cfg)


@pytest.mark.parametrize("path", PAPER_CONFIGS)
def test_paper_configs_box_head_has_no_normalisation_and_softmax_ce(path):
    cfg, model = tiny_paper_model(path)
    box_head = model.roi_heads.box_head
    convs = [m for m in box_head.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.bias is not None and c.norm is None for c in convs)
    assert not any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in box_head.modules())
    # Softmax cross-entropy over (nucleus, background) logits, not sigmoid CE on the nucleus one.
    predictor = model.roi_heads.box_predictor
    assert predictor.use_sigmoid_ce is False and predictor.cls_score.out_features == 2
    # The paper configs train as the release: the student prompted with the proposals.
    assert not model.roi_heads.train_on_pred_boxes
    assert model.roi_heads.mask_head.criterion.distill_reduction == "sum"


def test_base_box_head_keeps_layernorm_and_sigmoid_ce():
    """The demo's (Base-DESSAM's) box head is unchanged by the paper configs' choices."""
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    convs = [m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.norm is not None and c.bias is None for c in convs)
    assert model.roi_heads.box_predictor.use_sigmoid_ce
    assert model.roi_heads.train_on_pred_boxes


def test_edge_loss_crops_mask_and_image_at_the_ground_truth_box_not_the_prompt():
    """L_edge's crop of the student mask and of the image is the matched GT box, whatever
    prompted the student (the release crops the mask at the proposal, the image at the GT box:
    docs/METHOD.md)."""
    cfg = tiny_cfg(**{"MODEL.DESSAM.STUDENT_PROMPTS": "proposals"})
    prompts, inst, _, _ = student_prompts_of_one_step(cfg)
    assert torch.equal(inst.edge_boxes, inst.gt_boxes.tensor)
    assert not torch.equal(inst.edge_boxes, prompts)
