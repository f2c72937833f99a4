"""Pretraining of the demo's tiny SAM: box prompts, full mask supervision, synthetic scenes.

DES-SAM distils a SAM that already knows masks. The official SAM cannot ship with this project,
so the demo uses a tiny SAM (the shapes of ``configs/dessam_demo.yaml``) pretrained here the way
SAM was: image encoder, prompt encoder and mask decoder trained together to segment the object
in a (slightly jittered) box prompt, on data that is *not* the demo's cytology
(``dessam_d2/data/synthetic_shapes.py``). The result is written as an official SAM checkpoint (a
plain state dict under ``image_encoder.`` / ``prompt_encoder.`` / ``mask_decoder.``) and loaded by
the same strict loader as ``sam_vit_b_01ec64.pth``.

Run it with ``tools/pretrain_tiny_sam.py``; the shipped file is ``weights/tiny_sam_shapes.pth``.
"""

import json
import logging
import math
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from torch import nn

from .data.synthetic_shapes import render_shapes_scene
from .modeling.fast_decoder import SharedImageDecoder
from .modeling.losses import soft_dice_loss
from .modeling.prompt_mask_head import build_sam_prompt_modules
from .modeling.sam_backbone import SAMImageEncoder, sam_encoder_shape
from .modeling.sam_weights import load_sam_checkpoint
from .utils.io import atomic_open

logger = logging.getLogger(__name__)


def build_sam_parts(cfg: CfgNode) -> Dict[str, nn.Module]:
    """Trainable SAM parts with the shapes of ``cfg.MODEL.SAM``, under the checkpoint prefixes."""
    sam = cfg.MODEL.SAM
    encoder = SAMImageEncoder(
        img_size=sam.IMAGE_SIZE,
        patch_size=sam.PATCH_SIZE,
        out_chans=sam.PROMPT_EMBED_DIM,
        freeze=False,
        **sam_encoder_shape(cfg),
    )
    prompt_encoder, mask_decoder = build_sam_prompt_modules(
        sam.IMAGE_SIZE, sam.PATCH_SIZE, sam.PROMPT_EMBED_DIM, sam.DECODER_MLP_DIM
    )
    return {
        "image_encoder": encoder.encoder,
        "prompt_encoder": prompt_encoder,
        "mask_decoder": mask_decoder,
    }


def scene_batch(
    first_seed: int,
    batch: int,
    size: int,
    max_boxes: int,
    jitter: float,
    rng: np.random.Generator,
    num_objects: Tuple[int, int] = (4, 14),
) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(3 x S x S image, N x 4 prompt boxes, N x S x S masks) for scenes first_seed, ... .

    Prompt boxes are the masks' tight boxes with Gaussian noise of ``jitter`` x the box side on
    each coordinate (SAM's pretraining recipe), so the model learns to tolerate imprecise
    prompts such as a detector's.
    """
    for k in range(batch):
        image, masks = render_shapes_scene(first_seed + k, size, num_objects)
        if not masks:
            continue
        if len(masks) > max_boxes:
            masks = [masks[i] for i in sorted(rng.choice(len(masks), max_boxes, replace=False))]
        boxes = []
        for m in masks:
            ys, xs = np.nonzero(m)
            box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
            side = np.repeat(box[2:] - box[:2], 2)[[0, 2, 1, 3]]
            box += rng.normal(0, jitter, 4).astype(np.float32) * side
            boxes.append(np.clip(box, 0, size))
        yield (
            torch.from_numpy(image).permute(2, 0, 1).float(),
            torch.from_numpy(np.stack(boxes)),
            torch.from_numpy(np.stack(masks)).float(),
        )


def mask_loss(logits: torch.Tensor, masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) of N x 1 x h x w low-res logits against N x S x S masks, area-downsampled to
    h x w (soft targets at the border pixels of the low-res grid)."""
    target = F.interpolate(masks[:, None], logits.shape[-2:], mode="area")
    return F.binary_cross_entropy_with_logits(logits, target), soft_dice_loss(
        logits.sigmoid(), target
    )


def evaluate_parts(
    parts: Dict[str, nn.Module], cfg: CfgNode, seeds: List[int], pixel_mean, pixel_std
) -> float:
    """Mean mask IoU of box-prompted masks (exact boxes) on held-out scenes."""
    size = cfg.MODEL.SAM.IMAGE_SIZE
    rng = np.random.default_rng(0)
    ious = []
    with torch.no_grad():
        for seed in seeds:
            for image, boxes, masks in scene_batch(seed, 1, size, 64, 0.0, rng):
                emb = parts["image_encoder"](((image - pixel_mean) / pixel_std)[None])
                logits = decode(parts, emb, boxes)
                up = F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)
                pred = up[:, 0] > 0
                inter = (pred & (masks > 0)).sum((1, 2)).float()
                union = (pred | (masks > 0)).sum((1, 2)).float()
                ious.append((inter / union.clamp_min(1)).numpy())
    return float(np.concatenate(ious).mean())


def decode(parts: Dict[str, nn.Module], embedding: torch.Tensor, boxes: torch.Tensor, fast=False):
    """N x 1 x 4h x 4w single-mask logits of SAM's decoder for N boxes on one embedding.

    ``fast``: the shared-image decoder (same outputs and gradients, 4x faster in training).
    """
    pe = parts["prompt_encoder"]
    sparse, dense = pe(points=None, boxes=boxes, masks=None)
    if fast:
        shared = SharedImageDecoder(parts["mask_decoder"], embedding, pe.get_dense_pe(), dense[:1])
        return shared(sparse)
    logits, _ = parts["mask_decoder"](
        image_embeddings=embedding,
        image_pe=pe.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return logits


def pretrain_tiny_sam(
    cfg: CfgNode,
    output: str,
    iterations: int = 3000,
    batch: int = 4,
    lr: float = 1e-3,
    max_boxes: int = 8,
    jitter: float = 0.05,
    seed: int = 0,
    log_every: int = 25,
    save_every: int = 200,
    init: str = "",
    first_scene: int = 0,
    num_objects: Tuple[int, int] = (4, 14),
    stop_after: int = 0,
) -> Dict:
    """Train the SAM parts of ``cfg`` on synthetic scenes and write an official-format checkpoint.

    Scenes 0 .. iterations*batch-1 train (offset by ``first_scene``), scenes from 10**7 on are
    held out. ``init``: start from that checkpoint instead of random weights. Returns the log
    (losses every ``log_every`` iterations and the held-out mask IoU before and after).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    parts = build_sam_parts(cfg)
    if init:  # continue from an earlier run's checkpoint (a second phase)
        load_sam_checkpoint(parts, init)
    params = [p for m in parts.values() for p in m.parameters()]
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    held_out = list(range(10**7, 10**7 + 32))
    size = cfg.MODEL.SAM.IMAGE_SIZE
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = min(200, iterations // 10)

    def lr_at(it: int) -> float:  # linear warm-up, then cosine to 5 %
        if it < warmup:
            return lr * (it + 1) / warmup
        t = (it - warmup) / max(1, iterations - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    log = {"iterations": iterations, "batch": batch, "lr": lr, "seed": seed, "init": init}
    log["num_objects"] = list(num_objects)
    log["losses"] = []
    log["held_out_iou_before"] = evaluate_parts(parts, cfg, held_out, pixel_mean, pixel_std)
    logger.info(f"held-out mask IoU before pretraining: {log['held_out_iou_before']:.3f}")
    start = time.perf_counter()
    for it in range(stop_after or iterations):  # stop_after: the schedule is still `iterations`
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        samples = list(
            scene_batch(first_scene + it * batch, batch, size, max_boxes, jitter, rng, num_objects)
        )
        images = torch.stack([(img - pixel_mean) / pixel_std for img, _, _ in samples])
        embeddings = parts["image_encoder"](images)
        bce = dice = 0.0
        for emb, (_, boxes, masks) in zip(embeddings, samples):
            b, d = mask_loss(decode(parts, emb[None], boxes, fast=True), masks)
            bce, dice = bce + b / len(samples), dice + d / len(samples)
        loss = bce + dice
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if (it + 1) % log_every == 0 or it == 0:
            entry = {"iter": it + 1, "bce": round(bce.item(), 5), "dice": round(dice.item(), 5)}
            entry["seconds"] = round(time.perf_counter() - start, 1)
            log["losses"].append(entry)
            logger.info(json.dumps(entry))
        if save_every and (it + 1) % save_every == 0 and it + 1 < iterations:
            save_sam_checkpoint(parts, output)  # an interrupted run leaves a usable file
    log["held_out_iou_after"] = evaluate_parts(parts, cfg, held_out, pixel_mean, pixel_std)
    logger.info(f"held-out mask IoU after pretraining: {log['held_out_iou_after']:.3f}")
    save_sam_checkpoint(parts, output)
    return log


def save_sam_checkpoint(parts: Dict[str, nn.Module], path: str) -> None:
    """The parts as an official SAM checkpoint: one flat state dict, prefixed by part."""
    state = {
        f"{name}.{k}": v.detach().clone()
        for name, module in parts.items()
        for k, v in module.state_dict().items()
    }
    with atomic_open(path) as f:
        torch.save(state, f)
