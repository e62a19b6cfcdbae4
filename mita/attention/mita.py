"""MiTA attention as a timm-compatible module: landmarks from the queries, then the MiTA op.

The module owns the timm names (``qkv``, ``q_norm``, ``k_norm``, ``proj``; optional ``dwc`` and ``gate``)
and a landmark extractor (:mod:`mita.landmarks`); the attention itself is
:func:`mita.functional.mita_attention`.

Routing hook, for tests and analyses:

- ``module.capture_routing = True`` makes every forward store ``module.last_routing =
  (topk_idx [B, H, m, topk], expert_idx [B, H, N, router_topk])`` and ``module.last_landmarks``
  ([B, H, m, d], detached).
- ``module.routing = (topk_idx, expert_idx)`` injects that selection into the op instead of computing
  it (set it back to ``None`` to route normally). Landmarks are still computed, so gradients and the
  shared expert follow the current inputs.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

from mita import kernels
from mita.attention.base import AttentionBase
from mita.functional import IMPLS, SHARED_SCALES, mita_attention
from mita.landmarks import LANDMARK_KWARGS, build_landmark_extractor

__all__ = ["MiTAAttention"]


class MiTAAttention(AttentionBase):
    """Mixture-of-Top-k attention with timm's ``Attention`` contract.

    Args:
        dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer, scale_norm,
            dwc, gate, device, dtype: as in :class:`~mita.attention.base.AttentionBase`. ``attn_drop``
            is accepted for timm compatibility but NOT applied: the op never forms an attention matrix
            to drop from (the official code does not apply it either).
        num_landmarks: m, the number of landmarks (experts); at most the number of patch tokens.
        topk: k, keys per routed expert, in [0, N]; 0 keeps only the shared expert (needs ``shared``).
            The module uses it as given: the official top-2 setting halves k in the config, not here.
        router_topk: r, experts per query, in [1, num_landmarks].
        shared: keep the shared (compressed) expert.
        shared_scale: ``"official"`` (shared logits q.R/d, as the released code and checkpoints) or
            ``"paper"`` (q.R/sqrt(d)).
        pool: landmark extractor, one of :data:`mita.landmarks.POOLS` (``"grid"`` by default;
            ``"official"`` with ``shared_scale="official"`` reproduces official checkpoints).
        impl: the op's implementation, ``"auto"``, ``"torch"``, ``"reference"`` or ``"triton"``.
        landmark_grid, seed, window_grid: options of the landmark extractor (see :mod:`mita.landmarks`).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        num_landmarks: int = 25,
        topk: int = 25,
        router_topk: int = 1,
        shared: bool = True,
        shared_scale: str = "official",
        pool: str = "grid",
        impl: str = "auto",
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        pool_kwargs = {key: kwargs.pop(key) for key in LANDMARK_KWARGS if key in kwargs}
        super().__init__(
            dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer,
            device=device, dtype=dtype, **kwargs,
        )
        # Built first: it validates pool and num_landmarks, which the checks below rely on.
        self.landmarks = build_landmark_extractor(
            pool, num_landmarks, dim, num_heads, device=device, dtype=dtype, **pool_kwargs
        )
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
            raise ValueError(f"topk must be an int >= 0 (at most the number of tokens N), got {topk!r}")
        if topk == 0 and not shared:
            raise ValueError("topk=0 with shared=False leaves no expert; use topk >= 1 or shared=True")
        if isinstance(router_topk, bool) or not isinstance(router_topk, int) or not 1 <= router_topk <= num_landmarks:
            raise ValueError(f"router_topk must be an int in [1, num_landmarks={num_landmarks}], got {router_topk!r}")
        if shared_scale not in SHARED_SCALES:
            raise ValueError(f"shared_scale={shared_scale!r} must be one of {SHARED_SCALES}")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
        self.num_landmarks = num_landmarks
        self.topk = topk
        self.router_topk = router_topk
        self.shared = bool(shared)
        self.shared_scale = shared_scale
        self.pool = pool
        self.impl = impl

        # Routing hook (see the module docstring).
        self.capture_routing: bool = False
        self.routing: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.last_routing: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.last_landmarks: Optional[torch.Tensor] = None

    takes_qkv = True

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False, qkv=None) -> torch.Tensor:
        """q, k, v [B, H, N, d] -> [B, H, N, d]; ``qkv``: the ``[B, N, 3, H, d]`` projection they are views of
        (or None), whose gradient the fused kernels then write whole."""
        N = q.shape[2]
        p, h, w = self.token_grid(N)
        # The extractor checks num_landmarks against the patch tokens, the op checks topk against N.
        if (self.landmarks.linear and self.routing is None and self.impl in ("auto", "triton")
                and kernels.pools_in_kernel(q, self.num_landmarks, self.topk, self.router_topk)):
            # fixed averaging windows: the fused kernels pool from q themselves (no pooling launches), and
            # nothing but the op differentiates through q, k, v (v's depthwise conv aside): their gradient is
            # written as the one tensor of the qkv projection
            landmarks = self.landmarks.pooling_weights(N, p, h, w, q.device)  # [m, N]
            qkv = qkv if self.dwc is None else None
        else:
            landmarks = self.landmarks(q, k, p, h, w)  # [B, H, m, d]
            qkv = None
        out = mita_attention(
            q, k, v, landmarks, self.topk,
            router_topk=self.router_topk,
            shared=self.shared,
            shared_scale=self.shared_scale,
            routing=self.routing,
            impl=self.impl,
            return_routing=self.capture_routing,
            qkv=qkv,
        )
        if self.capture_routing:
            out, self.last_routing = out
            if landmarks.dim() == 2:
                landmarks = torch.matmul(landmarks.to(q.dtype), q)
            self.last_landmarks = landmarks.detach()
        return out  # [B, H, N, d]

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_landmarks={self.num_landmarks}, topk={self.topk}, "
            f"router_topk={self.router_topk}, shared={self.shared}, shared_scale={self.shared_scale!r}, "
            f"pool={self.pool!r}, impl={self.impl!r}"
        )
