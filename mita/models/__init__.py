"""timm ViT/DeiT and ViT-5 models with the attention zoo, their checkpoints and registered names.

Importing this package registers ``vit5_small`` and the zoo names (:mod:`mita.models.zoo`) with timm.
"""
from mita.models.checkpoint import adapt_state_dict, load_checkpoint, read_state_dict
from mita.models.vit import build_model, install_token_layout_hook, swap_attention
from mita.models.vit5 import ViT5, vit5_small
from mita.models.zoo import ZOO_MODELS

__all__ = [
    "ViT5",
    "ZOO_MODELS",
    "adapt_state_dict",
    "build_model",
    "install_token_layout_hook",
    "load_checkpoint",
    "read_state_dict",
    "swap_attention",
    "vit5_small",
]
