"""Pooling of patch-token queries on their 2-D grid (agents of Agent attention, landmarks of MiTA).

``pool_patch_queries(q, p, h, w, out_hw)`` drops the ``p`` prefix tokens (cls, registers), lays the
remaining ``h * w`` queries out on their raster grid and averages them over the windows of
``torch.nn.AdaptiveAvgPool2d(out_hw)``: output cell ``(i, j)`` averages rows
``floor(i h / ph) .. ceil((i + 1) h / ph) - 1`` and columns ``floor(j w / pw) .. ceil((j + 1) w / pw) - 1``
(windows overlap when the sizes do not divide; a cell repeats rows when ``ph > h``). Gradients flow
through the average.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

__all__ = ["pool_patch_queries"]


def pool_patch_queries(q: torch.Tensor, p: int, h: int, w: int, out_hw: Sequence[int]) -> torch.Tensor:
    """Average-pool the patch queries on their grid.

    Args:
        q: ``[B, H, N, d]`` with ``N == p + h * w``, prefix tokens first, patches in raster order.
        p: number of prefix tokens, 0 <= p.
        h, w: patch grid, each >= 1.
        out_hw: ``(ph, pw)`` output grid, each >= 1.

    Returns:
        ``[B, H, ph * pw, d]``, pooled cells in raster order.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, d], got shape {tuple(q.shape)}")
    B, H, N, d = q.shape
    if p < 0 or h < 1 or w < 1 or p + h * w != N:
        raise ValueError(f"q has N={N} tokens, expected p + h * w with p={p} >= 0, h={h} >= 1, w={w} >= 1")
    ph, pw = (int(s) for s in out_hw)
    if ph < 1 or pw < 1:
        raise ValueError(f"out_hw must hold two positive ints, got {tuple(out_hw)}")
    # The pooling saves its input for the backward, so it must be a view of q, never a copy: a copy would keep a
    # second [B, N, C] activation alive per layer until the backward. q as a ViT makes it (a view of the
    # [B, N, 3, H, d] projection) is viewed with its heads as channels, a contiguous q with its heads as batch
    # (the strides decide, not a failed view caught: torch.compile traces this).
    if H == 1 or q.stride(1) == d * q.stride(3):  # heads and head dims adjacent in memory: [B, N, H*d] is a view
        grid = q.transpose(1, 2)[:, p:].reshape(B, h, w, H * d).permute(0, 3, 1, 2)  # [B, H*d, h, w]
    else:  # e.g. a contiguous [B, H, N, d] q, whose batch and heads merge into a view
        grid = q[:, :, p:].reshape(B * H, h, w, d).permute(0, 3, 1, 2)  # [B*H, d, h, w]
    pooled = F.adaptive_avg_pool2d(grid, (ph, pw))  # [B*H, d, ph, pw] or [B, H*d, ph, pw]
    return pooled.reshape(B, H, d, ph * pw).transpose(2, 3).contiguous()  # [B, H, m, d], small
