"""The DES-SAM meta-architecture: SAM encoder -> SimpleFeaturePyramid -> RPN -> box head ->
SAM prompt mask head (Fig. 2 of the paper)."""

import contextlib
import logging
import time
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import (
    META_ARCH_REGISTRY,
    Backbone,
    build_backbone,
    build_proposal_generator,
    build_roi_heads,
)
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn
from torch.profiler import record_function

from .embedding_cache import EmbeddingCache, cached_encode, encoder_fingerprint, weights_state
from .postprocess import detections_to_original
from .precision import quantize_linear_int8, resolve_inference_dtype, resolve_train_dtype
from .sam_weights import load_sam_checkpoint
from .settings import DetectorSettings

logger = logging.getLogger(__name__)

# Loss terms of L_dect (Eq. 1, plus the RPN's), scaled by lambda_dect.
DETECTION_LOSSES = ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg")


@META_ARCH_REGISTRY.register()
class DESSAM(DetectorSettings, nn.Module):
    """Box-supervised nucleus instance segmentation on a frozen SAM.

    Inputs follow Detectron2: a list of dicts with "image" (3 x h x w RGB uint8, longest side
    resized to ``image_size`` by the mapper), "height"/"width" (original size) and, in training,
    "instances" with ``gt_boxes`` only. Outputs: [{"instances": Instances}] with ``pred_boxes``,
    ``scores``, ``pred_classes`` and ``pred_masks`` (bool, original size).

    Callers change its settings through methods (DetectorSettings', ``set_inference_dtype``,
    ``set_learnable_tokens``), not its parts' attributes.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: List[float],
        pixel_std: List[float],
        image_size: int,
        loss_dect_weight: float = 1.0,
        mask_logit_threshold: float = 0.5,
        sam_checkpoint: str = "",
        sam_variant: str = "",
        embedding_cache_dir: str = "",
        embedding_cache_dtype: str = "float16",
        embedding_cache_max_gb: float = 20.0,
        inference_dtype: str = "auto",
        train_dtype: str = "float32",
    ):
        super().__init__()
        self.backbone = backbone
        self.proposal_generator = proposal_generator
        self.roi_heads = roi_heads
        self.image_size = image_size
        self.loss_dect_weight = loss_dect_weight
        self.mask_logit_threshold = float(mask_logit_threshold)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if sam_checkpoint:
            load_sam_checkpoint(self.sam_parts(), sam_checkpoint, sam_variant)
        self.embedding_cache: Optional[EmbeddingCache] = None
        if embedding_cache_dir and not self.image_encoder.frozen:
            logger.warning(
                "MODEL.DESSAM.EMBEDDING_CACHE_DIR is ignored: the SAM encoder is trained "
                "(MODEL.SAM.FREEZE_ENCODER False), so its embeddings change every step"
            )
        elif embedding_cache_dir:
            self.embedding_cache = EmbeddingCache(
                embedding_cache_dir, embedding_cache_dtype, embedding_cache_max_gb
            )
        self._fingerprint, self._fingerprint_state, self._cache_logged = "", None, time.time()
        self._int8_encoder: Optional[tuple] = None  # (weights state, quantised copy)
        self.set_inference_dtype(inference_dtype)
        resolve_train_dtype(train_dtype, "cpu")  # reject a wrong value now
        self.train_dtype_setting = train_dtype
        trainable, frozen = count_parameters(self)
        logger.info(
            f"DESSAM parameters: {trainable / 1e6:.2f}M trainable, {frozen / 1e6:.2f}M frozen"
        )

    @classmethod
    def from_config(cls, cfg: CfgNode):
        backbone = build_backbone(cfg)
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, backbone.output_shape()),
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "image_size": cfg.MODEL.SAM.IMAGE_SIZE,
            "loss_dect_weight": cfg.MODEL.DESSAM.LOSS_DECT_WEIGHT,
            "mask_logit_threshold": cfg.MODEL.DESSAM.MASK_LOGIT_THRESHOLD,
            "sam_checkpoint": cfg.MODEL.SAM.CHECKPOINT,
            "sam_variant": cfg.MODEL.SAM.VARIANT,
            "embedding_cache_dir": cfg.MODEL.DESSAM.EMBEDDING_CACHE_DIR,
            "embedding_cache_dtype": cfg.MODEL.DESSAM.EMBEDDING_CACHE_DTYPE,
            "embedding_cache_max_gb": cfg.MODEL.DESSAM.EMBEDDING_CACHE_MAX_GB,
            "inference_dtype": cfg.MODEL.DESSAM.INFERENCE_DTYPE,
            "train_dtype": cfg.MODEL.DESSAM.TRAIN_DTYPE,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def image_encoder(self) -> nn.Module:
        """The SAM encoder Backbone inside the SimpleFeaturePyramid."""
        return self.backbone.net

    @property
    def mask_head(self) -> nn.Module:
        return self.roi_heads.mask_head

    @property
    def trainable_decoder(self) -> bool:
        """Whether SAM's prompt encoder and mask decoder train (MODEL.SAM.FREEZE_DECODER False)."""
        return not self.mask_head.freeze_decoder

    def token_stats(self) -> Dict[str, float]:
        """The learnable tokens' ``norm``, ``change`` since initialisation and ``grad_norm``."""
        return self.mask_head.token_stats()

    def set_learnable_tokens(self, enabled: bool) -> bool:
        """Inference with the learnable tokens T~ (the default) or with SAM's own output tokens
        only (``False``: the paper's ablation without the prompt); returns the previous
        setting."""
        return self.mask_head.set_tokens_at_inference(enabled)

    def set_inference_dtype(self, setting: str, decoder: Optional[str] = None) -> None:
        """MODEL.DESSAM.INFERENCE_DTYPE: "auto", "float32", "bfloat16" or "int8"; and, if given,
        MODEL.DESSAM.DECODER_INFERENCE_DTYPE (``decoder``): "auto" (the model's bfloat16 when
        it runs in bfloat16, float32 otherwise), "float32" or "bfloat16"."""
        resolve_inference_dtype(setting, "cpu")  # reject a wrong value now
        if decoder is not None:
            self.mask_head.set_decoding(inference_dtype=decoder)
        self.inference_dtype_setting = setting
        self._inference_dtype: Optional[tuple] = None  # (device, dtype) once resolved

    def inference_dtype(self) -> torch.dtype:
        """The dtype inference computes in on this model's device (logged the first time)."""
        device = self.device
        if self._inference_dtype is None or self._inference_dtype[0] != device:
            dtype = resolve_inference_dtype(self.inference_dtype_setting, device)
            self._inference_dtype = (device, dtype)
            why = ""
            if self.inference_dtype_setting == "auto":
                native = dtype == torch.bfloat16
                why = f" (auto: {'native' if native else 'no native'} bfloat16 on {device.type})"
            decoder = self.mask_head.inference_dtype
            if decoder == "auto":
                decoder = "bfloat16" if dtype == torch.bfloat16 else "float32"
            name = {torch.qint8: "int8 (SAM encoder's linear layers; the rest float32)"}
            logger.info(
                f"DESSAM inference runs in {name.get(dtype, str(dtype)[6:])}{why}, SAM's mask "
                f"decoder in {decoder} (MODEL.DESSAM.DECODER_INFERENCE_DTYPE)"
            )
        return self._inference_dtype[1]

    def train_dtype(self) -> torch.dtype:
        """The dtype training computes in on this model's device (MODEL.DESSAM.TRAIN_DTYPE):
        under bfloat16 the encoder, pyramid, RPN, box head and SAM's decoders run in autocast;
        the weights, gradients and the mask losses stay float32."""
        return resolve_train_dtype(self.train_dtype_setting, self.device)

    def autocast(self, dtype: torch.dtype):
        """bfloat16 autocast on this model's device, or nothing for float32 and int8."""
        if dtype != torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype)

    def sam_parts(self) -> Dict[str, nn.Module]:
        """The modules an official SAM checkpoint fills, under its own prefixes."""
        return {
            "image_encoder": self.image_encoder.encoder,
            "prompt_encoder": self.mask_head.prompt_encoder,
            "mask_decoder": self.mask_head.mask_decoder,
        }

    def preprocess_image(self, batched_inputs: List[Dict]) -> tuple[ImageList, torch.Tensor]:
        """SAM's normalisation and bottom/right zero padding to image_size x image_size.

        Returns the normalised ImageList and the padded raw RGB (for the colour losses).
        """
        raw = []
        for x in batched_inputs:
            img = x["image"].to(self.device)
            if img.dim() != 3 or img.shape[0] != 3 or max(img.shape[-2:]) > self.image_size:
                raise ValueError(
                    f"{x.get('file_name', 'input')}: expected a 3 x h x w image with longest side "
                    f"<= {self.image_size}, got {tuple(img.shape)}; use DESSAMDatasetMapper"
                )
            raw.append(img.float())
        square = {"square_size": self.image_size}
        normalized = [(r - self.pixel_mean) / self.pixel_std for r in raw]
        images = ImageList.from_tensors(normalized, padding_constraints=square)
        raw_padded = ImageList.from_tensors(raw, padding_constraints=square).tensor
        return images, raw_padded

    def image_embeddings(
        self,
        images: ImageList,
        batched_inputs: List[Dict],
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """B x 256 x S/16 x S/16 SAM embeddings (float32) of the padded, normalised images,
        computed in ``dtype``.

        With the embedding cache on, an image's embedding is read from disk when the same
        image (content, size, transform) went through the same encoder weights in the same
        dtype before, and computed and stored otherwise.
        """
        with record_function("dessam/encoder"):
            return self._image_embeddings(images, batched_inputs, dtype)

    def _image_embeddings(
        self, images: ImageList, batched_inputs: List[Dict], dtype: torch.dtype
    ) -> torch.Tensor:
        cache = self.embedding_cache
        if cache is None:
            return self.encode(images.tensor, dtype)
        enc = self.image_encoder
        found = cached_encode(
            cache,
            batched_inputs,
            images.tensor,
            lambda x: self.encode(x, dtype),
            self.encoder_fingerprint(),
            self.image_size,
            (enc.out_chans, enc.embed_size, enc.embed_size),
            dtype,
        )
        if time.time() - self._cache_logged > 600:
            self._cache_logged = time.time()
            logger.info(cache.summary(rescan=False))
        return found

    def encode(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """SAM's encoder on B x 3 x S x S normalised images, computed in ``dtype`` (bfloat16:
        autocast, the weights stay float32; ``torch.qint8``: an int8 copy of its linear layers,
        precision.py), returned in float32."""
        if dtype == torch.qint8:
            return self.image_encoder.encode(images, encoder=self.int8_encoder()).float()
        with self.autocast(dtype):
            return self.backbone.encode(images).float()

    def int8_encoder(self) -> nn.Module:
        """The encoder's int8 copy (built on first use, and again when its weights changed)."""
        encoder = self.image_encoder.encoder
        state = weights_state(encoder)
        if self._int8_encoder is None or self._int8_encoder[0] != state:
            t = time.perf_counter()
            self._int8_encoder = (state, quantize_linear_int8(encoder))
            logger.info(f"SAM encoder quantised to int8 ({time.perf_counter() - t:.2f} s)")
        return self._int8_encoder[1]

    def encoder_fingerprint(self) -> str:
        """Hash of the encoder's weights and of the preprocessing in front of it; recomputed
        only when the weights or the normalisation changed (e.g. a checkpoint was loaded)."""
        norm = tuple((t.data_ptr(), t._version) for t in (self.pixel_mean, self.pixel_std))
        state = (weights_state(self.image_encoder.encoder), norm, self.image_size)
        if state != self._fingerprint_state:
            t = time.perf_counter()
            self._fingerprint = encoder_fingerprint(
                self.image_encoder.encoder, self.pixel_mean, self.pixel_std, self.image_size
            )
            self._fingerprint_state = state
            logger.info(
                f"SAM encoder fingerprint {self._fingerprint[:12]} "
                f"({time.perf_counter() - t:.2f} s)"
            )
        return self._fingerprint

    def crop_to_images(self, embeddings: torch.Tensor, images: ImageList) -> torch.Tensor:
        """The embeddings without the rows and columns that only cover padding in every image of
        the batch, rounded up to whole cells of the coarsest pyramid level.

        SAM needs its whole square (its encoder's position embeddings and windows, and the mask
        decoder's attention, are over all S/p x S/p tokens), but the pyramid, RPN and RoI heads
        need not look at padding: a 1024 x 768 image saves a quarter of their work, and no
        anchor is placed beyond the image. Bottom/right crops keep every coordinate unchanged.
        """
        patch = self.image_encoder.output_shape()["sam_embed"].stride
        # px of the coarsest pyramid level: its pooling must see whole cells
        cell = max(s.stride for s in self.backbone.output_shape().values())
        h = max(s[0] for s in images.image_sizes)
        w = max(s[1] for s in images.image_sizes)
        rows = min(embeddings.shape[-2], -(-h // cell) * cell // patch)
        cols = min(embeddings.shape[-1], -(-w // cell) * cell // patch)
        return embeddings[..., :rows, :cols]

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        dtype = self.train_dtype()
        images, raw = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        embeddings = self.image_embeddings(images, batched_inputs, dtype)
        with self.autocast(dtype):
            with record_function("dessam/pyramid"):
                features = self.backbone.from_embedding(self.crop_to_images(embeddings, images))
            proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
            _, detector_losses = self.roi_heads(
                images, features, proposals, gt_instances, embeddings=embeddings, raw_images=raw
            )
        losses = {**proposal_losses, **detector_losses}
        for k in DETECTION_LOSSES:
            losses[k] = losses[k] * self.loss_dect_weight
        return {k: v.float() for k, v in losses.items()}

    @torch.no_grad()
    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Detect nuclei, then segment each with the student decoder.

        Computes in ``inference_dtype()``: under bfloat16 the encoder, pyramid, RPN and box head
        run in bfloat16 autocast, SAM's mask decoder in MODEL.DESSAM.DECODER_INFERENCE_DTYPE
        ("auto": bfloat16 too, see SAMPromptMaskHead.decode); under int8 the encoder's linear
        layers run in int8, the rest in float32; every output is float32. Each part
        runs under a ``torch.profiler.record_function`` label "dessam/<part>"
        (benchmarks/measure.py).
        """
        dtype = self.inference_dtype()
        images, _ = self.preprocess_image(batched_inputs)
        embeddings = self.image_embeddings(images, batched_inputs, dtype)
        with self.autocast(dtype):
            with record_function("dessam/pyramid"):
                features = self.backbone.from_embedding(self.crop_to_images(embeddings, images))
            with record_function("dessam/rpn"):
                proposals, _ = self.proposal_generator(images, features, None)
            # labels "dessam/box_head" and "dessam/mask_decoder" inside
            results, _ = self.roi_heads(images, features, proposals, None, embeddings=embeddings)
        return [
            {"instances": self.postprocess(r, x, size)}
            for r, x, size in zip(results, batched_inputs, images.image_sizes)
        ]

    @torch.no_grad()
    def segment_boxes(
        self, batched_inputs: List[Dict], boxes: List[torch.Tensor], student: bool = True
    ) -> List[Dict[str, Instances]]:
        """Masks for given boxes (XYXY in each input's resized frame), skipping detection.

        ``student=False`` prompts SAM as the teacher does (its own output tokens only): what an
        annotation team uses to turn cheap boxes into outlines.
        """
        dtype = self.inference_dtype()
        images, _ = self.preprocess_image(batched_inputs)
        embeddings = self.image_embeddings(images, batched_inputs, dtype)
        outputs = []
        for emb, b, x, size in zip(embeddings, boxes, batched_inputs, images.image_sizes):
            b = b.to(self.device, torch.float32).reshape(-1, 4)
            r = Instances(size)
            r.pred_boxes = Boxes(b)
            r.scores = torch.ones(len(b), device=self.device)
            r.pred_classes = torch.zeros(len(b), dtype=torch.int64, device=self.device)
            with self.autocast(dtype):  # DECODER_INFERENCE_DTYPE auto follows the model
                r.pred_mask_logits = self.mask_head.decode(emb[None], b, student=student)
            outputs.append({"instances": self.postprocess(r, x, size)})
        return outputs

    def postprocess(self, results: Instances, batched_input: Dict, input_size) -> Instances:
        """Boxes and masks from the resized, padded frame back to the original image size, in
        float32 (scores, boxes) and bool (masks) whatever the inference dtype."""
        size = (
            batched_input.get("height", input_size[0]),
            batched_input.get("width", input_size[1]),
        )
        with record_function("dessam/postprocess"):
            return detections_to_original(
                results, input_size, size, self.image_size, self.mask_logit_threshold
            )


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameter counts."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    return trainable, frozen
