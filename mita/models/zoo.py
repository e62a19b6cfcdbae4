"""timm names for the model zoo: one registered name per published row, plus the baselines.

``timm.create_model("mita_deit_small_patch16_224")`` builds that row through
:func:`mita.models.build_model` (registered on ``import mita.models``). Every name takes timm model
arguments (``img_size``, ``depth``, ``num_classes``, ``dynamic_img_size``, ...) and
``attention_kwargs=`` to override the row's attention settings. ``pretrained=True`` raises: there are
no hub weights; load a local file with :func:`mita.models.load_checkpoint`.

MiTA rows on DeiT use the official DeiT code's settings: m = 25 landmarks, k = 25 keys per expert,
``pool="official"`` (cls included, last patch dropped) and ``shared_scale="official"``. The ViT-5 rows
follow the official ViT-5 code: landmarks pooled from the patch tokens only (``pool="grid"``, 5 x 5)
and k = 30. The baselines keep the paper's budgets: Agent with 49 agents, MoBA with blocks of 25 and
2 blocks per query, top-k with 50 keys per query (m + k = 50 for MiTA), linear attention.
"""
from __future__ import annotations

from typing import Any, Dict

import torch.nn as nn
from timm.models import register_model

from mita.models.vit import build_model

# register_model appends every registered name.
__all__ = []

_MITA_DEIT = dict(num_landmarks=25, topk=25, pool="official", shared_scale="official")
_MITA_VIT5 = dict(num_landmarks=25, topk=30, pool="grid", shared_scale="official")
_AGENT = dict(num_agents=49)
_MOBA = dict(block_size=25, topk_blocks=2)
_TOPK = dict(topk=50)


def _zoo_model(name: str, arch: str, attention: str, defaults: Dict[str, Any], pretrained: bool, kwargs) -> nn.Module:
    if pretrained:
        raise ValueError(
            f"{name}: pretrained=True is not supported (no hub downloads); build it with pretrained=False and "
            "load a local file with mita.models.load_checkpoint(model, path)"
        )
    attention_kwargs = {**defaults, **(kwargs.pop("attention_kwargs", None) or {})}
    model = build_model(arch, attention, attention_kwargs, **kwargs)
    # The inner timm name's config points at its standard-attention weights: rename it and cut the link.
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(architecture=name, tag=None, hf_hub_id=None, url="", file=None)
    model.pretrained_cfg = model.default_cfg = cfg
    return model


@register_model
def mita_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-DeiT-Tiny (71.1 top-1)."""
    return _zoo_model("mita_deit_tiny_patch16_224", "deit_tiny_patch16_224", "mita", _MITA_DEIT, pretrained, kwargs)


@register_model
def mita_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-DeiT-Small (79.8 top-1)."""
    return _zoo_model("mita_deit_small_patch16_224", "deit_small_patch16_224", "mita", _MITA_DEIT, pretrained, kwargs)


@register_model
def mita_dwc_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-DeiT-Tiny + DWC (73.4 top-1)."""
    return _zoo_model(
        "mita_dwc_deit_tiny_patch16_224", "deit_tiny_patch16_224", "mita", dict(_MITA_DEIT, dwc=True),
        pretrained, kwargs,
    )


@register_model
def mita_dwc_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-DeiT-Small + DWC (80.6 top-1)."""
    return _zoo_model(
        "mita_dwc_deit_small_patch16_224", "deit_small_patch16_224", "mita", dict(_MITA_DEIT, dwc=True),
        pretrained, kwargs,
    )


@register_model
def mita_dwc_gate_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-DeiT-Small + DWC + Gate (81.2 top-1)."""
    return _zoo_model(
        "mita_dwc_gate_deit_small_patch16_224", "deit_small_patch16_224", "mita",
        dict(_MITA_DEIT, dwc=True, gate=True), pretrained, kwargs,
    )


@register_model
def mita_vit5_small(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-ViT-5-Small (81.3 top-1)."""
    return _zoo_model("mita_vit5_small", "vit5_small", "mita", _MITA_VIT5, pretrained, kwargs)


@register_model
def mita_dwc_vit5_small(pretrained: bool = False, **kwargs) -> nn.Module:
    """MiTA-ViT-5-Small + DWC (81.7 top-1)."""
    return _zoo_model("mita_dwc_vit5_small", "vit5_small", "mita", dict(_MITA_VIT5, dwc=True), pretrained, kwargs)


@register_model
def agent_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Agent attention (49 agents) on DeiT-Tiny."""
    return _zoo_model("agent_deit_tiny_patch16_224", "deit_tiny_patch16_224", "agent", _AGENT, pretrained, kwargs)


@register_model
def agent_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Agent attention (49 agents) on DeiT-Small."""
    return _zoo_model("agent_deit_small_patch16_224", "deit_small_patch16_224", "agent", _AGENT, pretrained, kwargs)


@register_model
def moba_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MoBA (blocks of 25, 2 per query) on DeiT-Tiny."""
    return _zoo_model("moba_deit_tiny_patch16_224", "deit_tiny_patch16_224", "moba", _MOBA, pretrained, kwargs)


@register_model
def moba_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """MoBA (blocks of 25, 2 per query) on DeiT-Small."""
    return _zoo_model("moba_deit_small_patch16_224", "deit_small_patch16_224", "moba", _MOBA, pretrained, kwargs)


@register_model
def topk_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Top-k attention (50 keys per query) on DeiT-Tiny."""
    return _zoo_model("topk_deit_tiny_patch16_224", "deit_tiny_patch16_224", "topk", _TOPK, pretrained, kwargs)


@register_model
def topk_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Top-k attention (50 keys per query) on DeiT-Small."""
    return _zoo_model("topk_deit_small_patch16_224", "deit_small_patch16_224", "topk", _TOPK, pretrained, kwargs)


@register_model
def linear_deit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Linear attention on DeiT-Tiny."""
    return _zoo_model("linear_deit_tiny_patch16_224", "deit_tiny_patch16_224", "linear", {}, pretrained, kwargs)


@register_model
def linear_deit_small_patch16_224(pretrained: bool = False, **kwargs) -> nn.Module:
    """Linear attention on DeiT-Small."""
    return _zoo_model("linear_deit_small_patch16_224", "deit_small_patch16_224", "linear", {}, pretrained, kwargs)


#: every name this module registers with timm
ZOO_MODELS = tuple(__all__)
__all__.append("ZOO_MODELS")
