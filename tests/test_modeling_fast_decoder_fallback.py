"""The fast decoder checks once that SAM's decoder has the structure it was written for, and
falls back to segment-anything's MaskDecoder, with one warning, when it does not."""

import copy

import torch
from conftest import tiny_cfg
from segment_anything.modeling import MaskDecoder
from torch import nn

from dessam_d2.modeling import prompt_mask_head
from dessam_d2.modeling.fast_decoder import fast_path_mismatch
from dessam_d2.modeling.prompt_mask_head import SAMPromptMaskHead


class PatchedDecoder(MaskDecoder):
    """A decoder whose prediction differs from SAM's (as a fork's would)."""

    def predict_masks(self, *args, **kwargs):
        masks, iou = super().predict_masks(*args, **kwargs)
        return masks + 1.0, iou


def make_head():
    torch.manual_seed(0)
    return SAMPromptMaskHead(tiny_cfg(), None).eval()


def test_sams_own_decoder_passes_the_check():
    head = make_head()
    assert fast_path_mismatch(head.mask_decoder) is None
    assert head.fast_path_ok()


def test_each_kind_of_difference_is_named():
    dec = make_head().mask_decoder
    other = copy.deepcopy(dec)
    other.__class__ = PatchedDecoder
    assert "not segment-anything's MaskDecoder" in fast_path_mismatch(other)
    other = copy.deepcopy(dec)
    other.transformer.layers[1].norm3 = nn.Identity()
    assert "block 1's norm1..norm4" in fast_path_mismatch(other)
    other = copy.deepcopy(dec)
    other.transformer.final_attn_token_to_image.k_proj = nn.Linear(256, 128, bias=False)
    assert "final attn" in fast_path_mismatch(other)


def test_a_different_decoder_falls_back_to_its_own_forward_with_one_warning(
    monkeypatch, one_thread
):
    warnings = []
    monkeypatch.setattr(prompt_mask_head.logger, "warning", warnings.append)
    head = make_head()
    emb = torch.randn(1, 256, 16, 16)  # tiny_cfg: 256 px, patch 16
    boxes = torch.tensor([[10.0, 20.0, 60.0, 80.0], [100.0, 100.0, 140.0, 150.0]])
    head.mask_decoder.__class__ = PatchedDecoder
    with torch.no_grad():
        fast = head.decode(emb, boxes, student=True)
        again = head.decode(emb, boxes, student=True)
        head.set_decoding(fast=False)
        reference = head.decode(emb, boxes, student=True)
    assert len(warnings) == 1 and "PatchedDecoder" in warnings[0]
    # What came out is the patched decoder's own output (+1), not the fast path's.
    assert torch.equal(fast, reference) and torch.equal(again, reference)
