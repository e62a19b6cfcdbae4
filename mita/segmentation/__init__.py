"""Semantic segmentation with the attention zoo on mmsegmentation (Segmenter, ADE20K).

Importing this package needs mmsegmentation, mmengine and mmcv (``bash scripts/setup_seg.sh``) and registers
in mmseg's registries: the backbone ``MiTAViT`` (a timm ViT with any attention, initialised from a
classification checkpoint), the decode head ``MiTASegmenterMaskHead`` (Segmenter's mask transformer with any
attention) and the dataset ``FashionMNISTSegDataset`` (the small Fashion-MNIST set of ``python segment.py``).
:func:`run` is what ``segment.py`` calls. Nothing outside this package and ``segment.py`` imports mmseg.
"""
from mita.segmentation.backbone import MiTAViT, load_backbone_checkpoint
from mita.segmentation.fashion import FASHION_SEG_CLASSES, FashionMNISTSegDataset, make_fashion_segmentation
from mita.segmentation.head import MiTASegmenterMaskHead
from mita.segmentation.runner import WeightsOnlyCheckpointHook, build_mmseg_config, model_flops, run

__all__ = [
    "FASHION_SEG_CLASSES",
    "FashionMNISTSegDataset",
    "MiTASegmenterMaskHead",
    "MiTAViT",
    "WeightsOnlyCheckpointHook",
    "build_mmseg_config",
    "load_backbone_checkpoint",
    "make_fashion_segmentation",
    "model_flops",
    "run",
]
