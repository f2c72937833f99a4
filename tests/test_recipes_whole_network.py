"""The demo's whole-network row: the same DESSAM model with SAM's encoder and decoder trained
on box losses (L_edge + box projection), no teacher and no embedding cache."""

import torch
from conftest import make_instances, tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from dessam_d2.recipes.whole_network import whole_network_config


def test_whole_network_config_changes_only_freezing_losses_cache_and_sam_rate(tmp_path):
    base = tiny_cfg(OUTPUT_DIR=str(tmp_path), **{"MODEL.DESSAM.EMBEDDING_CACHE_DIR": "cache"})
    cfg = whole_network_config(base)
    assert not cfg.MODEL.SAM.FREEZE_ENCODER and not cfg.MODEL.SAM.FREEZE_DECODER
    assert cfg.MODEL.DESSAM.LOSS_DISTILL_WEIGHT == 0.0
    assert cfg.MODEL.DESSAM.LOSS_PROJECTION_WEIGHT == 1.0
    assert cfg.MODEL.DESSAM.EMBEDDING_CACHE_DIR == ""
    assert cfg.OUTPUT_DIR == str(tmp_path / "whole_network")
    assert cfg.SOLVER.SAM_LR_FACTOR == 0.1  # SAM fine-tuned, not trained at the heads' rate
    solver = cfg.SOLVER.clone()
    solver.defrost()
    solver.SAM_LR_FACTOR = base.SOLVER.SAM_LR_FACTOR
    assert solver == base.SOLVER and cfg.MODEL.ROI_HEADS == base.MODEL.ROI_HEADS


def test_whole_network_step_trains_the_encoder_and_runs_no_teacher():
    torch.manual_seed(0)
    model = build_model(whole_network_config(tiny_cfg()))
    model.train()
    image = torch.randint(0, 255, (3, 256, 256), dtype=torch.uint8)
    inst = make_instances([[10, 10, 40, 40], [100, 100, 130, 140]], (256, 256))
    with EventStorage(0) as storage:
        losses = model([{"image": image, "height": 256, "width": 256, "instances": inst}])
        prompts = {k: v.latest() for k, v in storage.histories().items() if "prompts" in k}
    assert "loss_projection" in losses and not any("distill" in k for k in losses)
    assert prompts["mask_head/teacher_prompts"] == 0 and prompts["mask_head/student_prompts"] > 0
    sum(losses.values()).backward()
    encoder = [p for p in model.image_encoder.parameters()]
    assert encoder and all(p.requires_grad for p in encoder)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    decoder = list(model.mask_head.mask_decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in decoder)
