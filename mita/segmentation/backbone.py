"""A timm ViT with any attention of the zoo as an mmsegmentation backbone.

``MiTAViT`` is registered in mmseg's ``MODELS``; a config selects it with ``backbone=dict(type="MiTAViT",
arch="vit_tiny_patch16_224", img_size=(512, 512), attention="mita", attention_kwargs=dict(num_landmarks=49,
topk=49), checkpoint="/ckpt/deit_tiny.pth")``. It is :func:`mita.models.build_model` with timm's
``dynamic_img_size``: the position embeddings are built for ``img_size`` (the training crop, 32 x 32 patches
at 512) and resampled on the fly for any other input, so sliding-window crops at image borders and the
multi-scale test run with the same weights; every attention learns the current grid from the patch-embedding
hook. The forward returns NCHW feature maps of the blocks in ``out_indices`` (Segmenter reads the last one,
after the final norm).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from mmengine.model import BaseModule
from mmseg.registry import MODELS

from mita.models import build_model, read_state_dict
from mita.models.checkpoint import adapt_state_dict

__all__ = ["MiTAViT", "CLASSIFIER_PREFIXES", "load_backbone_checkpoint"]

_logger = logging.getLogger(__name__)

#: keys of a classification checkpoint that a backbone has no use for (classifier heads, their norm)
CLASSIFIER_PREFIXES = ("head.", "head_dist.", "fc_norm.")


def load_backbone_checkpoint(vit: nn.Module, path: Union[str, os.PathLike]) -> Tuple[List[str], List[str]]:
    """Load a classification checkpoint (ours, DeiT, timm ``.pth``/``.safetensors``) into a headless ViT.

    Classifier keys are dropped first; position embeddings are resampled to the ViT's grid by
    :func:`mita.models.load_checkpoint`. Returns ``(missing_keys, unexpected_keys)``: missing keys are the
    parameters the attention adds over timm's (e.g. ``dwc``, ``gate``, learned landmarks).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone checkpoint {path!r} does not exist")
    state_dict = read_state_dict(path)
    if "norm.weight" not in state_dict and "fc_norm.weight" in state_dict:
        # an average-pooling classifier keeps its final norm in fc_norm; a dense backbone applies it as norm
        state_dict = {("norm." + k[len("fc_norm."):] if k.startswith("fc_norm.") else k): v
                      for k, v in state_dict.items()}
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFIER_PREFIXES)}
    # the same mapping as mita.models.load_checkpoint: pos_embed and patch kernel resampled, shapes checked
    state_dict = adapt_state_dict(state_dict, vit)
    result = vit.load_state_dict(state_dict, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        _logger.info("%s: backbone keys missing from the checkpoint: %s", path, missing)
    if unexpected:
        _logger.warning("%s: checkpoint keys the backbone does not have: %s", path, unexpected)
    return missing, unexpected


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be an int >= 1 or (h, w) with h, w >= 1, got {value}")
    return value


@MODELS.register_module()
class MiTAViT(BaseModule):
    """timm VisionTransformer (any attention of :mod:`mita.attention`) returning NCHW features.

    Args:
        arch: a timm ViT name (``vit_tiny_patch16_224``, ``deit_small_patch16_224``, ...); its width,
            depth and heads are kept unless ``model_kwargs`` override them.
        img_size: the training crop (h, w) or an int; sets the position-embedding grid.
        attention: an attention name of :data:`mita.attention.ATTENTIONS`.
        attention_kwargs: that attention's keyword arguments (``num_landmarks``, ``topk``, ``pool``, ...).
        checkpoint: a local classification checkpoint loaded by :meth:`init_weights` (classifier dropped,
            position embeddings resampled); None trains from timm's initialisation.
        out_indices: blocks whose outputs are returned (negative counts from the end).
        final_norm: apply the ViT's final norm to the returned features (Segmenter: True).
        in_chans, drop_path_rate, drop_rate: as in timm.
        model_kwargs: further timm ``VisionTransformer`` arguments (``patch_size``, ``embed_dim``, ``depth``, ...).
        init_cfg: mmengine's; the checkpoint goes through ``checkpoint``, not here.
    """

    def __init__(
        self,
        arch: str = "vit_tiny_patch16_224",
        img_size: Union[int, Sequence[int]] = 512,
        attention: str = "standard",
        attention_kwargs: Optional[Dict[str, Any]] = None,
        checkpoint: Optional[str] = None,
        out_indices: Union[int, Sequence[int]] = -1,
        final_norm: bool = True,
        in_chans: int = 3,
        drop_path_rate: float = 0.1,
        drop_rate: float = 0.0,
        model_kwargs: Optional[Dict[str, Any]] = None,
        init_cfg: Optional[dict] = None,
    ) -> None:
        super().__init__(init_cfg=init_cfg)
        kwargs = dict(model_kwargs or {})
        for key in ("num_classes", "pretrained", "dynamic_img_size", "global_pool"):
            if key in kwargs:
                raise ValueError(f"model_kwargs[{key!r}] is set by MiTAViT itself; remove it")
        self.img_size = _pair(img_size, "img_size")
        self.vit = build_model(
            arch, attention, dict(attention_kwargs or {}),
            img_size=self.img_size, in_chans=in_chans, num_classes=0, global_pool="",
            drop_rate=drop_rate, drop_path_rate=drop_path_rate,
            dynamic_img_size=True, dynamic_img_pad=True, **kwargs,
        )
        depth = len(self.vit.blocks)
        indices = [out_indices] if isinstance(out_indices, int) else list(out_indices)
        if not indices or any(not -depth <= i < depth for i in indices):
            raise ValueError(f"out_indices must be block indices in [-{depth}, {depth - 1}], got {out_indices}")
        self.out_indices = [i % depth for i in indices]
        self.final_norm = bool(final_norm)
        self.checkpoint = checkpoint
        self.embed_dim = int(self.vit.embed_dim)

    def init_weights(self) -> None:
        # mmengine calls this once the whole model is built. timm initialised the ViT at construction; mmengine's
        # default (recursing into children) would run timm's init_weights again, so only the checkpoint loads.
        if self.checkpoint is not None:
            load_backbone_checkpoint(self.vit, self.checkpoint)
        self._is_init = True

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """``x`` [B, C, H, W] -> one [B, embed_dim, ceil(H / p), ceil(W / p)] map per ``out_indices``."""
        feats = self.vit.forward_intermediates(
            x, indices=self.out_indices, norm=self.final_norm, output_fmt="NCHW", intermediates_only=True,
        )
        return tuple(feats)
