"""Linear attention with RMS-normalised queries and keys and a ReLU feature map.

Per batch element and head, with ``phi = relu`` applied to ``RMSNorm(q)`` and ``RMSNorm(k)``:

    out_n = phi(q_n) (sum_j phi(k_j)^T v_j) / (phi(q_n) . sum_j phi(k_j) + eps)

Cost O(N d^2), memory O(N d + d^2). The sums run in float32 (float64 inputs stay float64), also under
autocast, because half-precision sums over N tokens lose the small terms of the denominator.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import AttentionBase

__all__ = ["LinearAttention"]


class LinearAttention(AttentionBase):
    """Linear attention; constructor as :class:`AttentionBase` plus:

    Args:
        eps: added to the denominator, > 0; default 1e-6.

    The RMSNorms are named ``lin_q_norm`` / ``lin_k_norm`` so they coexist with timm's optional
    ``q_norm`` / ``k_norm`` (``qk_norm=True``), which run first. There is no attention matrix, so
    ``attn_drop`` has no effect.
    """

    def __init__(self, dim: int, num_heads: int = 8, *args, eps: float = 1e-6, **kwargs) -> None:
        super().__init__(dim, num_heads, *args, **kwargs)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.eps = float(eps)
        dd = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.lin_q_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd)
        self.lin_k_norm = nn.RMSNorm(self.head_dim, eps=1e-6, **dd)

    @staticmethod
    def _rms(norm: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
        # the module's weight may be half precision (a .half() model); normalise in x's dtype
        weight = None if norm.weight is None else norm.weight.to(x.dtype)
        return F.rms_norm(x, norm.normalized_shape, weight, norm.eps)

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        out_dtype = v.dtype
        acc = torch.promote_types(v.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            q = torch.relu(self._rms(self.lin_q_norm, q.to(acc)))  # [B, H, N, d]
            k = torch.relu(self._rms(self.lin_k_norm, k.to(acc)))  # [B, H, N, d]
            kv = k.transpose(-1, -2) @ v.to(acc)  # [B, H, d, d]
            k_sum = k.sum(dim=2, keepdim=True)  # [B, H, 1, d]
            num = q @ kv  # [B, H, N, d]
            den = (q * k_sum).sum(dim=-1, keepdim=True) + self.eps  # [B, H, N, 1]
            out = num / den
        return out.to(out_dtype)
