"""SAM's mask decoder for many prompt sets on one image, without a copy of the image per prompt set.

``segment_anything``'s ``MaskDecoder`` repeats the image embedding and its positional encoding once per prompt set
before its two-way transformer. Here the image stream stays one tensor until the prompts change it: with prompts
that share the dense embedding (boxes and points without a mask prompt), the first block's projections of the image
are computed once for every prompt set; attention runs in PyTorch's fused kernel, and the upscaling's channel norm in
channels-last layout. The weights are the decoder's own; the logits are its logits up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention

__all__ = ["decode_masks"]


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., L, C) -> (..., heads, L, C / heads)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(-3, -2)


def _attend(attention: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``segment_anything``'s ``Attention`` on (B, Lq, C), (B, Lk, C), (B, Lk, C) inputs whose batch sizes may be 1
    and broadcast: (B, Lq, C)."""
    n = attention.num_heads
    q, k, v = _heads(attention.q_proj(q), n), _heads(attention.k_proj(k), n), _heads(attention.v_proj(v), n)
    batch = max(q.shape[0], k.shape[0])
    q, k, v = (t.expand(batch, *t.shape[1:]) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v, as Attention computes it
    return attention.out_proj(out.transpose(-3, -2).flatten(-2))


def _upscale(decoder: MaskDecoder, x: torch.Tensor) -> torch.Tensor:
    """The decoder's ``output_upscaling`` (transposed conv, channel norm, GELU, transposed conv, GELU) on (N, C, h, w),
    in channels-last layout: (N, C / 8, 4h, 4w)."""
    up1, norm, act1, up2, act2 = decoder.output_upscaling
    x = up1(x.contiguous(memory_format=torch.channels_last))
    x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    return act2(up2(act1(x)))


def decode_masks(
    decoder: MaskDecoder,
    image: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask: bool = False,
    mask_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``decoder(image, image_pe, sparse, dense, multimask)`` returns: low-res logits (N, K, 4h, 4w) and
    predicted IoU (N, K), K = 3 with ``multimask`` else 1.

    Args:
        image, image_pe: (1, C, h, w) image embedding and the prompt encoder's dense positional encoding.
        sparse: (N, P, C) and dense (N, C, h, w) prompt embeddings, one row per prompt set.
        mask_tokens: (M, C) mask tokens to use instead of the decoder's own (gradients flow to them).
    """
    if image.shape[0] != 1:
        raise ValueError(f"decode_masks decodes against one image embedding, got a batch of {image.shape[0]}")
    n = sparse.shape[0]
    tokens = mask_tokens if mask_tokens is not None else decoder.mask_tokens.weight
    tokens = torch.cat([decoder.iou_token.weight, tokens.to(decoder.iou_token.weight)], 0)
    tokens = torch.cat([tokens[None].expand(n, -1, -1), sparse.to(tokens)], 1)  # (N, T, C)
    shared = n == 1 or dense.stride(0) == 0  # one dense embedding for every row (no mask prompt)
    _, c, h, w = image.shape
    keys = (image + (dense[:1] if shared else dense)).flatten(2).transpose(1, 2)  # (1 or N, hw, C)
    pe = image_pe.flatten(2).transpose(1, 2)  # (1, hw, C)
    queries = tokens
    for block in decoder.transformer.layers:
        if block.skip_first_layer_pe:
            queries = block.norm1(_attend(block.self_attn, queries, queries, queries))
        else:
            q = queries + tokens
            queries = block.norm1(queries + _attend(block.self_attn, q, q, queries))
        keys_pe = keys + pe
        queries = block.norm2(queries + _attend(block.cross_attn_token_to_image, queries + tokens, keys_pe, keys))
        queries = block.norm3(queries + block.mlp(queries))
        keys = block.norm4(keys + _attend(block.cross_attn_image_to_token, keys_pe, queries + tokens, queries))
    final = decoder.transformer.final_attn_token_to_image
    queries = decoder.transformer.norm_final_attn(queries + _attend(final, queries + tokens, keys + pe, keys))
    keys = keys.expand(n, -1, -1)
    chosen = range(1, decoder.num_mask_tokens) if multimask else range(1)
    upscaled = _upscale(decoder, keys.transpose(1, 2).unflatten(2, (h, w)))  # (N, C', H, W); keys are channels-last
    hyper = torch.stack([decoder.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in chosen], 1)  # (N, K, C')
    masks = torch.einsum("nkc,nchw->nkhw", hyper, upscaled)
    iou = decoder.iou_prediction_head(queries[:, 0])[:, chosen.start : chosen.stop]
    return masks, iou
