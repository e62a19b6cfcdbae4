"""ViT-5-Small, the paper's second backbone, on timm's ``VisionTransformer``.

The architecture of the official MiTA-ViT-5 code (itself the ViT-5 code): patch 16, width 384,
depth 12, 6 heads, MLP ratio 4 (GELU), no qkv bias, RMSNorm (eps 1e-6) everywhere including the
q/k norms, LayerScale initialised to 1e-4, a class token and 4 register tokens, a learned absolute
position embedding on the patch tokens only, uniform stochastic depth, and a 2-D rotary embedding
(RoPE) on q and k:

- patch tokens: head width d, d/2 channels per axis (rows first, then columns); frequencies
  ``theta^(-j / (d/4))``, j < d/4, ``theta = 10000``, each used by one adjacent channel pair (timm's
  interleaved ``apply_rot_embed_cat``); the position along an axis of length L is ``i / L * L0`` with
  L0 the grid at the constructor's ``img_size``, so other resolutions interpolate positions;
- register tokens: the same rotary embedding on a sqrt(R) x sqrt(R) grid with ``theta = 100``;
- the class token is not rotated.

The embedding covers every token ([cls, registers, patches], timm's order; the official code puts the
registers last, which changes nothing since attention does not see order), so it reaches the attention
modules through ``set_token_layout(..., rope=[N, 2d] tensor)`` on every forward; the attention is this
project's :class:`~mita.attention.standard.StandardAttention` (timm's ``Attention`` has no RoPE).

``timm.create_model("vit5_small")`` builds it (registered on ``import mita.models``);
``mita.models.build_model("vit5_small", attention="mita", ...)`` swaps the attention.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, RmsNormFp32, trunc_normal_
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from mita.attention.standard import StandardAttention
from mita.models.vit import install_token_layout_hook

__all__ = ["ViT5", "axial_rope_angles", "vit5_small"]


def axial_rope_angles(
    grid_size: Sequence[int], base_grid: Sequence[int], head_dim: int, theta: float, device=None
) -> torch.Tensor:
    """Rotation angles [h * w, head_dim] of ViT-5's 2-D RoPE for an (h, w) grid in raster order.

    Channels ``[0, d/2)`` rotate with the row position, ``[d/2, d)`` with the column position; each
    frequency ``theta^(-j / (d/4))`` drives one adjacent channel pair. Positions along an axis of length
    L are ``i / L * L0`` with ``L0`` the matching entry of ``base_grid``.
    """
    h, w = (int(s) for s in grid_size)
    base_h, base_w = (int(s) for s in base_grid)
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2, device=device, dtype=torch.float32) / half)  # [d/4]
    rows = torch.arange(h, device=device, dtype=torch.float32) / h * base_h  # [h]
    cols = torch.arange(w, device=device, dtype=torch.float32) / w * base_w  # [w]
    a_rows = (rows[:, None] * freqs).repeat_interleave(2, dim=-1)  # [h, d/2]
    a_cols = (cols[:, None] * freqs).repeat_interleave(2, dim=-1)  # [w, d/2]
    angles = torch.cat([a_rows[:, None].expand(h, w, half), a_cols[None].expand(h, w, half)], dim=-1)
    return angles.reshape(h * w, head_dim)  # [h*w, d]


class ViT5(VisionTransformer):
    """timm ``VisionTransformer`` with ViT-5's 2-D rotary embedding on patches and registers.

    Args:
        rope_theta: RoPE base of the patch tokens (official: 10000).
        reg_rope_theta: RoPE base of the register tokens, laid out on a square grid (official: 100).
        drop_path_rate: stochastic depth of every block (uniform, as the official code; timm's
            ``VisionTransformer`` would ramp it linearly with depth).
        kwargs: ``VisionTransformer`` arguments. ``attn_layer`` defaults to ``StandardAttention`` and
            must be an :class:`~mita.attention.base.AttentionBase` (it has to apply the RoPE).
    """

    def __init__(
        self,
        *,
        rope_theta: float = 10000.0,
        reg_rope_theta: float = 100.0,
        drop_path_rate: float = 0.0,
        attn_layer=StandardAttention,
        **kwargs,
    ) -> None:
        super().__init__(attn_layer=attn_layer, **kwargs)
        head_dim = self.embed_dim // int(kwargs.get("num_heads", 12))
        if head_dim % 4:
            raise ValueError(f"head width embed_dim / num_heads = {head_dim} must be divisible by 4 for 2-D RoPE")
        reg_side = math.isqrt(self.num_reg_tokens)
        if reg_side * reg_side != self.num_reg_tokens:
            raise ValueError(f"reg_tokens must be a perfect square (0, 1, 4, 9, ...), got {self.num_reg_tokens}")
        self.head_dim = head_dim
        self.rope_theta = float(rope_theta)
        self.reg_rope_theta = float(reg_rope_theta)
        for blk in self.blocks:
            blk.drop_path1 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
            blk.drop_path2 = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        install_token_layout_hook(self)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset=needs_reset)
        # The official code draws the class and register tokens like the position embedding.
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                trunc_normal_(token, std=0.02)

    def rope_for_grid(self, grid_size: Tuple[int, int]) -> torch.Tensor:
        """cat(sin, cos) [N, 2d] of every token ([cls, registers, patches]) for an (h, w) patch grid."""
        device = self.patch_embed.proj.weight.device
        d = self.head_dim
        angles = [axial_rope_angles(grid_size, self.patch_embed.grid_size, d, self.rope_theta, device)]
        if self.num_reg_tokens:
            side = math.isqrt(self.num_reg_tokens)
            angles.insert(0, axial_rope_angles((side, side), (side, side), d, self.reg_rope_theta, device))
        if self.has_class_token:
            angles.insert(0, torch.zeros(1, d, device=device))  # cos 1, sin 0: the class token is not rotated
        angles = torch.cat(angles)  # [N, d]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)  # [N, 2d]


def _cfg(**kwargs) -> dict:
    # DeiT-recipe preprocessing of the official code (ImageNet mean/std, eval crop ratio 0.875).
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
        "interpolation": "bicubic", "fixed_input_size": False, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "patch_embed.proj", "classifier": "head", **kwargs,
    }


# timm's register_model reads this module-level dict for the names registered below.
default_cfgs = generate_default_cfgs({"vit5_small": _cfg()})


def _create_vit5(variant: str, pretrained: bool = False, **kwargs) -> ViT5:
    if pretrained:
        raise ValueError(f"{variant}: pretrained=True is not supported (no hub downloads); use "
                         "mita.models.load_checkpoint(model, path) with a local file")
    kwargs.pop("cache_dir", None)
    return build_model_with_cfg(
        ViT5, variant, pretrained=False, feature_cfg=dict(out_indices=3, feature_cls="getter"), **kwargs
    )


@register_model
def vit5_small(pretrained: bool = False, **kwargs) -> ViT5:
    """ViT-5-Small: 384 wide, depth 12, 6 heads, 4 registers, RMSNorm, LayerScale 1e-4, QK-norm, 2-D RoPE."""
    model_args = dict(
        patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, qkv_bias=False, qk_norm=True,
        init_values=1e-4, reg_tokens=4, no_embed_class=True, norm_layer=partial(RmsNormFp32, eps=1e-6),
    )
    return _create_vit5("vit5_small", pretrained=pretrained, **dict(model_args, **kwargs))
