"""timm Vision Transformers with a swappable attention.

``build_model("deit_small_patch16_224", attention="mita", attention_kwargs=dict(num_landmarks=25))``
builds timm's ``VisionTransformer`` (any timm ViT name, distilled DeiT included, or ``"vit5_small"``),
replaces every block's ``attn`` by an attention of :mod:`mita.attention` and installs a forward hook
on ``model.patch_embed`` that tells every attention the current patch grid (and ViT-5's rotary
embedding) before the blocks run, so ``dynamic_img_size=True`` works.

``swap_attention(model, "topk", topk=32)`` swaps the attention of a built model in place, keeping the
weights both sides share (``qkv``, ``proj``, norms, ``gate``, ``dwc``, ...).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import timm
import torch
import torch.nn as nn

from mita.attention import AttentionBase, create_attention, set_token_layout
from mita.models.checkpoint import load_checkpoint

__all__ = ["build_model", "swap_attention", "install_token_layout_hook", "TokenLayoutHook"]


class TokenLayoutHook:
    """Forward hook on ``model.patch_embed``: reads the patch grid and calls ``set_token_layout``.

    An object rather than a closure so that ``copy.deepcopy(model)`` (EMA copies) gives the copy a hook
    bound to the copy: the deep copy maps ``self.model`` through its memo.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, patch_embed: nn.Module, args: Tuple[Any, ...], output: torch.Tensor) -> None:
        grid = _patch_grid(patch_embed, args[0], output)
        # A model with rotary embeddings (ViT-5) builds them for the grid seen in this forward.
        rope_for_grid = getattr(self.model, "rope_for_grid", None)
        rope = rope_for_grid(grid) if callable(rope_for_grid) else None
        set_token_layout(self.model, grid, int(self.model.num_prefix_tokens), rope=rope)


def _patch_grid(patch_embed: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Tuple[int, int]:
    """The (h, w) patch grid of one patch-embedding forward: ``x`` [B, C, H, W] -> ``out``."""
    if out.dim() == 4:
        # dynamic_img_size: timm defers flattening, output [B, h, w, C] (NHWC) or [B, C, h, w]
        nchw = str(getattr(patch_embed, "output_fmt", "NHWC")).endswith("NCHW")
        h, w = out.shape[2:4] if nchw else out.shape[1:3]
        return int(h), int(w)
    n_patches = out.shape[1]  # [B, h*w, C]
    if hasattr(patch_embed, "dynamic_feat_size"):
        grid = tuple(int(s) for s in patch_embed.dynamic_feat_size(tuple(x.shape[-2:])))
    else:
        grid = tuple(int(s) for s in patch_embed.grid_size)
    if grid[0] * grid[1] != n_patches:
        raise ValueError(f"patch embedding returned {n_patches} tokens, which does not fit its grid {grid}")
    return grid


def install_token_layout_hook(model: nn.Module) -> TokenLayoutHook:
    """Install (once) the hook that keeps every attention's token layout current; returns it."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not hasattr(model, "num_prefix_tokens"):
        raise ValueError(
            f"{type(model).__name__} has no patch_embed / num_prefix_tokens; expected a timm VisionTransformer"
        )
    for hook in patch_embed._forward_hooks.values():
        if isinstance(hook, TokenLayoutHook):
            return hook
    hook = TokenLayoutHook(model)
    patch_embed.register_forward_hook(hook)
    return hook


def _norm_layer_of(attn: nn.Module) -> Optional[Callable[..., nn.Module]]:
    """The ``norm_layer`` an attention was built with, read from its q/k or output norm (None if none)."""
    for name in ("q_norm", "k_norm", "norm"):
        norm = getattr(attn, name, None)
        if norm is not None and not isinstance(norm, nn.Identity):
            eps = getattr(norm, "eps", None)
            return functools.partial(type(norm), eps=eps) if eps is not None else type(norm)
    return None


def _attention_args(attn: nn.Module) -> Dict[str, Any]:
    """Constructor arguments of timm's contract inferred from a built attention module."""
    qkv = getattr(attn, "qkv", None)
    proj = getattr(attn, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear) or not hasattr(attn, "num_heads"):
        raise ValueError(
            f"cannot swap {type(attn).__name__}: expected timm's attention contract (qkv and proj Linear, num_heads)"
        )
    dim = qkv.in_features
    if qkv.out_features != 3 * dim or proj.in_features != dim or proj.out_features != dim:
        raise ValueError(
            f"cannot swap {type(attn).__name__}: qkv {qkv.in_features}->{qkv.out_features} and proj "
            f"{proj.in_features}->{proj.out_features} must map dim={dim} -> 3*dim and dim -> dim"
        )
    if getattr(attn, "gate", None) is not None and not isinstance(attn, AttentionBase):
        # timm's `gated=True` gate is a sigmoid gate, not this project's SiLU gate: refuse, don't guess.
        raise ValueError(f"cannot swap {type(attn).__name__} with timm's sigmoid gate (gated=True)")
    norm = getattr(attn, "norm", None)
    return dict(
        dim=dim,
        num_heads=int(attn.num_heads),
        qkv_bias=qkv.bias is not None,
        qk_norm=not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity),
        proj_bias=proj.bias is not None,
        attn_drop=float(getattr(getattr(attn, "attn_drop", None), "p", 0.0)),
        proj_drop=float(getattr(getattr(attn, "proj_drop", None), "p", 0.0)),
        norm_layer=_norm_layer_of(attn),
        scale_norm=norm is not None and not isinstance(norm, nn.Identity),
        device=qkv.weight.device,
        dtype=qkv.weight.dtype,
    )


def swap_attention(model: nn.Module, name: str, **kw) -> nn.Module:
    """Replace every block's ``attn`` of a timm ViT by ``mita.attention.create_attention(name, ...)``.

    ``dim``, ``num_heads``, ``qkv_bias``, ``qk_norm``, ``proj_bias``, dropouts, ``scale_norm`` and
    ``norm_layer`` are read from the old module (``kw`` may override them); device and dtype are kept.
    Every parameter or buffer present in both modules with the same name and shape (``qkv``, ``proj``,
    ``q_norm``, ``k_norm``, ``norm``, and ``gate``/``dwc`` when both sides have them) is copied.
    Installs the token-layout hook if missing. Returns ``model`` (modified in place).
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None or not len(blocks) or not all(hasattr(blk, "attn") for blk in blocks):
        raise ValueError(f"{type(model).__name__} has no blocks with an `attn`; expected a timm VisionTransformer")
    for blk in blocks:
        old = blk.attn
        args = _attention_args(old)
        args.update(kw)
        new = create_attention(name, **args)
        old_state = old.state_dict()
        reused = {
            key: old_state[key] for key, value in new.state_dict().items()
            if key in old_state and old_state[key].shape == value.shape
        }
        new.load_state_dict(reused, strict=False)
        new.train(old.training)
        blk.attn = new
    install_token_layout_hook(model)
    return model


def build_model(
    arch: str,
    attention: str = "standard",
    attention_kwargs: Optional[Dict[str, Any]] = None,
    pretrained_path: Optional[str] = None,
    **timm_kwargs,
) -> nn.Module:
    """Build ``timm.create_model(arch, pretrained=False, **timm_kwargs)`` with ``attention`` in every block.

    Args:
        arch: a timm ViT name (``deit_tiny_patch16_224``, ``deit_small_distilled_patch16_224``,
            ``vit_base_patch16_224``, ...) or ``"vit5_small"``.
        attention: a name of ``mita.attention.ATTENTIONS`` (``standard``, ``mita``, ``agent``, ...).
        attention_kwargs: keyword arguments of that attention (``num_landmarks``, ``topk``, ``dwc``, ...).
        pretrained_path: a local checkpoint loaded with :func:`mita.models.load_checkpoint` (non-strict;
            missing and unexpected keys are logged).
        timm_kwargs: model arguments for timm (``img_size``, ``depth``, ``num_classes``,
            ``dynamic_img_size``, ``drop_path_rate``, ...). ``pretrained=True`` is refused: no hub downloads.
    """
    if timm_kwargs.pop("pretrained", False):
        raise ValueError("pretrained=True is not supported (no hub downloads); pass pretrained_path= a local file")
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise ValueError(
            f"unknown arch {arch!r}; expected a timm ViT name such as 'deit_tiny_patch16_224', "
            f"'deit_small_distilled_patch16_224', 'vit_base_patch16_224' or 'vit5_small'"
        )
    model = timm.create_model(arch, pretrained=False, **timm_kwargs)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ValueError(f"arch {arch!r} built a {type(model).__name__}, not a ViT with blocks and a patch_embed")
    swap_attention(model, attention, **(attention_kwargs or {}))
    if pretrained_path is not None:
        load_checkpoint(model, pretrained_path)
    return model
