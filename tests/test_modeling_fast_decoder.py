"""The shared-work decoder gives segment-anything's MaskDecoder outputs and gradients."""

import pytest
import torch

from dessam_d2.modeling import fast_decoder
from dessam_d2.modeling.fast_decoder import SharedImageDecoder
from dessam_d2.modeling.prompt_mask_head import SAMPromptMaskHead, build_sam_prompt_modules

IMAGE_SIZE = 256  # 16 x 16 embedding


def make_heads(num_tokens=1, chunk_size=40, freeze=True, seed=0, **kw):
    """Two heads on the very same SAM modules: the fast decoder and segment-anything's."""
    torch.manual_seed(seed)
    prompt_encoder, mask_decoder = build_sam_prompt_modules(IMAGE_SIZE, 16, 256, 256)
    with torch.no_grad():
        # Non-trivial biases and norm affines, so that every re-associated bias term counts.
        for p in list(mask_decoder.parameters()) + list(prompt_encoder.parameters()):
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(1 + 0.1 * torch.randn_like(p))
        # Logits of a trained SAM reach +-20..30; a random one's stay below 1.
        last = mask_decoder.output_hypernetworks_mlps[0].layers[-1]
        last.weight.mul_(60.0)
        last.bias.mul_(60.0)
    heads = []
    for fast in (True, False):
        heads.append(
            SAMPromptMaskHead(
                prompt_encoder=prompt_encoder,
                mask_decoder=mask_decoder,
                image_size=IMAGE_SIZE,
                num_learnable_tokens=num_tokens,
                chunk_size=chunk_size,
                freeze_decoder=freeze,
                fast_decoder=fast,
                **kw,
            )
        )
    heads[1].learnable_tokens = heads[0].learnable_tokens  # shared, as in one model
    return heads


def inputs(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(1, 256, 16, 16, generator=g)
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 8 + 40 * torch.rand(n, 2, generator=g)], dim=1)
    return emb, boxes


@pytest.mark.parametrize("chunk_size", [1, 3, 40])
@pytest.mark.parametrize("num_tokens", [1, 10])  # 10: 17 tokens, the non-re-associated path
@pytest.mark.parametrize("student", [False, True])
def test_logits_equal_segment_anything_for_any_chunk_size(chunk_size, num_tokens, student):
    fast, ref = make_heads(num_tokens, chunk_size)
    emb, boxes = inputs()
    with torch.no_grad():
        a = fast.decode(emb, boxes, student=student)
        b = ref.decode(emb, boxes, student=student)
    assert a.shape == b.shape == (7, 1, 64, 64)
    assert b.abs().max() > 10.0  # logits as large as a trained SAM's
    # Float32 rounding, relative to the largest logit: measured at most 1.02e-6 over 6 seeds x
    # every parametrisation here, with 1 and 2 threads (2.6e-5 absolute at logits of 29).
    assert (a - b).abs().max() <= 2e-6 * b.abs().max()
    assert mask_iou(a > 0, b > 0).min() >= 0.99  # measured: 1.0


def mask_iou(a, b):
    return (a & b).sum((1, 2, 3)) / (a | b).sum((1, 2, 3)).clamp_min(1)


def test_teacher_and_student_differ_and_student_reads_the_learnable_tokens():
    fast, _ = make_heads()
    emb, boxes = inputs()
    with torch.no_grad():
        teacher = fast.decode(emb, boxes, student=False)
        student = fast.decode(emb, boxes, student=True)
    assert not torch.allclose(teacher, student, atol=1e-3)


@pytest.mark.parametrize("freeze", [True, False])
def test_gradients_equal_segment_anything(freeze):
    """Learnable tokens (and, with an unfrozen decoder, every decoder weight) get the same
    gradients from the fast decoder as from segment-anything's."""
    fast, ref = make_heads(chunk_size=3, freeze=freeze)
    emb, boxes = inputs()
    weights = torch.randn(7, 1, 64, 64, generator=torch.Generator().manual_seed(3))
    grads = []
    for head in (fast, ref):
        head.train()
        params = [p for p in head.parameters() if p.requires_grad]
        loss = (head.decode(emb, boxes, student=True) * weights).sum()
        # The fast decoder skips the IoU head and the unread mask tokens' MLPs: no gradient
        # there, where segment-anything's gives an exact zero.
        g = torch.autograd.grad(loss, params, allow_unused=True)
        grads.append({id(p): torch.zeros_like(p) if x is None else x for p, x in zip(params, g)})
    assert grads[0].keys() == grads[1].keys()
    assert len(grads[0]) == (1 if freeze else sum(p.requires_grad for p in ref.parameters()))
    tokens = id(fast.learnable_tokens)
    for k, g in grads[1].items():
        # Float rounding relative to the largest gradient entry (sums over 7 x 64 x 64 logits).
        scale = g.abs().max().clamp_min(1.0)
        atol = 1e-5 if k == tokens else 1e-4
        torch.testing.assert_close(grads[0][k] / scale, g / scale, rtol=1e-4, atol=atol)
    assert grads[0][id(fast.learnable_tokens)].abs().sum() > 0


@pytest.mark.parametrize("tile_tokens", [64, 1024])
def test_recomputed_upscaling_gives_the_same_gradients(tile_tokens, monkeypatch):
    monkeypatch.setattr(fast_decoder, "UPSCALE_TILE_TOKENS", tile_tokens)
    fast, _ = make_heads()
    emb, boxes = inputs(n=4)
    _, dense = fast.prompt_encoder(points=None, boxes=boxes, masks=None)
    sparse, _ = fast.prompt_encoder(points=None, boxes=boxes, masks=None)
    sparse = sparse.clone().requires_grad_(True)
    grads = []
    for ckpt in (True, False):
        dec = SharedImageDecoder(
            fast.mask_decoder, emb, fast.prompt_encoder.get_dense_pe(), dense[:1], ckpt
        )
        (g,) = torch.autograd.grad(dec(sparse).square().sum(), sparse)
        grads.append(g)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile_tokens", [64, 1024])  # 4 tiles per prompt; 4 prompts per tile
def test_segment_anything_upscaling_modules_give_the_same_masks(tile_tokens, monkeypatch):
    """The tile-wise matrix-product upscaling equals calling output_upscaling itself."""
    monkeypatch.setattr(fast_decoder, "UPSCALE_TILE_TOKENS", tile_tokens)
    fast, _ = make_heads()
    emb, boxes = inputs()
    sparse, dense = fast.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = fast.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        dec = SharedImageDecoder(fast.mask_decoder, emb, pe, dense[:1])
        assert dec.fast_upscaling
        tiled = dec(sparse)
        dec.fast_upscaling = False
        modules = dec(sparse)
    assert (tiled - modules).abs().max() <= 2e-6 * modules.abs().max()


def test_bfloat16_only_in_inference_and_masks_agree_with_float32():
    fast, _ = make_heads(inference_dtype="bfloat16")
    emb, boxes = inputs(n=12)
    fast.eval()
    with torch.no_grad():
        bf16 = fast.decode(emb, boxes, student=True)
        assert fast.set_decoding(inference_dtype="float32")["inference_dtype"] == "bfloat16"
        fp32 = fast.decode(emb, boxes, student=True)
        fast.set_decoding(inference_dtype="bfloat16")
        fast.train()  # training: the teacher's targets stay float32
        train = fast.decode(emb, boxes, student=True)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.equal(train, fp32)
    iou = mask_iou(fp32 > 0, bf16 > 0)
    # measured over 8 seeds, 1 and 2 threads: mean 0.991-0.998, worst mask 0.984
    assert iou.mean() >= 0.99 and iou.min() >= 0.98


def test_no_boxes_give_an_empty_mask_batch():
    fast, _ = make_heads()
    emb, _ = inputs()
    out = fast.decode(emb, torch.zeros(0, 4), student=True)
    assert out.shape == (0, 1, 64, 64)


def test_prompts_per_pass_does_not_change_the_logits():
    fast, _ = make_heads()
    emb, boxes = inputs(n=5)
    sparse, dense = fast.prompt_encoder(points=None, boxes=boxes, masks=None)
    pe = fast.prompt_encoder.get_dense_pe()
    with torch.no_grad():
        one = SharedImageDecoder(fast.mask_decoder, emb, pe, dense[:1], prompts_per_pass=1)
        all_at_once = SharedImageDecoder(fast.mask_decoder, emb, pe, dense[:1], prompts_per_pass=5)
        reference = all_at_once(sparse)
        assert (one(sparse) - reference).abs().max() <= 2e-6 * reference.abs().max()
