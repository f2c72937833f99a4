"""Pretraining of the demo's tiny SAM: box prompts, full mask supervision, synthetic scenes.

DES-SAM distils a SAM that already knows masks. The official SAM cannot ship with this project,
so the demo uses a tiny SAM (the shapes of ``configs/dessam_demo.yaml``) pretrained here the way
SAM was: image encoder, prompt encoder and mask decoder trained together to segment the object
in a (slightly jittered) box prompt, on data that is *not* the demo's cytology
(``dessam_d2/data/synthetic/shapes.py``). The result is written as an official SAM checkpoint (a
plain state dict under ``image_encoder.`` / ``prompt_encoder.`` / ``mask_decoder.``) and loaded by
the same strict loader as ``sam_vit_b_01ec64.pth``.

``tools/pretrain_tiny_sam.py`` runs it; the shipped file is ``weights/tiny_sam_shapes.pth``.
"""

import json
import logging
import math
import os
import time
from typing import Dict, Iterator, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from torch import nn

from ..data.synthetic.shapes import render_shapes_scene
from ..modeling.fast_decoder import SharedImageDecoder
from ..modeling.losses import soft_dice_loss
from ..modeling.prompt_mask_head import build_sam_prompt_modules
from ..modeling.sam_backbone import SAMImageEncoder, sam_encoder_shape
from ..modeling.sam_weights import load_sam_checkpoint
from ..utils.io import atomic_open

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
    alike: float = 0.0,
) -> Iterator[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(3 x S x S image, N x 4 prompt boxes, N x S x S masks) for scenes first_seed, ... .

    Prompt boxes are the masks' tight boxes with Gaussian noise of ``jitter`` x the box side on
    each coordinate (SAM's pretraining recipe), so the model learns to tolerate imprecise
    prompts such as a detector's.
    """
    for k in range(batch):
        image, masks = render_shapes_scene(first_seed + k, size, num_objects, alike=alike)
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


def tie_attention_keys(mask_decoder: nn.Module) -> int:
    """Initialise the decoder's image<->token attentions with the key projection equal to the
    query projection; returns how many attentions were tied (a start, not a constraint).

    SAM's decoder localises a box prompt by attention between the prompt tokens, which carry the
    random Fourier encoding of the box corners, and the image tokens, which carry the same
    encoding of their positions. With independent random query and key projections the scores
    ``q(x)^T k(y)`` are unrelated to how close x and y are, and pretraining from scratch sits on
    a "predict nothing" plateau for hundreds of iterations. With ``W_k = W_q`` the score is
    ``(W x)^T (W y)``, a random projection of ``x^T y``: the Fourier encodings of nearby
    positions already match, so a corner token attends near its corner from the first step.
    """
    from segment_anything.modeling.transformer import Attention

    tied = 0
    with torch.no_grad():
        for name, module in mask_decoder.named_modules():
            if isinstance(module, Attention) and ("to_image" in name or "to_token" in name):
                module.k_proj.weight.copy_(module.q_proj.weight)
                tied += 1
    return tied


def scale_position_encoding(prompt_encoder: nn.Module, factor: float) -> None:
    """Multiply the random Fourier frequencies of SAM's positional encoding (the buffer
    ``prompt_encoder.pe_layer.positional_encoding_gaussian_matrix``, saved in the checkpoint).

    SAM draws them from N(0, 1) for 1024 px images whose objects span hundreds of pixels; in a
    256 px image with 10-30 px objects the encodings of a box corner and of a neighbour's pixels
    barely differ (correlation ~0.7 at 16 px), so the decoder cannot tell a prompted object from
    its look-alike neighbour by position. Larger frequencies make the code finer.
    """
    with torch.no_grad():
        prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(factor)


def evaluate_parts(
    parts: Dict[str, nn.Module],
    cfg: CfgNode,
    seeds: List[int],
    pixel_mean,
    pixel_std,
    jitter: float = 0.0,
) -> float:
    """Mean mask IoU of box-prompted masks on held-out scenes; prompts are the exact boxes, or
    boxes jittered by ``jitter`` x their side (seeded: the same boxes every call)."""
    size = cfg.MODEL.SAM.IMAGE_SIZE
    rng = np.random.default_rng(0)
    ious = []
    with torch.no_grad():
        for seed in seeds:
            for image, boxes, masks in scene_batch(seed, 1, size, 64, jitter, rng):
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
    tie_keys: bool = True,
    eval_every: int = 0,
    warmup: int = 200,
    alike: float = 0.0,
    pe_scale: float = 1.0,
) -> Dict:
    """Train the SAM parts of ``cfg`` on synthetic scenes and write an official-format checkpoint.

    Scenes first_scene, first_scene+1, ... train (``batch`` per iteration), scenes from 10**7 on
    are held out. ``init``: start from that checkpoint instead of random weights; otherwise the
    decoder's attentions start with tied keys (:func:`tie_attention_keys`) when ``tie_keys``.
    ``alike``: the share of scenes whose objects all look alike (see ``render_shapes_scene``).
    Resumable: every ``save_every`` iterations the checkpoint and a training state
    (``output + ".state"``: weights, optimiser, iteration, data RNG, log) are written atomically;
    calling again with the same arguments continues from the state (and ``stop_after`` then
    counts the iterations to reach in all). Returns the log: losses every ``log_every``
    iterations, the held-out mask IoU (exact and 10 %-jittered boxes) every ``eval_every`` and
    before/after.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    parts = build_sam_parts(cfg)
    if init:  # continue from an earlier run's checkpoint (a second phase)
        load_sam_checkpoint(parts, init)
    elif tie_keys:
        tie_attention_keys(parts["mask_decoder"])
    if pe_scale != 1.0:  # finer position codes: see scale_position_encoding
        scale_position_encoding(parts["prompt_encoder"], pe_scale)
    params = [p for m in parts.values() for p in m.parameters()]
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    held_out = list(range(10**7, 10**7 + 32))
    size = cfg.MODEL.SAM.IMAGE_SIZE
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warmup = min(warmup, iterations // 10)

    def lr_at(it: int) -> float:  # linear warm-up, then cosine to 5 %
        if it < warmup:
            return lr * (it + 1) / warmup
        t = (it - warmup) / max(1, iterations - warmup)
        return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    def held_out_iou(jit: float = 0.0) -> float:
        return round(evaluate_parts(parts, cfg, held_out, pixel_mean, pixel_std, jit), 4)

    state_path = output + ".state"
    start_it = 0
    if os.path.exists(state_path):
        state = torch.load(state_path, weights_only=False)
        for name, module in parts.items():
            module.load_state_dict(state["parts"][name])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        start_it, log = state["iteration"], state["log"]
        logger.info(f"resuming from {state_path} at iteration {start_it}")
    else:
        log = {"iterations": iterations, "batch": batch, "lr": lr, "seed": seed, "init": init}
        log.update(num_objects=list(num_objects), jitter=jitter, tie_keys=tie_keys and not init)
        log.update(max_boxes=max_boxes, warmup=warmup, alike=alike, pe_scale=pe_scale)
        log.update(losses=[], held_out=[])
        log["held_out_iou_before"] = held_out_iou()
        logger.info(f"held-out mask IoU before pretraining: {log['held_out_iou_before']:.3f}")
    start = time.perf_counter() - (log["losses"][-1]["seconds"] if log["losses"] else 0.0)

    def save_state(it: int) -> None:
        save_sam_checkpoint(parts, output)  # an interrupted run leaves a usable file
        state = {"parts": {n: m.state_dict() for n, m in parts.items()}, "iteration": it}
        state.update(optimizer=optimizer.state_dict(), rng=rng.bit_generator.state, log=log)
        with atomic_open(state_path) as f:
            torch.save(state, f)

    end_it = stop_after or iterations  # stop_after: the schedule is still `iterations`
    for it in range(start_it, end_it):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(it)
        samples = list(
            scene_batch(
                first_scene + it * batch, batch, size, max_boxes, jitter, rng, num_objects, alike
            )
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
        if eval_every and (it + 1) % eval_every == 0:
            entry = {"iter": it + 1, "iou": held_out_iou(), "iou_jitter_0.1": held_out_iou(0.1)}
            log["held_out"].append(entry)
            logger.info(json.dumps(entry))
        if save_every and (it + 1) % save_every == 0 and it + 1 < end_it:
            save_state(it + 1)
    log["held_out_iou_after"] = held_out_iou()
    log["held_out_iou_after_jitter_0.1"] = held_out_iou(0.1)
    logger.info(f"held-out mask IoU after pretraining: {log['held_out_iou_after']:.3f}")
    save_state(end_it)
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


def write_pretraining_log(log: Dict, output: str) -> str:
    """The log of ``pretrain_tiny_sam`` as JSON beside the checkpoint ``output`` (same name,
    ``.json``); returns its path."""
    path = os.path.splitext(output)[0] + ".json"
    with atomic_open(path) as f:
        f.write(json.dumps(log, indent=1).encode())
    return path
