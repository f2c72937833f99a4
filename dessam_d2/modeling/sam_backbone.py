"""SAM's image encoder as a Detectron2 Backbone, and the SimpleFeaturePyramid built on it."""

from functools import partial
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import BACKBONE_REGISTRY, Backbone, ShapeSpec, SimpleFeaturePyramid
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from ..errors import ConfigError

# Encoder shapes of the official checkpoints (segment_anything/build_sam.py).
SAM_VARIANTS = {
    "vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
}


def sam_encoder_shape(cfg: CfgNode) -> dict:
    """The encoder's shape for cfg.MODEL.SAM (an official variant or the custom ENCODER_* keys)."""
    sam = cfg.MODEL.SAM
    if sam.VARIANT in SAM_VARIANTS:
        shape = dict(SAM_VARIANTS[sam.VARIANT])
        shape["window_size"] = 14
    elif sam.VARIANT == "custom":
        shape = dict(
            embed_dim=sam.ENCODER_EMBED_DIM,
            depth=sam.ENCODER_DEPTH,
            num_heads=sam.ENCODER_NUM_HEADS,
            global_attn_indexes=tuple(sam.ENCODER_GLOBAL_ATTN_INDEXES),
            window_size=sam.ENCODER_WINDOW_SIZE,
        )
    else:
        raise ConfigError(
            f"MODEL.SAM.VARIANT={sam.VARIANT!r} is unknown: use one of "
            f"{sorted(SAM_VARIANTS)} or 'custom'"
        )
    return shape


class SAMImageEncoder(Backbone):
    """SAM's ``ImageEncoderViT`` as a Backbone with one output, ``"sam_embed"`` (stride = patch):
    padded, normalised images (B x 3 x S x S) in, their embeddings (B x C x S/p x S/p) out.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        window_size: int = 14,
        out_chans: int = 256,
        freeze: bool = True,
    ):
        super().__init__()
        self.encoder = ImageEncoderViT(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=3,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4.0,
            out_chans=out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=True,
            rel_pos_zero_init=True,
            window_size=window_size,
            global_attn_indexes=tuple(global_attn_indexes),
        )
        self.img_size = img_size
        self.embed_size = img_size // patch_size
        self.out_chans = out_chans
        self.frozen = freeze
        if freeze:
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        self._out_features = ["sam_embed"]
        self._out_feature_channels = {"sam_embed": out_chans}
        self._out_feature_strides = {"sam_embed": patch_size}

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen:
            # A frozen encoder stays in eval mode (SAM has no dropout/BN, but be explicit).
            self.encoder.eval()
        return self

    def encode(self, images: torch.Tensor, encoder: Optional[nn.Module] = None) -> torch.Tensor:
        """B x 3 x S x S normalised images -> B x C x S/p x S/p embeddings, by SAM's encoder or
        by ``encoder`` (a copy of it, e.g. the int8 one of precision.py, run without grad)."""
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"SAM's encoder takes {self.img_size}x{self.img_size} inputs, got "
                f"{tuple(images.shape[-2:])}: resize the longest side and pad first"
            )
        if encoder is not None:
            with torch.no_grad():
                return encoder(images)
        if self.frozen:
            with torch.no_grad():
                return self.encoder(images)
        return self.encoder(images)

    def check_embedding(self, embedding: torch.Tensor) -> None:
        """Raise unless ``embedding`` is B x C x h x w with h, w <= S/p: this encoder's output,
        possibly cropped at the bottom/right (``DESSAM.crop_to_images``)."""
        if (
            embedding.dim() != 4
            or embedding.shape[1] != self.out_chans
            or max(embedding.shape[-2:]) > self.embed_size
        ):
            raise ValueError(
                f"expected SAM embeddings of {self.out_chans} x <={self.embed_size} x "
                f"<={self.embed_size}, got a tensor of {tuple(embedding.shape)}"
            )

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {"sam_embed": self.encode(images)}


class SAMFeaturePyramid(SimpleFeaturePyramid):
    """Detectron2's SimpleFeaturePyramid on the SAM encoder (``net``), with its two halves public.

    ``encode(images)`` runs SAM's encoder (B x 3 x S x S normalised images -> B x C x S/p x S/p
    embeddings) and ``from_embedding(embedding)`` builds the pyramid levels from an embedding
    (computed, read from the embedding cache, cropped to the images' extent): DES-SAM decides when
    the encoder runs. ``forward(images)`` is both, Detectron2's Backbone contract (the fully
    supervised reference's ``GeneralizedRCNN`` uses it).
    """

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.encode(images)

    def from_embedding(self, embedding: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The pyramid levels ("p2".."p5") of SAM embeddings (B x C x h x w)."""
        self.net.check_embedding(embedding)
        names = list(self.output_shape())  # p2, p3, ... (then the top block's, if any)
        results = [stage(embedding) for stage in self.stages]
        if self.top_block is not None:
            name = self.top_block.in_feature
            if name == self.in_feature:
                results.extend(self.top_block(embedding))
            else:
                results.extend(self.top_block(results[names.index(name)]))
        return dict(zip(names, results))

    def forward(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.from_embedding(self.encode(images))


@BACKBONE_REGISTRY.register()
def build_sam_sfp_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """SAM encoder + Detectron2's SimpleFeaturePyramid (MODEL.SAM.PYRAMID_SCALE_FACTORS; the
    paper's 4, 2, 1, 0.5 of a patch-16 embedding -> p2..p5): a ``SAMFeaturePyramid``."""
    sam = cfg.MODEL.SAM
    encoder = SAMImageEncoder(
        img_size=sam.IMAGE_SIZE,
        patch_size=sam.PATCH_SIZE,
        out_chans=sam.PROMPT_EMBED_DIM,
        freeze=sam.FREEZE_ENCODER,
        **sam_encoder_shape(cfg),
    )
    return SAMFeaturePyramid(
        net=encoder,
        in_feature="sam_embed",
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        scale_factors=tuple(sam.PYRAMID_SCALE_FACTORS),
        norm=cfg.MODEL.FPN.NORM,
        square_pad=sam.IMAGE_SIZE,
    )
