"""Top-k attention: each query attends to its own top-k keys.

Per batch element and head: ``I_n = topk_i(q_n . k_i)`` (unscaled scores; the selection carries no
gradient), then ``out_n = softmax_{i in I_n}(s q_n . k_i) V[I_n]`` with ``s = d^-1/2``, one softmax over
the k selected keys. ``topk == N`` is standard attention.

This is a quality baseline, not an efficient attention: selecting the keys needs every score, so it
costs O(N^2 d) time and holds an N x N boolean mask (O(N^2) memory, like standard attention), which is
passed to ``F.scaled_dot_product_attention``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import AttentionBase

__all__ = ["TopkAttention"]


class TopkAttention(AttentionBase):
    """Top-k attention; constructor as :class:`AttentionBase` plus:

    Args:
        topk: keys per query, 1 <= topk <= N (checked on every forward); default 50.
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, topk: int = 50, **kwargs) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk must be a positive int, got {topk!r}")
        self.topk = topk

    @torch.no_grad()
    def select(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Boolean mask ``[B, H, N, N]``, True at each query's top-k keys."""
        N = k.shape[2]
        if not 1 <= self.topk <= N:
            raise ValueError(f"topk must be in [1, N] = [1, {N}] for N={N} tokens, got topk={self.topk}")
        scores = q @ k.transpose(-1, -2)  # [B, H, N, N]
        idx = scores.topk(self.topk, dim=-1, sorted=False).indices  # [B, H, N, topk]
        # scatter of exact indices (not a threshold on the k-th score) keeps exactly topk keys under ties
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        mask = self.route(lambda: self.select(q, k))  # [B, H, N, N]
        return F.scaled_dot_product_attention(  # [B, H, N, d]
            q, k, v, attn_mask=mask, dropout_p=self.attn_drop.p if self.training else 0.0
        )
