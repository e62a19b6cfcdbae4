"""Config nodes to objects: the datasets and the model that train.py, eval.py and the analyses build alike.

:func:`build_model_from_config` takes the ``model`` and ``attention`` nodes (``configs/model/``,
``configs/attention/``): the attention's keys are its constructor's arguments, ``model.kwargs`` and the
other model keys are timm's (:func:`mita.models.build_model`). :func:`build_datasets` takes the ``data``
node (``configs/data/``): ``data.aug``'s image keys are :func:`mita.data.build_transform`'s arguments.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.data

from mita.config import attention_kwargs, plain
from mita.data import build_dataset, build_transform
from mita.models import build_model

__all__ = ["BATCH_AUG_KEYS", "build_datasets", "build_model_from_config", "build_transforms", "subset"]

#: ``data.aug`` keys that act on batches, the sampler or the loss (:func:`mita.data.build_mixup`,
#: :func:`mita.data.build_loader`, :func:`mita.engine.build_criterion`); the others are the image transform's
BATCH_AUG_KEYS = ("image_augment", "repeated_aug", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob",
                  "mixup_mode", "label_smoothing")
#: ``data`` keys that are :func:`mita.data.build_dataset`'s arguments
_DATASET_KEYS = ("root", "img_size", "in_chans", "num_classes", "synthetic_size")


def build_model_from_config(model: Mapping[str, Any], attention: Mapping[str, Any], *,
                            load_pretrained: bool = True) -> nn.Module:
    """:func:`mita.models.build_model` from the ``model`` and ``attention`` config nodes.

    ``model.checkpoint`` (fine-tuning) is loaded after the attention swap when ``load_pretrained``;
    ``model.name`` names the model in logs and reports only.
    """
    timm_kwargs = dict(plain(model))
    timm_kwargs.pop("name", None)
    arch = timm_kwargs.pop("arch")
    checkpoint = timm_kwargs.pop("checkpoint", None)
    timm_kwargs.update(timm_kwargs.pop("kwargs", None) or {})
    name, kwargs = attention_kwargs(attention)
    if not load_pretrained:
        checkpoint = None
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"model.checkpoint={checkpoint!r} does not exist")
    return build_model(arch, name, kwargs, pretrained_path=checkpoint, **timm_kwargs)


def build_transforms(data: Mapping[str, Any]) -> Tuple[Any, Any]:
    """``(training transform, evaluation transform)`` of a ``data`` node; the training one is the evaluation
    one when ``data.aug.image_augment`` is false."""
    aug = data["aug"]
    common = dict(img_size=data["img_size"], in_chans=data["in_chans"], mean=data["mean"], std=data["std"])
    eval_transform = build_transform(False, **common, interpolation=aug["interpolation"], crop_pct=data["crop_pct"])
    if not aug["image_augment"]:
        return eval_transform, eval_transform
    image_aug = {k: v for k, v in aug.items() if k not in BATCH_AUG_KEYS}
    return build_transform(True, **common, **image_aug), eval_transform


def subset(dataset, limit: Optional[int], seed: int):
    """A fixed random subset of at most ``limit`` samples (the same on every rank and every run)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit < 1:
        raise ValueError(f"data.max_train_samples / max_val_samples must be >= 1 or null, got {limit}")
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values
    return torch.utils.data.Subset(dataset, indices.tolist())


def build_datasets(data: Mapping[str, Any], seed: int, *, train: bool = True, split: str = "val"):
    """``(training dataset or None, evaluation dataset of split)`` of a ``data`` node, with their transforms
    and ``data.max_train_samples`` / ``max_val_samples`` subsets. Fails at once on a bad path."""
    data = plain(data)
    train_transform, eval_transform = build_transforms(data)
    dataset_kwargs: Dict[str, Any] = {k: data[k] for k in _DATASET_KEYS if k in data}
    train_set = None
    if train:
        train_set = build_dataset(data["name"], "train", transform=train_transform, seed=seed, **dataset_kwargs)
        train_set = subset(train_set, data.get("max_train_samples"), seed)
    eval_set = build_dataset(data["name"], split, transform=eval_transform, seed=seed, **dataset_kwargs)
    return train_set, subset(eval_set, data.get("max_val_samples"), seed)
