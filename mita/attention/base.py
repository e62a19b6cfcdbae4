"""The attention contract every variant shares (timm's ``Attention`` names and signature).

Every attention in the zoo is a subclass of :class:`AttentionBase`. It owns the submodules a timm/DeiT
checkpoint keys on (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``proj``), the two options every
variant accepts (``dwc``: a 3x3 depthwise conv over V's patch grid added to the output; ``gate``: the
output multiplied by ``SiLU(gate(x))``), and the token layout (``grid_size``, ``num_prefix_tokens``,
``rope``) that the model keeps current on every forward. A subclass implements only
:meth:`AttentionBase.attend`, mapping ``q, k, v`` ``[B, H, N, d]`` to ``[B, H, N, d]``.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentionBase(nn.Module):
    """timm-compatible multi-head attention with pluggable core.

    Args:
        dim: embedding width C; must be divisible by ``num_heads``.
        num_heads: number of heads H (head width d = C / H).
        qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer: as in timm's ``Attention``.
        scale_norm: timm's optional LayerNorm on the attention output before ``proj``.
        dwc: add a 3x3 depthwise conv over V's patch grid to the output of patch tokens.
        gate: multiply the (attention + DWC) output by ``SiLU(gate(x))`` with ``gate = Linear(dim, dim)``.
        device, dtype: factory kwargs, as timm passes them.
    """

    #: whether ``attend`` honours ``attn_mask`` / ``is_causal``; subclasses that can set these True
    supports_attn_mask: bool = False
    supports_causal: bool = False
    #: whether ``attend`` takes ``qkv=``: the ``[B, N, 3, H, d]`` projection q, k, v are views of (None when a
    #: norm or rotary embedding made new ones), so a kernel can write their gradient as that one tensor
    takes_qkv: bool = False

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
        scale_norm: bool = False,
        dwc: bool = False,
        gate: bool = False,
        device=None,
        dtype=None,
        **unused,
    ) -> None:
        super().__init__()
        # timm >= 1.0.29 passes these to every attention; only their defaults are meaningful here.
        for key, default in (("attn_head_dim", None), ("dim_out", None), ("gated", False)):
            value = unused.pop(key, default)
            if value not in (default, dim if key == "dim_out" else default):
                raise ValueError(f"{key}={value!r} is not supported by {type(self).__name__}; use {default!r}")
        if unused:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments {sorted(unused)}")
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"num_heads must be a positive divisor of dim={dim}, got {num_heads!r}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or nn.LayerNorm
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = True  # read by some timm utilities; our cores always use fused paths

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(dim, **dd) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, **dd) if dwc else None
        self.gate = nn.Linear(dim, dim, **dd) if gate else None

        # Token layout, kept current by the model (mita.models) on every forward.
        self.grid_size: Optional[Tuple[int, int]] = None
        self.num_prefix_tokens: int = 1
        # Optional rotary embedding (ViT-5): a tensor [L, 2d] = cat(sin, cos) as timm's
        # RotaryEmbeddingCat.get_embed() returns it, applied to q and k with timm's
        # apply_rot_embed_cat. L = N - num_prefix_tokens rotates the patch tokens only; L = N rotates
        # every token (ViT-5 also rotates its registers; zero angles leave a token unchanged).
        self.rope: Optional[torch.Tensor] = None
        # Routing hook of the variants that make hard selections (mita, topk, moba): with
        # capture_routing the last selection is kept in last_routing; a selection put in routing is
        # used instead of a new one (analyses, and tests that must not see bf16 flip a choice).
        self.capture_routing: bool = False
        self.routing = None
        self.last_routing = None

    # -- token layout -------------------------------------------------------------------------
    def token_grid(self, n_tokens: int) -> Tuple[int, int, int]:
        """Return ``(num_prefix_tokens, h, w)`` for a sequence of ``n_tokens``.

        Without an explicit ``grid_size`` the patch tokens are assumed to form a square grid.
        Raises ValueError when ``n_tokens`` does not equal ``h * w + num_prefix_tokens``.
        """
        p = int(self.num_prefix_tokens)
        if self.grid_size is None:
            side = int(round(max(n_tokens - p, 0) ** 0.5))
            if side * side != n_tokens - p or side == 0:
                raise ValueError(
                    f"N={n_tokens} tokens with num_prefix_tokens={p} is not a square grid; set "
                    f"grid_size=(h, w) on {type(self).__name__} so that h*w + {p} == N"
                )
            return p, side, side
        h, w = self.grid_size
        if h * w + p != n_tokens:
            raise ValueError(
                f"N={n_tokens} does not fit grid_size={tuple(self.grid_size)} + num_prefix_tokens={p} "
                f"(expected N = {h}*{w} + {p} = {h * w + p})"
            )
        return p, h, w

    # -- pieces shared by all variants -------------------------------------------------------
    def project_qkv(self, x: torch.Tensor):
        """``x`` [B, N, C] -> q, k, v [B, H, N, d] with q/k norms and rotary embedding applied."""
        return self.project_qkv_packed(x)[:3]

    def project_qkv_packed(self, x: torch.Tensor):
        """:meth:`project_qkv` and the ``[B, N, 3, H, d]`` projection q, k, v are the views of, or None once a
        norm or the rotary embedding made new q, k."""
        B, N, C = x.shape
        packed = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, d] each
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            q, k, packed = self.q_norm(q), self.k_norm(k), None
        if self.rope is not None:
            packed = None
            from timm.layers import apply_rot_embed_cat

            rope = self.rope.to(q.dtype)
            if rope.shape[-2] == N:
                q, k = apply_rot_embed_cat(q, rope), apply_rot_embed_cat(k, rope)
            else:
                p = int(self.num_prefix_tokens)
                q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope)], dim=2)
                k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope)], dim=2)
        return q, k, v, packed

    def dwc_term(self, v: torch.Tensor) -> torch.Tensor:
        """Depthwise 3x3 conv over V's patch grid: v [B, H, N, d] -> [B, N, C], zeros for prefix tokens."""
        B, H, N, d = v.shape
        p, h, w = self.token_grid(N)
        vp = v[:, :, p:].transpose(1, 2).reshape(B, h, w, H * d).permute(0, 3, 1, 2)  # [B, C, h, w]
        out = self.dwc(vp).flatten(2).transpose(1, 2)  # [B, h*w, C]
        return F.pad(out, (0, 0, p, 0))

    def route(self, select: Callable[[], object]):
        """The variant's hard selection: ``self.routing`` if set, else ``select()``; kept when capturing."""
        chosen = self.routing if self.routing is not None else select()
        if self.capture_routing:
            self.last_routing = chosen
        return chosen

    def check_mask(self, attn_mask, is_causal: bool) -> None:
        if attn_mask is not None and not self.supports_attn_mask:
            raise NotImplementedError(f"attn_mask is not supported by {type(self).__name__}; pass attn_mask=None")
        if is_causal and not self.supports_causal:
            raise NotImplementedError(f"is_causal=True is not supported by {type(self).__name__}; pass is_causal=False")

    def attend(self, q, k, v, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        """The variant's core: q, k, v [B, H, N, d] -> [B, H, N, d]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        self.check_mask(attn_mask, is_causal)
        B, N, C = x.shape
        if C != self.dim:
            raise ValueError(f"x has width {C}, expected dim={self.dim}")
        q, k, v, packed = self.project_qkv_packed(x)
        extra = {"qkv": packed} if self.takes_qkv else {}
        out = self.attend(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **extra)  # [B, H, N, d]
        out = out.transpose(1, 2).reshape(B, N, C)
        if self.dwc is not None:
            out = out + self.dwc_term(v)
        if self.gate is not None:
            out = out * F.silu(self.gate(x))
        out = self.norm(out)
        out = self.proj(out)
        return self.proj_drop(out)
