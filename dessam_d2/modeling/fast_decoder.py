"""SAM's mask decoder for many box prompts on one image, with the shared work done once.

``MaskDecoder.predict_masks`` copies the image embedding and its positional encoding once per
prompt (``repeat_interleave``) and runs every projection of the L = h*w image tokens per prompt.
For box prompts most of that work is shared, or can be moved to the few prompt tokens:

* The dense prompt embedding of a box (no mask input) is one vector for every prompt, so
  ``src = embedding + dense`` is shared, and so are the first block's projections of the image
  tokens: k and v of its token->image attention and q of its image->token attention.
* After the first block every prompt has its own image tokens, but each attention pairs L image
  tokens with only T <= 8 prompt tokens. Applying a projection on the token side instead
  (``(q W_k) x^T`` instead of ``q (W_k x)^T``; ``(p x) W_v^T`` instead of ``p (x W_v^T)``, the
  weights p of a softmax summing to 1; ``W_o`` folded into the T token values) costs H*T instead
  of I multiply-adds per image token and channel: 56-64 instead of 128 for SAM's 8 heads, 7-8
  tokens and internal width 128, and 8 instead of 128 in the final attention, where only the
  mask token that is read needs an output.
* Single-mask output reads mask token 0 only: the other hypernetwork MLPs and the IoU head are
  skipped.
* The output upscaling (two 2x2 stride-2 transposed convolutions, LayerNorm2d, GELUs) maps each
  image token to its own 4x4 output pixels, so it runs as matrix products over tiles of image
  tokens that stay in the CPU cache, and the hypernetwork's dot product is taken per tile: the
  32-channel 4h x 4w map of each prompt never exists in memory.

Everything uses SAM's own modules and parameters (no copy, no re-training): the token-side
layers (self-attention, MLP, norms, hypernetwork, GELUs) are called as they are; the image-token
attentions and the upscaling use their modules' weights in the re-associated products above.
Outputs equal ``MaskDecoder(..., multimask_output=False)`` up to float rounding, gradients
included (tests/test_modeling_fast_decoder.py). ``fast_path_mismatch`` checks that a decoder has the
structure all this relies on; the mask head falls back to SAM's own ``MaskDecoder`` when not.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, TwoWayTransformer
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock
from torch import Tensor, nn
from torch.profiler import record_function
from torch.utils.checkpoint import checkpoint

# Image tokens that go through the transformer in one pass (as many prompts as fit, at least
# one): a prompt's tokens at ViT-B shapes (4096 x 256 float32, 4 MB) then stay in the CPU cache
# through the whole transformer. Measured fastest here: 1 prompt per pass in float32 (17.5 vs
# 20 ms per prompt for 2 or 4, 2 threads); 4 in bfloat16 (7.0 vs 9.7 for 1), hence x4 there.
PASS_TOKENS = 4096
# Image tokens per tile of the output upscaling: 1024 tokens x 64 channels x 4 sub-pixels of
# float32 (1 MB) stays in a core's L2 cache; measured fastest here among 256..4096.
UPSCALE_TILE_TOKENS = 1024


def _same_method(obj, cls, name: str) -> bool:
    return getattr(type(obj), name, None) is getattr(cls, name)


def _attention_mismatch(attn, name: str) -> Optional[str]:
    if not isinstance(attn, Attention) or not _same_method(attn, Attention, "forward"):
        return f"{name} is not segment-anything's Attention"
    projections = [getattr(attn, p, None) for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    if not all(isinstance(p, nn.Linear) and p.bias is not None for p in projections):
        return f"{name}'s q/k/v/out projections are not biased nn.Linear"
    if attn.internal_dim % attn.num_heads or attn.q_proj.out_features != attn.internal_dim:
        return f"{name}'s internal width does not split into its heads"
    return None


def fast_path_mismatch(decoder: nn.Module) -> Optional[str]:
    """None if ``decoder`` is segment-anything's MaskDecoder as ``SharedImageDecoder`` reads it
    (the classes and forward methods of the decoder, its two-way transformer, blocks and
    attentions, and the attributes used), else what differs."""
    if not isinstance(decoder, MaskDecoder) or not all(
        _same_method(decoder, MaskDecoder, m) for m in ("forward", "predict_masks")
    ):
        return f"{type(decoder).__name__} is not segment-anything's MaskDecoder"
    tr = getattr(decoder, "transformer", None)
    if not isinstance(tr, TwoWayTransformer) or not _same_method(tr, TwoWayTransformer, "forward"):
        return "its transformer is not segment-anything's TwoWayTransformer"
    if not isinstance(getattr(decoder, "iou_token", None), nn.Embedding) or not isinstance(
        getattr(decoder, "mask_tokens", None), nn.Embedding
    ):
        return "its iou_token / mask_tokens are not nn.Embedding"
    if len(getattr(decoder, "output_hypernetworks_mlps", ())) < 1:
        return "it has no output hypernetwork MLP"
    if not isinstance(getattr(decoder, "output_upscaling", None), nn.Module):
        return "it has no output_upscaling"
    if len(tr.layers) < 1 or not isinstance(getattr(tr, "norm_final_attn", None), nn.LayerNorm):
        return "its transformer has no blocks or no final norm"
    reason = _attention_mismatch(getattr(tr, "final_attn_token_to_image", None), "final attn")
    if reason:
        return reason
    for i, layer in enumerate(tr.layers):
        if not isinstance(layer, TwoWayAttentionBlock) or not _same_method(
            layer, TwoWayAttentionBlock, "forward"
        ):
            return f"block {i} is not segment-anything's TwoWayAttentionBlock"
        norms = [getattr(layer, f"norm{j}", None) for j in range(1, 5)]
        if not all(isinstance(n, nn.LayerNorm) for n in norms):
            return f"block {i}'s norm1..norm4 are not nn.LayerNorm"
        if not isinstance(getattr(layer, "mlp", None), MLPBlock):
            return f"block {i}'s mlp is not segment-anything's MLPBlock"
        for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            reason = _attention_mismatch(getattr(layer, name, None), f"block {i} {name}")
            if reason:
                return reason
    return None


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """N x T x I -> N x H x T x I/H"""
    n, t, c = x.shape
    return x.view(n, t, num_heads, c // num_heads).transpose(1, 2)


def _head_rows(linear: nn.Linear, num_heads: int) -> Tensor:
    """A C -> I projection's weight, rows grouped per head: H x I/H x C."""
    w = linear.weight
    return w.view(num_heads, w.shape[0] // num_heads, w.shape[1])


def _moves_projection_to_tokens(attn: Attention, num_tokens: int) -> bool:
    # Re-association pays when heads x tokens is below the attention's internal width.
    return attn.num_heads * num_tokens < attn.internal_dim


def tokens_to_image(
    attn: Attention, q_in: Tensor, keys: Tensor, pe: Tensor, keys_pe: Optional[Tensor] = None
) -> Tensor:
    """``attn(q=q_in, k=keys + pe, v=keys)`` with per-prompt image tokens.

    q_in: N x T x C prompt tokens; keys: N x L x C image tokens; pe: L x C their positional
    encoding; keys_pe: keys + pe if the caller has it. Returns N x T x C.
    """
    n, t, _ = q_in.shape
    h = attn.num_heads
    if not _moves_projection_to_tokens(attn, t):
        return attn(q=q_in, k=keys + pe if keys_pe is None else keys_pe, v=keys)
    d = attn.internal_dim // h
    q = _split_heads(attn.q_proj(q_in), h) / math.sqrt(d)  # N x H x T x d
    # q . (W_k x + b_k) = (q W_k) . x + q . b_k; the last term is constant along the softmax
    # axis (the image tokens), so it drops out.
    qk = (q @ _head_rows(attn.k_proj, h)).reshape(n, h * t, -1)  # N x HT x C
    if keys_pe is None:
        # Few query rows: two thin products beat materialising keys + pe (N x L x C).
        qk_pe = (qk.reshape(n * h * t, -1) @ pe.t()).view(n, h * t, -1)
        logits = torch.baddbmm(qk_pe, qk, keys.transpose(1, 2))  # N x HT x L
    else:
        logits = qk @ keys_pe.transpose(1, 2)  # N x HT x L
    # sum_l p_l (W_v x_l + b_v) = W_v (sum_l p_l x_l) + b_v, because the p_l sum to 1.
    ctx = (logits.softmax(-1) @ keys).view(n, h, t, -1)  # N x H x T x C
    out = ctx @ _head_rows(attn.v_proj, h).transpose(1, 2) + attn.v_proj.bias.view(h, 1, d)
    return attn.out_proj(out.transpose(1, 2).reshape(n, t, h * d))


def image_to_tokens_residual(
    attn: Attention,
    keys: Tensor,
    k_in: Tensor,
    v_in: Tensor,
    keys_pe: Optional[Tensor] = None,
    q_shared: Optional[Tensor] = None,
) -> Tensor:
    """``keys + attn(q=keys_pe, k=k_in, v=v_in)``: the image tokens attend to the prompt tokens.

    keys: N x L x C (or L x C when shared by all prompts); k_in, v_in: N x T x C prompt tokens.
    The queries are either keys_pe (N x L x C) or, for shared image tokens, their projection
    q_shared = q_proj(keys + pe) (L x I). Returns N x L x C.
    """
    n, t, _ = k_in.shape
    h = attn.num_heads
    d = attn.internal_dim // h
    reassociate = _moves_projection_to_tokens(attn, t)
    if q_shared is None and not reassociate:
        return keys + attn(q=keys_pe, k=k_in, v=v_in)
    k = _split_heads(attn.k_proj(k_in), h) / math.sqrt(d)  # N x H x T x d
    v = _split_heads(attn.v_proj(v_in), h)  # N x H x T x d
    # Logits laid out N x H x T x L: a softmax over T is then a vectorised reduction over rows
    # of L, ~10x faster on a CPU than over a last axis of 7 or 8.
    if q_shared is not None:
        big_l = q_shared.shape[0]
        qh = q_shared.view(big_l, h, d).permute(1, 2, 0)  # H x d x L
        logits = k.transpose(0, 1).reshape(h, n * t, d) @ qh  # H x NT x L
        logits = logits.view(h, n, t, big_l).transpose(0, 1)  # N x H x T x L
    else:
        big_l = keys_pe.shape[1]
        # (W_q x + b_q) . k = x . (W_q^T k) + b_q . k
        qk = (k @ _head_rows(attn.q_proj, h)).reshape(n, h * t, -1)  # N x HT x C
        bias = (k @ attn.q_proj.bias.view(h, d, 1)).view(n, h * t, 1)
        logits = torch.baddbmm(bias, qk, keys_pe.transpose(1, 2)).view(n, h, t, big_l)
    probs = logits.softmax(2)  # over the prompt tokens
    if not reassociate:
        out = (probs.transpose(2, 3) @ v).transpose(1, 2).reshape(n, big_l, h * d)
        return keys + attn.out_proj(out)
    # out_proj(concat_h sum_t p v) = sum_{h,t} p (v W_o,h^T) + b_o. Each head's p sum to 1, so
    # b_o / H added to every value row gives b_o, and the residual comes in the same product.
    wo = attn.out_proj.weight.view(-1, h, d).permute(1, 2, 0)  # H x d x C
    vo = (v @ wo).reshape(n, h * t, -1) + attn.out_proj.bias / h  # N x HT x C
    probs = probs.reshape(n, h * t, big_l).transpose(1, 2)  # N x L x HT
    return torch.baddbmm(keys.expand(n, big_l, -1), probs, vo)


def _upscaling_as_matmuls(upscaling: nn.Sequential) -> bool:
    """Whether ``output_upscaling`` is SAM's: ConvT(2, 2), LayerNorm2d, act, ConvT(2, 2), act."""
    if len(upscaling) != 5:
        return False
    conv1, norm, _, conv2, _ = upscaling
    return all(
        isinstance(c, nn.ConvTranspose2d)
        and c.kernel_size == (2, 2)
        and c.stride == (2, 2)
        and c.padding == (0, 0)
        and c.output_padding == (0, 0)
        and c.groups == 1
        and c.bias is not None
        for c in (conv1, conv2)
    ) and isinstance(norm, LayerNorm2d)


class SharedImageDecoder:
    """``MaskDecoder`` prompted with many boxes on one image, single-mask output.

    Built once per image embedding (1 x C x h x w); call it with each chunk of sparse prompt
    embeddings (N x T_prompt x C: SAM's box corners, plus any extra tokens) to get the logits of
    mask token 0 (N x 1 x 4h x 4w), as ``mask_decoder(embedding, image_pe, sparse, dense,
    multimask_output=False)[0]`` with the dense embedding of "no mask" (1 x C x h x w, the same
    for every prompt).

    ``prompts_per_pass``: prompts that go through the transformer together (None: as many as
    make ``PASS_TOKENS`` image tokens, x4 under bfloat16 autocast; outputs do not depend on it).
    ``checkpoint_upscaling``: with autograd on, recompute each prompt's upscaling in the backward
    pass instead of keeping its activations.
    """

    def __init__(
        self,
        mask_decoder: MaskDecoder,
        image_embedding: Tensor,
        image_pe: Tensor,
        dense_embedding: Tensor,
        checkpoint_upscaling: bool = True,
        prompts_per_pass: Optional[int] = None,
    ):
        if image_embedding.shape[0] != 1 or dense_embedding.shape[0] != 1:
            raise ValueError("SharedImageDecoder takes one image and one shared dense embedding")
        self.decoder = mask_decoder
        _, _, self.h, self.w = image_embedding.shape
        self.src = (image_embedding + dense_embedding).flatten(2)[0].t()  # L x C
        self.pe = image_pe.flatten(2)[0].t().contiguous()  # L x C
        first = mask_decoder.transformer.layers[0]
        src_pe = self.src + self.pe
        # The first block's image side, shared by all prompts.
        with record_function("dessam/decoder/shared_image_side"):
            self.k0 = first.cross_attn_token_to_image.k_proj(src_pe)  # L x I
            self.v0 = first.cross_attn_token_to_image.v_proj(self.src)  # L x I
            self.q0 = first.cross_attn_image_to_token.q_proj(src_pe)  # L x I
        self.fast_upscaling = _upscaling_as_matmuls(mask_decoder.output_upscaling)
        self.checkpoint_upscaling = checkpoint_upscaling
        self.prompts_per_pass = prompts_per_pass

    def output_tokens(self, sparse: Tensor) -> Tensor:
        """SAM's IoU and mask tokens followed by the prompt tokens: N x (1 + M + T_prompt) x C."""
        dec = self.decoder
        out = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
        out = out.unsqueeze(0).expand(sparse.shape[0], -1, -1)
        return torch.cat([out, sparse.to(out.dtype)], dim=1)

    def __call__(self, sparse: Tensor) -> Tensor:
        per_pass = self.prompts_per_pass
        if per_pass is None:
            tokens = PASS_TOKENS * (4 if torch.is_autocast_enabled(sparse.device.type) else 1)
            per_pass = max(1, tokens // (self.h * self.w))
        return torch.cat([self._decode(s) for s in sparse.split(per_pass)])

    def _decode(self, sparse: Tensor) -> Tensor:
        point_embedding = self.output_tokens(sparse)
        queries, keys = point_embedding, None  # keys None: the shared first-block image tokens
        for i, layer in enumerate(self.decoder.transformer.layers):
            with record_function(f"dessam/decoder/block{i}"):
                queries, keys = self._block(layer, queries, keys, point_embedding)
        return self._mask(queries, keys, point_embedding)

    def _block(self, layer, queries: Tensor, keys: Optional[Tensor], query_pe: Tensor):
        """TwoWayAttentionBlock.forward; keys None stands for the shared image tokens src."""
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)

        q = queries + query_pe
        if keys is None:
            attn_out = self._shared_tokens_to_image(layer.cross_attn_token_to_image, q)
            keys_pe = None
        else:
            keys_pe = keys + self.pe
            attn_out = tokens_to_image(layer.cross_attn_token_to_image, q, keys, self.pe, keys_pe)
        queries = layer.norm2(queries + attn_out)

        queries = layer.norm3(queries + layer.mlp(queries))

        q = queries + query_pe
        i2t = layer.cross_attn_image_to_token
        if keys is None:
            keys = image_to_tokens_residual(i2t, self.src, q, queries, q_shared=self.q0)
        else:
            keys = image_to_tokens_residual(i2t, keys, q, queries, keys_pe=keys_pe)
        return queries, layer.norm4(keys)

    def _shared_tokens_to_image(self, attn: Attention, q_in: Tensor) -> Tensor:
        """attn(q=q_in, k=src + pe, v=src) with the precomputed projections of the image side."""
        n, t, _ = q_in.shape
        h = attn.num_heads
        d = attn.internal_dim // h
        q = _split_heads(attn.q_proj(q_in), h)  # N x H x T x d
        k = self.k0.view(-1, h, d).permute(1, 2, 0)  # H x d x L
        v = self.v0.view(-1, h, d).transpose(0, 1)  # H x L x d
        q = q.transpose(0, 1).reshape(h, n * t, d)  # H x NT x d
        probs = ((q @ k) / math.sqrt(d)).softmax(-1)  # H x NT x L
        out = (probs @ v).view(h, n, t, d).permute(1, 2, 0, 3).reshape(n, t, h * d)
        return attn.out_proj(out)

    def _mask(self, queries: Tensor, keys: Tensor, point_embedding: Tensor) -> Tensor:
        """Final token->image attention for mask token 0, hypernetwork 0 and upscaling."""
        dec = self.decoder
        tr = dec.transformer
        # Token 0 is the IoU token, token 1 mask token 0: the one single-mask output reads. The
        # final attention and its norm act per query token, so the others need no output.
        q = queries[:, 1:2] + point_embedding[:, 1:2]
        attn_out = tokens_to_image(tr.final_attn_token_to_image, q, keys, self.pe)
        token = tr.norm_final_attn(queries[:, 1:2] + attn_out)  # N x 1 x C
        hyper = dec.output_hypernetworks_mlps[0](token)  # N x 1 x C/8
        if not self.fast_upscaling:
            n = keys.shape[0]
            upscaled = dec.output_upscaling(keys.transpose(1, 2).view(n, -1, self.h, self.w))
            b, c, h, w = upscaled.shape
            return (hyper @ upscaled.view(b, c, h * w)).view(b, 1, h, w)
        with record_function("dessam/decoder/upscaling"):
            return self._upscaled_mask(keys, hyper)

    def _upscaled_mask(self, keys: Tensor, hyper: Tensor) -> Tensor:
        """hyper . output_upscaling(keys), a few prompts at a time: N x 1 x 4h x 4w.

        With autograd on, the upscaling is recomputed in the backward pass instead of keeping
        its activations: 24 of the 52 MB a student prompt keeps for the backward pass at ViT-B
        shapes (80 prompts: peak RSS 5.7 -> 3.7 GB), for one more upscaling per prompt
        (~10 ms single-threaded, within the noise of the step time here).
        """
        n, big_l, _ = keys.shape
        group = max(1, UPSCALE_TILE_TOKENS // big_l)  # prompts per tile if a prompt is smaller
        pieces = []
        for x, hy in zip(keys.split(group), hyper.split(group)):
            if torch.is_grad_enabled() and self.checkpoint_upscaling:
                pieces.append(checkpoint(self._upscale_group, x, hy, use_reentrant=False))
            else:
                pieces.append(self._upscale_group(x, hy))
        # token (y, x), first sub-pixel (i, j), second (k, l) -> pixel (4y + 2i + k, 4x + 2j + l)
        m = torch.cat(pieces).view(n, self.h, self.w, 2, 2, 2, 2)
        return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(n, 1, 4 * self.h, 4 * self.w)

    def _upscale_group(self, x: Tensor, hyper: Tensor) -> Tensor:
        """G prompts' G x L x C image tokens and G x 1 x C/8 hypernetwork outputs -> G x 16L
        logits, 16 per token (its 4 x 4 output pixels); one prompt is cut into tiles."""
        g, big_l, c = x.shape
        if g == 1:
            tiles = [self._upscale_rows(t) @ hyper[0, 0] for t in x[0].split(UPSCALE_TILE_TOKENS)]
            return torch.cat(tiles)[None]
        z = self._upscale_rows(x.reshape(g * big_l, c)).view(g, 16 * big_l, -1)
        return (z @ hyper.transpose(1, 2)).squeeze(2)

    def _upscale_rows(self, rows: Tensor) -> Tensor:
        """output_upscaling of R image tokens (R x C) -> their 16 R output pixels x C/8.

        A 2x2 stride-2 transposed convolution maps each input pixel to its own 2x2 output
        pixels: a product with the weight as C_in x (2 * 2 * C_out), sub-pixels before channels
        so the LayerNorm2d over channels is a layer norm over the last axis.
        """
        conv1, norm, act1, conv2, act2 = self.decoder.output_upscaling
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * c1)
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        y = torch.addmm(conv1.bias.repeat(4), rows, w1).view(-1, c1)  # 4R x c1
        y = act1(F.layer_norm(y, (c1,), norm.weight, norm.bias, norm.eps))
        return act2(torch.addmm(conv2.bias.repeat(4), y, w2)).view(-1, c2)  # 16R x c2
