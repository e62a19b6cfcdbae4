"""Segmenter's mask-transformer decoder with any attention of the zoo.

``MiTASegmenterMaskHead`` is mmseg's ``SegmenterMaskTransformerHead`` (same layers, class embeddings, mask
product and norms) whose decoder layers attend with :func:`mita.attention.create_attention` instead of
``nn.MultiheadAttention``: ``decode_head=dict(type="MiTASegmenterMaskHead", attention="mita",
attention_kwargs=dict(num_landmarks=36, topk=36), ...)`` is the paper's v2 setting (MiTA 36 + 36 over the
patch and class tokens). With ``attention="standard"`` it computes what mmseg's head computes, with timm's
parameter names (``qkv``, ``proj``) instead of ``in_proj_weight``/``out_proj``.

The decoder's sequence is [patch tokens (h * w); class tokens (num_classes)]. The zoo's attentions expect
prefix tokens before the patch grid (landmarks are pooled from the patch queries on their grid), so each
attention call moves the class tokens in front and back; attention is permutation-equivariant, so for
standard attention this changes nothing.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
from mmseg.models.decode_heads import SegmenterMaskTransformerHead
from mmseg.registry import MODELS

from mita.attention import AttentionBase, create_attention, set_token_layout

__all__ = ["ClassTokenFirstAttention", "MiTASegmenterMaskHead"]


class ClassTokenFirstAttention(nn.Module):
    """mmcv ``MultiheadAttention``'s call contract (``attn(query, identity=x)`` -> identity + attention)
    around a zoo attention, with the ``num_classes`` trailing class tokens moved in front."""

    def __init__(self, attn: AttentionBase, num_classes: int) -> None:
        super().__init__()
        self.attn = attn
        self.num_classes = int(num_classes)

    def forward(self, query: torch.Tensor, key=None, value=None, identity: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        if key is not None or value is not None or any(v is not None for v in kwargs.values()):
            raise ValueError("the decoder's attention is self-attention without masks or positions: "
                             "pass only query and identity")
        n = self.num_classes
        x = torch.cat([query[:, -n:], query[:, :-n]], dim=1)  # [B, n_cls + h*w, C]
        out = self.attn(x)
        out = torch.cat([out[:, n:], out[:, :n]], dim=1)  # [B, h*w + n_cls, C]
        return (query if identity is None else identity) + out


@MODELS.register_module()
class MiTASegmenterMaskHead(SegmenterMaskTransformerHead):
    """Segmenter's mask transformer with ``attention`` in its decoder layers.

    Args:
        attention: an attention name of :data:`mita.attention.ATTENTIONS` (``standard``, ``mita``, ...).
        attention_kwargs: its keyword arguments (``num_landmarks``, ``topk``, ...).
        Everything else as mmseg's ``SegmenterMaskTransformerHead``.
    """

    def __init__(self, *args, attention: str = "standard", attention_kwargs: Optional[Dict[str, Any]] = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        qkv_bias = kwargs.get("qkv_bias", True)
        attn_drop = kwargs.get("attn_drop_rate", 0.0)
        proj_drop = kwargs.get("drop_rate", 0.0)
        for layer in self.layers:
            old = layer.attn  # mmcv MultiheadAttention, wrapping nn.MultiheadAttention
            dim, heads = old.embed_dims, old.num_heads
            new = create_attention(attention, dim=dim, num_heads=heads, qkv_bias=qkv_bias, attn_drop=attn_drop,
                                   proj_drop=proj_drop, **dict(attention_kwargs or {}))
            layer.attn = ClassTokenFirstAttention(new, self.num_classes)
        self.attention = attention

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        h, w = self._transform_inputs(inputs).shape[2:]
        # the class tokens sit in front of the h x w patch grid inside every attention call
        set_token_layout(self.layers, (int(h), int(w)), self.num_classes)
        return super().forward(inputs)
