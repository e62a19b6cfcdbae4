"""The attention zoo: every variant follows timm's ``Attention`` contract (see :mod:`.base`).

``create_attention("mita", dim=384, num_heads=6, qkv_bias=True, num_landmarks=25)`` builds one by
name; ``ATTENTIONS`` maps names to classes; ``set_token_layout(model, (h, w), num_prefix_tokens)``
tells every attention inside a model how its tokens lie on the patch grid.
"""
from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from typing import Iterator, Optional, Sequence, Union

import torch.nn as nn

from ._pooling import pool_patch_queries
from .agent import AgentAttention
from .base import AttentionBase
from .linear import LinearAttention
from .moba import MoBAAttention
from .standard import StandardAttention
from .topk import TopkAttention

__all__ = [
    "ATTENTIONS",
    "AttentionBase",
    "AgentAttention",
    "LinearAttention",
    "MiTAAttention",
    "MoBAAttention",
    "StandardAttention",
    "TopkAttention",
    "create_attention",
    "pool_patch_queries",
    "set_token_layout",
]

# Classes in modules that import heavier code (the MiTA op) are named "module:attr" and imported on
# first lookup, so `import mita.attention` stays cheap and works while such a module is optional.
_LAZY = {"mita": "mita.attention.mita:MiTAAttention"}


class _Registry(MutableMapping):
    """``name -> attention class``; entries given as ``"module:attr"`` strings are imported on first use."""

    def __init__(self, entries):
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> type:
        entry = self._entries[name]
        if isinstance(entry, str):
            module, attr = entry.split(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry

    def __setitem__(self, name: str, cls: Union[type, str]) -> None:
        self._entries[name] = cls

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name) -> bool:
        # membership must not import a lazy entry (Mapping's default looks the value up)
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"ATTENTIONS({sorted(self._entries)})"


ATTENTIONS = _Registry({
    "standard": StandardAttention,
    "agent": AgentAttention,
    "moba": MoBAAttention,
    "topk": TopkAttention,
    "linear": LinearAttention,
    **_LAZY,
})


def create_attention(name: str, dim: int, num_heads: int = 8, qkv_bias: bool = False, **kw) -> AttentionBase:
    """Build the attention registered as ``name`` (see ``ATTENTIONS``); ``kw`` go to its constructor."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}; valid names: {', '.join(sorted(ATTENTIONS))}")
    return ATTENTIONS[name](dim, num_heads=num_heads, qkv_bias=qkv_bias, **kw)


def set_token_layout(
    module: nn.Module,
    grid_size: Optional[Union[int, Sequence[int]]],
    num_prefix_tokens: int,
    rope=None,
) -> int:
    """Set ``grid_size``, ``num_prefix_tokens`` and ``rope`` on every :class:`AttentionBase` in ``module``.

    Args:
        module: a model, a block or an attention (itself included).
        grid_size: ``(h, w)`` patch grid, an int for a square grid, or None to infer a square grid from N.
        num_prefix_tokens: tokens before the patches (cls, registers), >= 0.
        rope: rotary embedding for the patch tokens (as timm's ``RotaryEmbeddingCat.get_embed()``) or None.

    Returns:
        The number of attention modules updated.
    """
    if grid_size is not None:
        if isinstance(grid_size, int) and not isinstance(grid_size, bool):
            grid_size = (grid_size, grid_size)
        grid_size = tuple(int(s) for s in grid_size)
        if len(grid_size) != 2 or min(grid_size) < 1:
            raise ValueError(f"grid_size must be (h, w) with h, w >= 1 (or an int >= 1), got {grid_size}")
    if not isinstance(num_prefix_tokens, int) or isinstance(num_prefix_tokens, bool) or num_prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
    count = 0
    for layer in module.modules():
        if isinstance(layer, AttentionBase):
            layer.grid_size = grid_size
            layer.num_prefix_tokens = num_prefix_tokens
            layer.rope = rope
            count += 1
    return count


def __getattr__(name: str):
    # `from mita.attention import MiTAAttention` without importing the MiTA op at package import
    if name == "MiTAAttention":
        return ATTENTIONS["mita"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
