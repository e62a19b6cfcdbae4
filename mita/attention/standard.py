"""Standard softmax attention, numerically the same as timm's fused ``Attention``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBase

__all__ = ["StandardAttention"]


class StandardAttention(AttentionBase):
    """``softmax(q k^T / sqrt(d) + mask) v`` through ``F.scaled_dot_product_attention``.

    Same parameters, names and ops as timm's ``Attention``, so a timm/DeiT block's ``attn`` state dict
    loads into it unchanged. Honours ``attn_mask`` (bool or additive float, broadcastable to
    ``[B, H, N, N]``) and ``is_causal`` exactly as SDPA does.
    """

    supports_attn_mask = True
    supports_causal = True

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        return F.scaled_dot_product_attention(  # [B, H, N, d]
            q, k, v,
            attn_mask=attn_mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=is_causal,
        )
