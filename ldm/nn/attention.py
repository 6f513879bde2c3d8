"""Attention for the UNet and the text encoders: multi-head (cross-)attention through SDPA, GEGLU feed-forward,
pre-LayerNorm transformer blocks, and the spatial transformer that wraps them around a feature map (LDM, sec. 3.3).

Half precision. `scaled_dot_product_attention`'s kernels accumulate QK^T and the softmax of fp16 inputs in fp32 (the
GPU flash and memory-efficient kernels, the CPU kernels, the math fallback since torch 2.5), so fp16 logits above 65504
do not overflow; SD 2.1's `upcast_attention` guarded attention written as fp16 products, which the math fallback is
again after `torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)`. `upcast=True` runs the attention itself
in fp32 whenever q is fp16, on every backend (under torch's defaults: other rounding only). bf16 has fp32's range
and never needs it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.conv import PointwiseConv
from ldm.nn.linear import Linear


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              upcast: bool = False) -> torch.Tensor:
    """Scaled dot-product attention of (B, heads, N, head_dim) tensors, optionally in fp32 for fp16 inputs.

    Args:
        q: queries (B, h, Nq, d); k, v: keys and values (B, h, Nk, d).
        mask: boolean (B, 1, 1, Nk) or broadcastable, True where a key may be attended to.
        upcast: compute in fp32 when q is fp16 (and autocast is on), then cast back.
    """
    # note: on CPU, torch's bf16 attention kernel runs forward + backward 2-5x slower than its fp32 one at UNet sizes
    # (head_dim 16-32, 64-256 tokens; torch 2.14): bf16 attention runs in fp32 there, faster and no less exact.
    cpu_bf16 = q.dtype == torch.bfloat16 and q.device.type == "cpu"
    if (upcast and q.dtype == torch.float16) or cpu_bf16:
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention; keys and values come from `context` (cross-attention) or from `x` (self-attention).

    Args:
        dim: width of the queries' input.
        num_heads: number of heads.
        head_dim: width of each head; the inner width is num_heads * head_dim.
        context_dim: width of the context tokens; None for self-attention.
        dropout: dropout on the output projection.
        upcast: see `attention`.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int | None = None,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner_dim = num_heads * head_dim
        kv_dim = dim if context_dim is None else context_dim
        self.num_heads = num_heads
        self.upcast = upcast
        self.to_q = Linear(dim, inner_dim, bias=False)
        self.to_k = Linear(kv_dim, inner_dim, bias=False)
        self.to_v = Linear(kv_dim, inner_dim, bias=False)
        self.to_out = Linear(inner_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, M, context_dim) or None, mask (B, M), True = attend; returns (B, N, dim)."""
        B, N, _ = x.shape
        context = x if context is None else context
        M = context.shape[1]
        q = self.to_q(x).view(B, N, self.num_heads, -1).transpose(1, 2)          # (B, h, N, d)
        k = self.to_k(context).view(B, M, self.num_heads, -1).transpose(1, 2)    # (B, h, M, d)
        v = self.to_v(context).view(B, M, self.num_heads, -1).transpose(1, 2)    # (B, h, M, d)
        mask = None if mask is None else mask[:, None, None, :]                 # (B, 1, 1, M)
        out = attention(q, k, v, mask, self.upcast)                             # (B, h, N, d)
        out = out.transpose(1, 2).reshape(B, N, -1)                             # (B, N, h * d)
        return self.dropout(self.to_out(out))                                   # (B, N, dim)


class GEGLUFeedForward(nn.Module):
    """GELU-gated linear unit feed-forward (Shazeer 2020, "GLU Variants Improve Transformer"), as in SD.

    Args:
        dim: input and output width.
        mult: the hidden width is mult * dim.
        dropout: dropout on the hidden activations.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        hidden_dim = mult * dim
        self.proj_in = Linear(dim, 2 * hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.proj_out = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj_in(x).chunk(2, dim=-1)                              # (B, N, hidden), (B, N, hidden)
        return self.proj_out(self.dropout(h * F.gelu(gate)))                    # (B, N, dim)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the context (when context_dim is set), GEGLU MLP.

    Args:
        dim: token width.
        num_heads, head_dim: attention heads (inner width num_heads * head_dim).
        context_dim: width of the context tokens; None leaves out the cross-attention.
        dropout: dropout in attention outputs and the feed-forward.
        upcast: fp32 attention for fp16 inputs (see `attention`).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, context_dim: int | None = None,
                 dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, head_dim, None, dropout, upcast)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, num_heads, head_dim, context_dim, dropout, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLUFeedForward(dim, dropout=dropout)

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "attn2")

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, dim), context (B, M, context_dim), mask (B, N) for self-attention; returns (B, N, dim)."""
        x = x + self.attn1(self.norm1(x), mask=mask)                            # (B, N, dim)
        if self.has_cross_attention:
            x = x + self.attn2(self.norm2(x), context)                          # (B, N, dim)
        return x + self.ff(self.norm3(x))                                       # (B, N, dim)


class SpatialTransformer(nn.Module):
    """Transformer blocks over the pixels of a feature map: GroupNorm, project in, blocks, zero-initialised project
    out, residual (LDM's `SpatialTransformer`; `use_linear_proj` as in SD 2, 1x1 convolutions as in SD 1).

    Args:
        channels: channels of the feature map; also the transformer width (num_heads * head_dim == channels).
        num_heads, head_dim: attention heads.
        depth: number of transformer blocks.
        context_dim: width of the context tokens; None for self-attention only.
        norm_groups: groups of the input GroupNorm.
        use_linear_proj: project with nn.Linear on tokens instead of 1x1 convolutions (same parameter count).
        dropout, upcast: passed to the blocks.
    """

    def __init__(self, channels: int, num_heads: int, head_dim: int, depth: int = 1, context_dim: int | None = None,
                 norm_groups: int = 32, use_linear_proj: bool = False, dropout: float = 0.0, upcast: bool = False):
        super().__init__()
        inner_dim = num_heads * head_dim
        self.use_linear_proj = use_linear_proj
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = Linear(channels, inner_dim) if use_linear_proj else PointwiseConv(channels, inner_dim)
        self.blocks = nn.ModuleList(TransformerBlock(inner_dim, num_heads, head_dim, context_dim, dropout, upcast)
                                    for _ in range(depth))
        self.proj_out = Linear(inner_dim, channels) if use_linear_proj else PointwiseConv(inner_dim, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)                                                        # (B, C, H, W)
        if self.use_linear_proj:
            # note: contiguous, or nn.Linear folds or batches the product by `requires_grad` (a frozen copy, the
            # EMA, would round differently from the trained UNet; see ldm.nn.conv.PointwiseConv)
            h = self.proj_in(h.flatten(2).transpose(1, 2).contiguous())         # (B, H*W, inner)
        else:
            h = self.proj_in(h).flatten(2).transpose(1, 2)                      # (B, H*W, inner)
        for block in self.blocks:
            h = block(h, context)                                               # (B, H*W, inner)
        if self.use_linear_proj:
            h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)            # (B, C, H, W)
        else:
            h = self.proj_out(h.transpose(1, 2).reshape(B, -1, H, W))           # (B, C, H, W)
        return x + h
